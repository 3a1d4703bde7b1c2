"""Through-plane super-resolution of thick-slice volumes (docs/conventions.md; docs/bundle.md, ``task.plane``): the
task in the manifest, the ``thick_slices`` degradation, the pipeline and tiling at 1 x s, the volume core, the
``medsr-infer --through-plane`` command and shared noise."""

from __future__ import annotations

import copy
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("scipy")

from click.testing import CliRunner
from manifests import DEFAULT_MANIFEST, shipped_manifest_dict

from medsr.bundle import MANIFEST_NAME, Manifest, load_bundle, read_manifest
from medsr.cli.infer import infer
from medsr.degrade import (
    ThickSlicePlanes,
    ThickSlices,
    apply_consistency,
    consistency_residual,
    degradation_from_dict,
    make_degradation,
    upsample_slices,
)
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.profiles import graph_input_shapes
from medsr.engine.sessions import open_sessions
from medsr.engine.volume import plan_through_plane, prepare_input, super_resolve_through_plane, window_percentiles
from medsr.errors import BundleError, InputError
from medsr.io.formats import load_image


@pytest.fixture(scope="module")
def pipeline(through_bundle):
    bundle = load_bundle(through_bundle)
    return LatentSRPipeline(bundle, open_sessions(bundle, "ort", threads=1))


def _save(tmp_path, data, zooms, name="vol.nii.gz", rotation=None):
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag(zooms)
    affine[:3, 3] = [-20.0, 12.5, 7.0]
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)
    return path


def _noise_volume(shape, seed=0):
    return 100 + np.random.default_rng(seed).normal(0, 20, shape)


# --- the manifest -------------------------------------------------------------------------------------------------


def test_the_exported_bundle_is_a_through_plane_task(through_bundle):
    bundle = load_bundle(through_bundle)
    task = bundle.manifest.task
    assert (task.plane, bundle.plane, bundle.factors, task.consistency) == (
        "through-plane",
        "through-plane",
        (1, 4),
        "project",
    )
    assert task.degradation == ThickSlicePlanes(4, profile="gaussian", fwhm=4.0)
    text = (through_bundle / MANIFEST_NAME).read_text()
    assert json.loads(text)["task"]["plane"] == "through-plane"
    assert bundle.manifest.to_dict() == json.loads(text)


def test_old_manifests_stay_in_plane():
    d = shipped_manifest_dict()
    assert "plane" not in d["task"]
    manifest = read_manifest(DEFAULT_MANIFEST)
    assert (manifest.task.plane, manifest.task.factors) == ("in-plane", (4, 4))
    assert "plane" not in manifest.to_dict()["task"]  # in-plane is the default and written as before
    d["task"]["plane"] = "in-plane"
    assert Manifest.from_dict(d, DEFAULT_MANIFEST).task == manifest.task


