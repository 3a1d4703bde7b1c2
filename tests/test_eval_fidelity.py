"""medsr.eval.slices, medsr.eval.fidelity and medsr.eval.fidelity_report on real slices with the tiny bundle."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("pywt")

from medsr.bundle import MANIFEST_NAME, load_bundle
from medsr.degrade import make_degradation
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_ort_sessions
from medsr.errors import InputError, OutputError
from medsr.eval import fidelity_report
from medsr.eval.compare import load_summary
from medsr.eval.fidelity import AE_CONFIG, FidelitySettings, evaluate, measure, run_slice
from medsr.eval.slices import EvalSlice, eval_sources, load_eval_slices, spread

#: The tiny preset's intensity window (percentiles), which its bundle declares.
PERCENTILES = (0.5, 99.5)


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return LatentSRPipeline(bundle, open_ort_sessions(bundle))


@pytest.fixture(scope="module")
def epi_slices(example4d_path):
    return load_eval_slices(eval_sources([example4d_path]), PERCENTILES, per_file=3)


def _settings(**kw):
    return FidelitySettings(model_name="tiny", consistency=("none", "kspace"), options=SamplingOptions(steps=2), **kw)


def test_ids_name_the_file_axis_and_slice_and_do_not_depend_on_other_inputs(example4d_path, tmp_path):
    alone = load_eval_slices(eval_sources([example4d_path]), PERCENTILES, per_file=3)
    other = tmp_path / "other.nii.gz"
    shutil.copyfile(example4d_path, other)
    together = load_eval_slices(eval_sources([other, example4d_path]), PERCENTILES, per_file=3)
    assert [s.id for s in alone] == ["example4d_ax2_004", "example4d_ax2_012", "example4d_ax2_020"]
    assert [s.id for s in together][3:] == [s.id for s in alone]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(alone, together[3:]))
    assert all(s.image.dtype == np.float32 and -1 <= s.image.min() and s.image.max() <= 1 for s in alone)


def test_a_2d_image_is_one_slice_named_after_its_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))).save(tmp_path / "ramp.png")
    [item] = load_eval_slices(eval_sources([tmp_path / "ramp.png"]), PERCENTILES)
    assert (item.id, item.source, item.axis, item.index, item.image.shape) == ("ramp", "ramp", -1, -1, (48, 64))


def test_directories_and_default_split_names_are_inputs(example4d_path, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copyfile(example4d_path, folder / "a.nii.gz")
    (folder / "notes.txt").write_text("not an image")
    assert [s.name for s in eval_sources([folder])] == ["a"]
    [epi] = eval_sources(["epi"])  # the held-out EPI source of medsr.data.sources, frame 0, axial
    assert epi.name == "epi" and epi.axes == (2,) and epi.frame == 0
    assert eval_sources(["epi"], axis=1)[0].axes == (1,)


def test_inputs_that_would_give_colliding_ids_or_do_not_exist_are_refused(example4d_path, tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        shutil.copyfile(example4d_path, tmp_path / sub / "scan.nii.gz")
    with pytest.raises(InputError, match="both named 'scan'"):
        eval_sources([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(InputError, match="no-such-scan"):
        eval_sources(["no-such-scan"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image file"):
        eval_sources([tmp_path / "empty"])


def test_spread_takes_the_centres_of_equal_parts():
    assert spread(list(range(10)), 3) == [1, 5, 8]
    assert spread(list(range(24)), 2) == [6, 18]
    assert spread([1, 2], 5) == [1, 2]
    with pytest.raises(InputError):
        spread([1, 2, 3], 0)


def test_autoencoder_ceiling_is_independent_of_the_latent_scaling(tiny_bundle, tmp_path, epi_slices):
    """decode(encode(HR)) must undo the manifest's scaling and shift: a bundle that only changes them gives the
    same reconstruction (the pipeline's own encode/decode, not the raw graphs with a forgotten factor)."""
    scaled = tmp_path / "scaled"
    shutil.copytree(tiny_bundle, scaled)
    manifest = json.loads((scaled / MANIFEST_NAME).read_text())
    manifest["vae"].update(scaling_factor=0.37, shift_factor=0.25)
    (scaled / MANIFEST_NAME).write_text(json.dumps(manifest))
    hr = epi_slices[1].image[:64, :48]
    results = []
    for root in (tiny_bundle, scaled):
        bundle = load_bundle(root)
        results.append(LatentSRPipeline(bundle, open_ort_sessions(bundle)).autoencode(hr[None])[0])
    sessions = open_ort_sessions(load_bundle(tiny_bundle))
    mean = sessions["vae_encoder"].run({"image": hr[None, None]})["latent_mean"]
    direct = sessions["vae_decoder"].run({"latent": mean})["image"][0, 0]
    assert results[0].shape == hr.shape and results[0].dtype == np.float32
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
    np.testing.assert_allclose(results[0], direct, atol=1e-5)


def test_run_slice_crops_to_the_scale_and_gives_every_method_the_same_lr(pipeline, epi_slices):
    item = epi_slices[1]
    odd = EvalSlice(item.id, item.source, item.path, item.axis, item.index, item.image[:50, :47])
    out = run_slice(pipeline, odd, _settings())
    assert out.hr.shape == (48, 44) and out.lr.shape == (12, 11)
    assert set(out.outputs) == {"tiny+none", "tiny+kspace", "zerofill", "bicubic", "lanczos", AE_CONFIG}
    assert all(image.shape == (48, 44) for image in out.outputs.values())
    kspace = make_degradation("kspace", 4)  # the tiny bundle names no degradation: k-space is the default
    np.testing.assert_allclose(kspace.forward(out.hr), out.lr, atol=1e-6)  # measured, unclipped
    np.testing.assert_allclose(kspace.forward(out.outputs["zerofill"]), out.lr, atol=1e-5)
    np.testing.assert_allclose(kspace.forward(out.outputs["tiny+kspace"]), out.lr, atol=1e-5)  # the measured LR
    decoded = pipeline.super_resolve(out.lr[None], SamplingOptions(steps=2, consistency="none"), first_index=item.index)
    np.testing.assert_array_equal(out.outputs["tiny+none"], decoded.images[0])  # the noise medsr-infer draws


def test_rows_carry_the_ae_ceiling_only_for_the_model(pipeline, epi_slices):
    out = run_slice(pipeline, epi_slices[0], _settings())
    rows = measure(pipeline, out, ["tiny+none", "tiny+kspace"])
    for config, row in rows.items():
        assert ("ae_psnr" in row) == config.startswith("tiny+")
        assert {"psnr", "ssim", "wavelet_psnr_cD1", "hallucination_rate", "loss_rate", "consistency_residual"} <= set(
            row
        )
        assert 0 <= row["hallucination_rate"] <= 1
    assert rows["zerofill"]["consistency_residual"] < 1e-5  # against the measured LR
    assert rows["tiny+kspace"]["consistency_residual"] < 0.05  # it matches the clipped LR the engine saw
    assert rows["tiny+none"]["ae_psnr"] == pytest.approx(rows[AE_CONFIG]["psnr"])
    assert rows[AE_CONFIG]["hallucination_rate"] <= rows["tiny+none"]["hallucination_rate"] + 0.05


def test_settings_and_ids_are_checked(pipeline, epi_slices):
    with pytest.raises(InputError, match="consistency"):
        FidelitySettings(model_name="m", consistency=("sharpen",))
    with pytest.raises(InputError, match="baseline"):
        FidelitySettings(model_name="m", consistency=("none",), baselines=("nearest",))
    twin = [epi_slices[0], epi_slices[0]]
    with pytest.raises(InputError, match="unique"):
        evaluate(pipeline, twin, _settings())


def test_report_files_follow_the_compare_schema(pipeline, epi_slices, tmp_path):
    settings = _settings(baselines=("zerofill",))
    kept = []
    result = evaluate(pipeline, epi_slices, settings, keep=kept.append)
    out = tmp_path / "fid"
    fidelity_report.prepare_output_dir(out, settings.configs, [epi_slices[0].id], overwrite=False)
    fidelity_report.write_report(out, result, "epi", {"model": "tiny"}, kept[:1])
    for config in settings.configs:
        summary = load_summary(out / fidelity_report.summary_name(config))
        assert summary.config == config and summary.dataset == "epi"
        assert list(summary.images) == [s.id for s in epi_slices]
        assert all(rec["ms_ssim"] is None for rec in summary.images.values())  # 128 x 96 < 161 px: undefined
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0].startswith("config,id,source,file,axis,index,psnr,")
    assert len(lines) == 1 + len(settings.configs) * len(epi_slices)
    assert (out / "bands.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "panels" / f"{epi_slices[0].id}.png").is_file()
    means = json.loads((out / "fidelity_tiny+kspace.json").read_text())["summary"]["means"]
    assert math.isfinite(means["psnr"]) and means["ms_ssim"] is None
    with pytest.raises(OutputError, match="--overwrite"):
        fidelity_report.prepare_output_dir(out, settings.configs, [], overwrite=False)
