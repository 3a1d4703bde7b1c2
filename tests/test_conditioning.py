"""The denoiser's conditioning conventions (medsr.bundle.conditioning): the manifest fields, the engine feeding the
encoder the upsampled LR, the residual graph, tiles, TensorRT shapes, and training crops cut from whole-slice
upsamplings."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from manifests import fake_bundle

from medsr.bundle import load_bundle
from medsr.bundle.conditioning import BILINEAR, UPSAMPLED, Conditioning
from medsr.bundle.manifest import Denoiser, Task, Vae
from medsr.bundle.scheduler import SchedulerConfig
from medsr.data.pairs import Slice, make_pair, random_crop_pairs
from medsr.degrade import make_degradation, upsample_baseline
from medsr.engine import tiling
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.profiles import graph_input_shapes
from medsr.engine.sessions import open_ort_sessions
from medsr.errors import BundleError

ZEROFILL_RESIDUAL = Conditioning(UPSAMPLED, "zerofill", residual=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"conditioning": "pixel_shuffle"}, "denoiser.conditioning must be one of"),
        ({"conditioning": UPSAMPLED}, "an upsampler is needed in mode"),
        ({"conditioning": BILINEAR, "upsampler": "zerofill"}, "taken only there"),
        ({"conditioning": UPSAMPLED, "upsampler": "nearest"}, "denoiser.upsampler must be one of"),
        ({"conditioning": BILINEAR, "residual": True, "prediction_type": "epsilon"}, "must predict x0"),
        ({"conditioning": BILINEAR, "residual": 1}, "denoiser.residual must be of type bool"),
    ],
)
def test_bad_conditioning_fields_are_named(fields, message):
    with pytest.raises(BundleError, match=message):
        Conditioning.from_manifest({"prediction_type": "sample", **fields})


def test_manifest_round_trip_and_the_old_default():
    assert Conditioning.from_manifest({"prediction_type": "epsilon"}) == Conditioning()
    assert (
        Conditioning.from_manifest({"prediction_type": "sample", **ZEROFILL_RESIDUAL.to_manifest()})
        == ZEROFILL_RESIDUAL
    )


def test_load_bundle_refuses_a_bad_conditioning_naming_the_manifest(tiny_bundle, tmp_path):
    copy = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((copy / "medsr.json").read_text())
    manifest["denoiser"]["conditioning"] = UPSAMPLED
    (copy / "medsr.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"medsr\.json: denoiser\.conditioning"):
        load_bundle(copy)


class RecordingSession:
    """A Session computing ``function(**feeds)`` and keeping the feeds it was given."""

    def __init__(self, function, outputs):
        self.function, self.output_names, self.providers, self.feeds = function, outputs, ("fake",), []

    def run(self, feeds):
        self.feeds.append(feeds)
        return dict(zip(self.output_names, self.function(**feeds)))


def test_the_encoder_sees_the_zero_filled_clipped_lr_and_the_residual_passes_it_through():
    """f = 1 fake graphs: the identity as VAE, and a residual x0 denoiser whose network outputs 0. The SR must then be
    exactly the zero-filled LR (clipped for the networks, as the engine clips), and the consistency step keeps it."""
    sessions = {
        "vae_encoder": RecordingSession(lambda image: (image, np.zeros_like(image)), ("latent_mean", "latent_logvar")),
        "vae_decoder": RecordingSession(lambda latent: (latent,), ("image",)),
        "denoiser": RecordingSession(lambda sample, lr_latent, timestep: (lr_latent,), ("model_output",)),
    }
    bundle = fake_bundle(
        Task(scale=4, image_channels=1, lr_multiple=4),
        Vae(downsample_factor=1, latent_channels=1),
        Denoiser("sample", ZEROFILL_RESIDUAL),
        SchedulerConfig(algorithm="ddim", prediction_type="sample", default_steps=2, timestep_spacing="trailing"),
    )
    pipeline = LatentSRPipeline(bundle, sessions)
    lr = np.random.default_rng(0).uniform(-1.2, 1.2, (3, 8, 12)).astype(np.float32)
    sr = pipeline.super_resolve(lr, SamplingOptions(batch_size=2)).images
    expected = upsample_baseline(np.clip(lr, -1, 1), "zerofill", 4)
    np.testing.assert_allclose(sessions["vae_encoder"].feeds[0]["image"][:, 0], expected[:2], atol=1e-6)
    assert sessions["denoiser"].feeds[0]["lr_latent"].shape == sessions["denoiser"].feeds[0]["sample"].shape
    np.testing.assert_allclose(sr, expected, atol=1e-5)


@pytest.fixture(scope="module")
def residual_bundle(tmp_path_factory):
    """The tiny preset with zero-fill conditioning and a residual x0 output, random weights (seed 0)."""
    pytest.importorskip("torch")
    from medsr.export.builder import build_models
    from medsr.export.onnx import export_bundle
    from medsr.export.presets import get_preset

    preset = dataclasses.replace(get_preset("tiny"), conditioning=ZEROFILL_RESIDUAL)
    vae, unet, provenance = build_models(preset, seed=0)
    path = export_bundle(vae, unet, preset, tmp_path_factory.mktemp("bundles") / "residual", provenance)
    return load_bundle(path)


def test_exported_manifest_and_the_graph_adds_its_conditioning(residual_bundle):
    assert residual_bundle.conditioning == ZEROFILL_RESIDUAL
    session = open_ort_sessions(residual_bundle)["denoiser"]
    rng = np.random.default_rng(1)
    sample, condition = (rng.standard_normal((2, 4, 16, 24), dtype=np.float32) for _ in range(2))
    timestep = np.array([999.0, 10.0], np.float32)

    def run(lr_latent):
        return session.run({"sample": sample, "lr_latent": lr_latent, "timestep": timestep})["model_output"]

    # the network's own output depends on the condition, so shift only the skip path: out(c + d) - out(c) is d plus
    # the network's response to d, which is far from d when the skip is missing
    delta = np.float32(0.5)
    difference = run(condition + delta) - run(condition)
    assert abs(float(difference.mean()) - delta) < 0.25 * delta


def test_ort_matches_torch_with_the_upsampled_conditioning(residual_bundle):
    from medsr.eval.parity import compare_pipelines
    from medsr.export.reference import open_torch_sessions

    lr = np.random.default_rng(0).uniform(-1, 1, (2, 16, 12)).astype(np.float32)
    report = compare_pipelines(
        LatentSRPipeline(residual_bundle, open_ort_sessions(residual_bundle)),
        LatentSRPipeline(residual_bundle, open_torch_sessions(residual_bundle)),
        lr,
        SamplingOptions(steps=2, seed=3, lr_latent="sample", consistency="kspace"),
        threshold_db=60.0,
    )
    assert report.passed, report.to_dict()
    assert report.stages[0].stage == "lr_latent"


def test_one_tile_is_exactly_the_whole_slice_with_the_upsampled_conditioning(residual_bundle):
    pipeline = LatentSRPipeline(residual_bundle, open_ort_sessions(residual_bundle))
    options = SamplingOptions(steps=2, seed=3, lr_latent="sample", tile_size=None)
    lr = np.random.default_rng(2).uniform(-1, 1, (1, 20, 12)).astype(np.float32)
    whole = pipeline.super_resolve(lr, options, first_index=5).images[0]
    rng = options.generators([5])[0]
    np.testing.assert_array_equal(tiling.super_resolve_tiled(pipeline, lr[0], rng, options, 20, 4), whole)


def test_tensorrt_shapes_encode_the_upsampled_image(residual_bundle, tiny_bundle):
    upsampled = graph_input_shapes(residual_bundle, 2, 16, 12)
    assert upsampled["vae_encoder"]["image"] == (2, 1, 64, 48)
    assert upsampled["denoiser"]["lr_latent"] == upsampled["denoiser"]["sample"] == (2, 4, 16, 12)
    paper = graph_input_shapes(load_bundle(tiny_bundle), 2, 16, 12)
    assert paper["vae_encoder"]["image"] == (2, 1, 16, 12) and paper["denoiser"]["lr_latent"] == (2, 4, 4, 3)


def test_training_crops_are_windows_of_the_whole_slice_upsampling():
    rng = np.random.default_rng(0)
    image = np.cumsum(np.cumsum(rng.standard_normal((64, 80)), axis=0), axis=1)
    image = (2.2 * (image - image.min()) / np.ptp(image) - 1.1).astype(np.float32)  # LR overshoots [-1, 1]
    pairs = random_crop_pairs([Slice("s", "mri", 2, 0, image)], 6, 16, 4, rng, augment=False, upsampler="zerofill")
    hr, lr = make_pair(image, make_degradation("kspace", 4))
    whole = upsample_baseline(np.clip(lr, -1, 1), "zerofill", 4)
    for crop_hr, crop_up in zip(pairs.hr, pairs.upsampled):
        matches = [
            (y, x)
            for y in range(0, hr.shape[0] - 15, 4)
            for x in range(0, hr.shape[1] - 15, 4)
            if np.array_equal(hr[y : y + 16, x : x + 16], crop_hr)
        ]
        assert len(matches) == 1
        y, x = matches[0]
        np.testing.assert_array_equal(crop_up, whole[y : y + 16, x : x + 16])