def _edit(path, value):
    def edit(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        if value is None:
            m.pop(last)
        else:
            m[last] = value

    return edit


THICK = {"name": "thick_slices", "scale": 4, "profile": "gaussian", "fwhm": 4.0}
BAD_THROUGH_PLANE = [
    (_edit("task.plane", "through"), r"task\.plane must be one of \('in-plane', 'through-plane'\), got 'through'"),
    (_edit("task.plane", None), r"task\.degradation 'thick_slices' does not fit task\.plane 'in-plane', which takes"),
    (
        _edit("task.degradation", {"name": "kspace", "scale": 4}),
        r"task\.degradation 'kspace' does not fit task\.plane 'through-plane', which takes thick_slices",
    ),
    (_edit("task.degradation", None), r"task\.degradation is required with task\.plane 'through-plane'"),
    (_edit("task.consistency", "kspace"), r"consistency 'kspace' needs the 'kspace' degradation.*use 'project'"),
    (_edit("task.degradation", {**THICK, "scale": 3}), r"task\.degradation\.scale must be task\.scale 4, got 3"),
    (_edit("task.degradation", {**THICK, "profile": "sinc"}), r"task\.degradation: slice profile must be one of"),
    (_edit("task.degradation", {**THICK, "fwhm": -1}), r"task\.degradation: slice fwhm must be a finite number > 0"),
    (_edit("task.degradation", {**THICK, "sigma": 1}), r"task\.degradation: .*unknown \['sigma'\]"),
    (
        lambda m: m["denoiser"].update(conditioning="upsampled_latent_concat", upsampler="zerofill"),
        r"denoiser\.upsampler 'zerofill' does not fit task\.plane 'through-plane', which takes linear, bspline, sinc",
    ),
]


@pytest.mark.parametrize("edit, message", BAD_THROUGH_PLANE)
def test_bad_through_plane_manifests_are_refused_naming_the_field(through_bundle, edit, message):
    d = copy.deepcopy(json.loads((through_bundle / MANIFEST_NAME).read_text()))
    edit(d)
    with pytest.raises(BundleError, match=message):
        Manifest.from_dict(d, through_bundle / MANIFEST_NAME)


def test_in_plane_manifests_refuse_the_through_plane_parts():
    d = shipped_manifest_dict()
    d["task"]["consistency"] = "project"
    with pytest.raises(BundleError, match=r"consistency 'project' needs the 'thick_slices' degradation.*'kspace'"):
        Manifest.from_dict(d, DEFAULT_MANIFEST)
    d = shipped_manifest_dict()
    d["denoiser"]["upsampler"] = "bspline"
    with pytest.raises(BundleError, match=r"denoiser\.upsampler 'bspline' does not fit task\.plane 'in-plane'"):
        Manifest.from_dict(d, DEFAULT_MANIFEST)


def test_a_slice_upsampler_conditions_a_through_plane_task(through_bundle, pipeline):
    d = json.loads((through_bundle / MANIFEST_NAME).read_text())
    d["denoiser"].update(conditioning="upsampled_latent_concat", upsampler="bspline")
    conditioning = Manifest.from_dict(d, through_bundle / MANIFEST_NAME).denoiser.conditioning
    lr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 6))
    assert conditioning.image(lr, 4).shape == (2, 8, 24)  # only the slice direction (the last axis) is upsampled
    assert conditioning.zooms((1, 4)) == (1, 4)
    assert pipeline.conditioning.zooms((1, 4)) == (1, 1)


# --- the degradation ----------------------------------------------------------------------------------------------


def test_thick_slices_are_a_registered_degradation_of_the_planes_second_axis():
    op = make_degradation("thick_slices", 5, profile="box")
    assert op == degradation_from_dict(op.to_dict()) and op.to_dict() == {
        "name": "thick_slices",
        "scale": 5,
        "profile": "box",
        "fwhm": 5.0,
    }
    assert op.factors == (1, 5)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(3, 7, 20)), rng.normal(size=(3, 7, 4))
    assert op.forward(x).shape == (3, 7, 4)
    np.testing.assert_allclose(np.sum(op.forward(x) * y), np.sum(x * op.adjoint(y)), rtol=1e-12)
    np.testing.assert_allclose(op.forward(x), ThickSlices(5, -1, "box").forward(x))
    projected = apply_consistency(x, y, "project", op)
    assert consistency_residual(projected, y, op).max() < 1e-12
    with pytest.raises(InputError, match="thick_slices scale must be an integer >= 2"):
        make_degradation("thick_slices", 1)


def test_training_crops_of_a_through_plane_task_are_its_thick_slices():
    from medsr.data.pairs import Slice, random_crop_pairs

    image = np.random.default_rng(5).uniform(-1, 1, (40, 48)).astype(np.float32)
    op = ThickSlicePlanes(4, fwhm=3.0)
    slices = [Slice("s", "mri", 0, 0, image)]
    rng = np.random.default_rng(0)
    hr, lr, up = random_crop_pairs(slices, 3, 16, 4, rng, augment=False, upsampler="bspline", degradation=op)
    assert (hr.shape, lr.shape, up.shape) == ((3, 16, 16), (3, 16, 4), (3, 16, 16))
    whole = op.forward(image)
    upsampled = upsample_slices(np.clip(whole, -1, 1), 4, axis=-1, method="bspline")
    for n in range(3):  # each LR crop is the crop of the whole slice's thick slices, at (i, 4 j) in HR
        i, j = np.argwhere(np.all(np.isclose(_windows(whole, lr.shape[1:]), lr[n]), axis=(-2, -1)))[0]
        np.testing.assert_array_equal(hr[n], image[i : i + 16, 4 * j : 4 * j + 16])
        np.testing.assert_array_equal(up[n], upsampled[i : i + 16, 4 * j : 4 * j + 16])


def _windows(array, shape):
    return np.lib.stride_tricks.sliding_window_view(array, shape)


# --- shapes -------------------------------------------------------------------------------------------------------


def test_the_pipeline_upsamples_the_planes_second_axis_only(pipeline):
    lr = np.random.default_rng(2).uniform(-1, 1, (3, 12, 9)).astype(np.float32)
    result = pipeline.super_resolve(lr, SamplingOptions(batch_size=2))
    assert result.images.shape == (3, 12, 36)
    assert result.residuals.max() < 1e-5  # the bundle's consistency, "project", per plane
    tiled = pipeline.super_resolve(lr, SamplingOptions(batch_size=2, tile_size=8, tile_overlap=0))
    assert tiled.images.shape == (3, 12, 36) and tiled.residuals.max() < 1e-5
    shapes = graph_input_shapes(pipeline.bundle, 2, 12, 9)  # padded to 16 x 16 LR (lr_multiple 8)
    assert shapes["vae_encoder"]["image"] == (2, 1, 16, 16)
    assert shapes["denoiser"]["sample"] == shapes["vae_decoder"]["latent"] == (2, 4, 4, 16)
    assert shapes["denoiser"]["lr_latent"] == (2, 4, 4, 4)


def test_the_pipeline_encodes_a_slice_upsampler_at_1_x_s(pipeline):
    """The exported graph upsamples its conditioning latent to the sample's size, so the same graphs also run the
    upsampled conditioning, where that latent already has the sample's size."""
    from medsr.bundle import Bundle
    from medsr.bundle.conditioning import UPSAMPLED, Conditioning

    manifest = pipeline.bundle.manifest
    denoiser = dataclasses.replace(manifest.denoiser, conditioning=Conditioning(UPSAMPLED, "bspline"))
    bundle = Bundle(pipeline.bundle.root, dataclasses.replace(manifest, denoiser=denoiser))
    upsampled = LatentSRPipeline(bundle, pipeline.sessions)
    lr = np.random.default_rng(6).uniform(-1, 1, (2, 12, 9)).astype(np.float32)
    for tile_size in (None, 8):
        result = upsampled.super_resolve(lr, SamplingOptions(tile_size=tile_size, tile_overlap=0))
        assert result.images.shape == (2, 12, 36) and result.residuals.max() < 1e-5
    shapes = graph_input_shapes(bundle, 1, 12, 9)
    assert shapes["vae_encoder"]["image"] == (1, 1, 16, 64) and shapes["denoiser"]["lr_latent"] == (1, 4, 4, 16)


def test_a_tile_the_size_of_the_plane_gives_the_untiled_result(pipeline):
    lr = np.random.default_rng(3).uniform(-1, 1, (2, 16, 16)).astype(np.float32)
    untiled = pipeline.super_resolve(lr, SamplingOptions(tile_size=None, consistency="none"))
    tiled = pipeline.super_resolve(lr, SamplingOptions(tile_size=8, tile_overlap=0, consistency="none"))
    assert tiled.images.shape == untiled.images.shape == (2, 16, 64)
    single = pipeline.super_resolve(lr, SamplingOptions(tile_size=16, consistency="none"))
    np.testing.assert_array_equal(single.images, untiled.images)


def test_the_volume_core_reproduces_the_measured_slices(tmp_path, through_bundle, pipeline):
    data = _noise_volume((10, 12, 9))
    volume = load_image(_save(tmp_path, data, [1.0, 1.0, 4.0]), None, None, False)
    plan = plan_through_plane(volume, pipeline.bundle, thickness=3.0)
    assert (plan.axis, plan.scale, plan.output_spacing, plan.thickness_source) == (2, 4, 1.0, "--slice-thickness")
    assert plan.acquisition == ThickSlices(4, 2, "gaussian", 3.0)
    prepared = prepare_input(volume, window_percentiles(pipeline.bundle))
    result = super_resolve_through_plane(prepared, volume.affine, pipeline, plan, SamplingOptions())
    assert result.data.shape == (10, 12, 36) and result.data.dtype == np.float32
    assert result.slices == 10 + 12 and result.residuals.shape == (9,)
    measured = plan.acquisition.forward(result.data.astype(np.float64))
    assert np.linalg.norm(measured - data) / np.linalg.norm(data) < 1e-5
    assert result.residuals.max() < 1e-5
    # LR slice i sits on HR voxel 4 i + 1.5 along the slice axis: the same world position
    np.testing.assert_allclose(result.affine @ [3, 5, 4 * 2 + 1.5, 1], volume.affine @ [3, 5, 2, 1], atol=1e-12)


# --- the command --------------------------------------------------------------------------------------------------


def _world_centroid(image: nib.Nifti1Image, near: np.ndarray, sigma_mm: float = 4.0) -> np.ndarray:
    """World centroid (mm) of a volume above its median within 12 mm of ``near``, after a Gaussian blur of
    ``sigma_mm``: what consistency with the measured slices pins, so detail a random model invents cannot move it,
    while a slice grid off by (s-1)/2 HR voxels would (1.5 mm here)."""
    from scipy.ndimage import gaussian_filter

    data = image.get_fdata()
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    blurred = gaussian_filter(data, sigma=sigma_mm / spacing, mode="nearest")
    index = np.stack(np.indices(data.shape), axis=-1).astype(np.float64)
    world = nib.affines.apply_affine(image.affine, index)
    inside = np.linalg.norm(world - near, axis=-1) < 12.0
    weights = np.where(inside, np.clip(blurred - np.median(blurred), 0, None), 0.0)
    return (weights[..., None] * world).sum(axis=(0, 1, 2)) / weights.sum()


def test_a_blob_keeps_its_world_position_through_medsr_infer(tmp_path, through_bundle):
    shape, centre = (24, 28, 10), np.array([11.3, 13.6, 4.4])  # voxels of 1 x 1 x 4 mm
    index = np.indices(shape).astype(np.float64)
    zooms = np.array([1.0, 1.0, 4.0])
    offset = (index - centre[:, None, None, None]) * zooms[:, None, None, None]
    blob = np.exp(-np.sum(offset**2, axis=0) / (2 * 4.0**2))
    data = 100 + 800 * blob + np.random.default_rng(0).normal(0, 2, shape)
    rotation = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])  # oblique
    source = _save(tmp_path, data, zooms, "blob.nii.gz", rotation)
    out = tmp_path / "blob_sr.nii.gz"
    args = [str(source), "-o", str(out), "--through-plane", "--model", str(through_bundle), "--noise", "shared"]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code == 0, result.output
    assert "through-plane x4 along axis 2: slices every 4 mm (4 mm thick, the slice spacing) -> 1 mm" in result.output
    sr = nib.load(out)
    assert sr.shape == (24, 28, 40)
    np.testing.assert_allclose(sr.header.get_zooms(), (1.0, 1.0, 1.0), rtol=1e-6)
    near = nib.affines.apply_affine(sr.affine, [11.3, 13.6, 4 * 4.4 + 1.5])
    np.testing.assert_allclose(near, nib.affines.apply_affine(nib.load(source).affine, centre), atol=1e-9)
    before, after = _world_centroid(nib.load(source), near), _world_centroid(sr, near)
    assert np.linalg.norm(after - before) < 0.1  # mm
    measured = ThickSlices(4, 2, "gaussian", 4.0).forward(sr.get_fdata())
    assert np.linalg.norm(measured - data) / np.linalg.norm(data) < 1e-5


def test_a_factor_that_is_not_isotropic_is_said_so(tmp_path, through_bundle):
    source = _save(tmp_path, _noise_volume((16, 16, 8)), [0.9, 0.9, 5.0])
    out = tmp_path / "out.nii.gz"
    args = [str(source), "-o", str(out), "--through-plane", "--model", str(through_bundle)]
    result = CliRunner().invoke(infer, [*args, "--through-plane-scale", "4", "--slice-thickness", "3"])
    assert result.exit_code == 0, result.output
    assert "slices every 5 mm (3 mm thick, --slice-thickness) -> 1.25 mm, not isotropic (in-plane 0.9 mm)" in (
        result.output
    )
    assert nib.load(out).shape == (16, 16, 32)


def test_a_dicom_series_uses_its_slice_thickness_and_is_written_as_nifti(tmp_path, through_bundle):
    from io_fixtures import write_series

    def thickness(ds, k):
        ds.SliceThickness = "3"

    positions = [(0.0, 0.0, 4.0 * k) for k in range(8)]
    series = write_series(tmp_path / "series", positions, spacing=(1.0, 1.0), modify=thickness)
    args = [str(series), "--through-plane", "--model", str(through_bundle)]
    result = CliRunner().invoke(infer, [*args, "-o", str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 0, result.output
    assert "slices every 4 mm (3 mm thick, DICOM SliceThickness) -> 1 mm" in result.output
    assert nib.load(tmp_path / "out.nii.gz").shape == (16, 16, 32)
    result = CliRunner().invoke(infer, [*args, "-o", str(tmp_path / "dicom_out"), "--format", "dicom"])
    assert result.exit_code != 0
    assert "--through-plane makes new slices, but DICOM output keeps the acquired ones; write NIfTI" in result.output


REFUSALS = [
    ([1.0, 1.0, 1.2], r"not anisotropic enough for --through-plane: slices every 1\.2 mm over 1 mm in-plane make x1"),
    ([1.0, 1.0, 3.0], r"need x3 through-plane, but model 'tiny-through-plane' upsamples x4; --through-plane-scale 4"),
]


@pytest.mark.parametrize("zooms, message", REFUSALS)
def test_unsuitable_volumes_are_refused_in_one_line(tmp_path, through_bundle, zooms, message):
    import re

    source = _save(tmp_path, _noise_volume((16, 16, 8)), zooms)
    args = [str(source), "-o", str(tmp_path / "out.nii.gz"), "--through-plane", "--model", str(through_bundle)]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code != 0
    assert re.search(message, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_bundle_of_the_other_task_is_refused_naming_both(tmp_path, through_bundle, tiny_bundle):
    source = _save(tmp_path, _noise_volume((16, 16, 8)), [1.0, 1.0, 4.0])
    out = str(tmp_path / "out.nii.gz")
    result = CliRunner().invoke(infer, [str(source), "-o", out, "--through-plane", "--model", str(tiny_bundle)])
    assert result.exit_code != 0
    assert "model 'tiny' is in-plane (task.plane), but this run is through-plane" in result.output
    result = CliRunner().invoke(infer, [str(source), "-o", out, "--model", str(through_bundle)])
    assert result.exit_code != 0
    expected = (
        "model 'tiny-through-plane' is through-plane (task.plane), but this run is in-plane; run it with medsr-infer "
        "--through-plane"
    )
    assert expected in result.output


def test_without_model_through_plane_runs_the_bundled_through_plane_model(tmp_path, monkeypatch):
    import medsr.models

    source = _save(tmp_path, _noise_volume((16, 16, 8)), [1.0, 1.0, 4.0])
    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(infer, [str(source), "-o", str(out), "--through-plane", "--engine", "ort"])
    assert result.exit_code == 0, result.output
    (extension,) = [e for e in nib.load(out).header.extensions if e.get_code() == 6]
    assert json.loads(extension.get_content())["medsr"]["model"] == "through-plane"
    monkeypatch.setattr(medsr.models, "THROUGH_PLANE_BUNDLE", tmp_path / "absent")
    result = CliRunner().invoke(infer, [str(source), "-o", str(tmp_path / "b.nii.gz"), "--through-plane"])
    assert result.exit_code != 0
    assert "no through-plane model is bundled with this installation; pass --model BUNDLE" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_fidelity_harness_refuses_a_through_plane_model(pipeline):
    from medsr.eval.fidelity import FidelitySettings, evaluate

    with pytest.raises(InputError, match="model 'tiny-through-plane' is through-plane .*, but this run is in-plane"):
        evaluate(pipeline, [], FidelitySettings("tp", ("project",)))


# --- shared noise -------------------------------------------------------------------------------------------------


def test_shared_noise_is_one_field_for_every_plane_of_a_stack():
    shared = SamplingOptions(seed=7, noise="shared")
    draws = [rng.standard_normal(5) for rng in shared.generators([0, 1, 9], stack=1)]
    np.testing.assert_array_equal(draws[0], draws[1])
    np.testing.assert_array_equal(draws[0], draws[2])
    np.testing.assert_array_equal(draws[0], np.random.default_rng([7, 1]).standard_normal(5))
    other = shared.generators([0], stack=0)[0].standard_normal(5)
    assert not np.array_equal(draws[0], other)
    per_plane = [rng.standard_normal(5) for rng in SamplingOptions(seed=7).generators([3, 4])]
    np.testing.assert_array_equal(per_plane[0], np.random.default_rng([7, 3]).standard_normal(5))
    assert not np.array_equal(per_plane[0], per_plane[1])
    with pytest.raises(InputError, match="noise must be one of per-plane, shared"):
        SamplingOptions(noise="global")


@pytest.mark.parametrize("tile_size", [None, 8])
def test_shared_noise_gives_identical_planes_whatever_the_batch(pipeline, tile_size):
    plane = np.random.default_rng(4).uniform(-1, 1, (1, 12, 12)).astype(np.float32)
    lr = np.repeat(plane, 3, axis=0)
    options = SamplingOptions(noise="shared", consistency="none", tile_size=tile_size, tile_overlap=0)
    one = pipeline.super_resolve(lr, dataclasses.replace(options, batch_size=1), first_index=5, stack=1).images
    three = pipeline.super_resolve(lr, dataclasses.replace(options, batch_size=3), stack=1).images
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(one[0], one[1])
    np.testing.assert_array_equal(one[0], one[2])
    per_plane = pipeline.super_resolve(lr, dataclasses.replace(options, noise="per-plane")).images
    assert not np.array_equal(per_plane[0], per_plane[1])


def test_long_thin_planes_run_whole_and_only_a_long_sr_side_tiles(pipeline, monkeypatch):
    """Through-plane planes are long along their first axis, which is not upsampled: a 200 x 16 plane at x4
    (200 x 64) runs whole under the default tile size of 128 LR pixels, because the SR sides are compared with
    128 x 4; a plane whose SR has a side over 512 runs in tiles."""
    import medsr.engine.pipeline as pipeline_module

    tiled = []
    original = pipeline_module.super_resolve_tiled
    monkeypatch.setattr(pipeline_module, "super_resolve_tiled", lambda *a, **k: tiled.append(1) or original(*a, **k))
    planes = np.random.default_rng(0).uniform(-1, 1, (2, 200, 16)).astype(np.float32)
    whole = pipeline.super_resolve(planes, SamplingOptions(tile_size=None, consistency="none"))
    default = pipeline.super_resolve(planes, SamplingOptions(consistency="none"))
    assert not tiled
    np.testing.assert_array_equal(default.images, whole.images)
    pipeline.super_resolve(np.zeros((1, 16, 136), np.float32), SamplingOptions(consistency="none"))
    assert tiled  # 16 x 544 SR: a side over 128 x 4


def test_the_memory_limit_counts_the_through_plane_output_growing_along_one_axis(tmp_path, through_bundle):
    """16 x 16 x 8 voxels at x4 through-plane make 8192 output voxels, not the 32768 of x4 in-plane: a limit between
    the two estimates runs it, one under the smaller is refused in one line and writes nothing."""
    from medsr.io.limits import MemoryLimit

    shape = (16, 16, 8)
    through, in_plane = MemoryLimit(0, 4, axes=1).estimate(shape), MemoryLimit(0, 4).estimate(shape)
    assert through < in_plane
    source = _save(tmp_path, _noise_volume(shape), [1.0, 1.0, 4.0])
    args = [str(source), "--through-plane", "--model", str(through_bundle), "--through-plane-scale", "4"]
    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(infer, [*args, "-o", str(out), "--max-memory", str((through + in_plane) // 2)])
    assert result.exit_code == 0, result.output
    refused = tmp_path / "refused.nii.gz"
    result = CliRunner().invoke(infer, [*args, "-o", str(refused), "--max-memory", str(through - 1)])
    assert result.exit_code == 1 and not refused.exists()
    assert f"{source}: image of 16x16x8 voxels needs about" in result.output and "x4" in result.output
