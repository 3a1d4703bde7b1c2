"""One through-plane bundle that serves several factors (docs/bundle.md, ``task.scales``): the manifest field, the
bundle's view at another factor, the volume core and medsr-infer at each factor, and medsr-eval through-plane."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("scipy")
pytest.importorskip("skimage")

from click.testing import CliRunner
from manifests import DEFAULT_MANIFEST, shipped_manifest_dict
from test_eval_through_plane import _phantom
from test_eval_through_plane import _save as _save_isotropic
from test_through_plane import _noise_volume, _save

from medsr.bundle import MANIFEST_NAME, Manifest, load_bundle, read_manifest
from medsr.cli.eval import cli
from medsr.cli.infer import infer
from medsr.degrade import ThickSlicePlanes, ThickSlices
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_sessions
from medsr.engine.volume import (
    ThroughPlanePlan,
    plan_through_plane,
    prepare_input,
    super_resolve_through_plane,
    window_percentiles,
)
from medsr.errors import BundleError, InputError
from medsr.eval import thick_slices_report as report
from medsr.io.formats import load_image

SCALES = (2, 3, 4)


@pytest.fixture(scope="module")
def multi_bundle(tmp_path_factory):
    """``tiny-through-plane`` trained (here: random weights) for x2, x3 and x4, exported once for this module."""
    from medsr.export.builder import build_models
    from medsr.export.onnx import export_bundle
    from medsr.export.presets import get_preset

    preset = dataclasses.replace(get_preset("tiny-through-plane"), scales=SCALES)
    vae, unet, provenance = build_models(preset, seed=0)
    return export_bundle(vae, unet, preset, tmp_path_factory.mktemp("bundles") / "tiny-tp-multi", provenance)


@pytest.fixture(scope="module")
def pipeline(multi_bundle):
    bundle = load_bundle(multi_bundle)
    return LatentSRPipeline(bundle, open_sessions(bundle, "ort", threads=1))


# --- the manifest -------------------------------------------------------------------------------------------------


def test_the_scales_are_written_after_the_scale_and_read_back(multi_bundle):
    raw = json.loads((multi_bundle / MANIFEST_NAME).read_text())
    assert list(raw["task"])[:2] == ["scale", "scales"] and raw["task"]["scales"] == list(SCALES)
    bundle = load_bundle(multi_bundle)
    assert (bundle.scale, bundle.scales, bundle.manifest.task.scales) == (4, SCALES, SCALES)
    manifest = read_manifest(multi_bundle / MANIFEST_NAME)
    assert manifest.to_dict() == raw
    assert Manifest.from_dict(manifest.to_dict(), multi_bundle / MANIFEST_NAME) == manifest


def test_old_manifests_are_unchanged():
    """The shipped default model (no ``scales``) serves its scale alone and writes back byte for byte."""
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8")
    manifest = read_manifest(DEFAULT_MANIFEST)
    assert manifest.task.scales == (manifest.task.scale,)
    assert "scales" not in manifest.to_dict()["task"]
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text


def test_a_single_scale_through_plane_task_writes_no_scales(multi_bundle):
    task = load_bundle(multi_bundle).manifest.task
    single = dataclasses.replace(task, scales=())
    assert single.scales == (4,) and "scales" not in single.to_dict()
    assert dataclasses.replace(task, scales=(4,)) == single


def _with_scales(raw: dict, scales) -> dict:
    edited = copy.deepcopy(raw)
    edited["task"]["scales"] = scales
    return edited


@pytest.mark.parametrize(
    "scales, message",
    [
        ([2, 4, 3], r"task\.scales must be sorted and distinct, got \[2, 4, 3\]"),
        ([2, 4, 4], r"task\.scales must be sorted and distinct, got \[2, 4, 4\]"),
        ([2, 3], r"task\.scales must contain task\.scale 4, got \[2, 3\]"),
        ([1, 4], r"task\.scales\[0\] must be >= 2, got 1"),
        ([2, 4.0], r"task\.scales\[1\] must be of type int, got 4\.0"),
        ([True, 4], r"task\.scales\[0\] must be of type int, got True"),
        (4, r"task\.scales must be a list of integers, got 4"),
    ],
)
def test_bad_scales_are_refused_in_one_line(multi_bundle, scales, message):
    path = multi_bundle / MANIFEST_NAME
    raw = json.loads(path.read_text())
    with pytest.raises(BundleError, match=message) as caught:
        Manifest.from_dict(_with_scales(raw, scales), path)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_an_in_plane_task_serves_one_factor():
    with pytest.raises(BundleError, match=r"task\.scales \[2, 4\]: several factors need task\.plane 'through-plane'"):
        Manifest.from_dict(_with_scales(shipped_manifest_dict(), [2, 4]), DEFAULT_MANIFEST)
    assert Manifest.from_dict(_with_scales(shipped_manifest_dict(), [4]), DEFAULT_MANIFEST).task.scales == (4,)


# --- the bundle at another factor ---------------------------------------------------------------------------------


def test_with_scale_is_the_task_at_that_factor_with_the_fwhm_in_proportion(multi_bundle):
    bundle = load_bundle(multi_bundle)
    assert bundle.with_scale(4) is bundle
    for scale in (2, 3):
        view = bundle.with_scale(scale)
        assert (view.scale, view.factors, view.scales) == (scale, (1, scale), SCALES)
        assert view.manifest.task.degradation == ThickSlicePlanes(scale, "gaussian", float(scale))
        assert view.root == bundle.root and view.graphs == bundle.graphs
        assert dataclasses.replace(view.manifest, task=bundle.manifest.task) == bundle.manifest
    with pytest.raises(
        BundleError,
        match=r"model 'tiny-through-plane': x5 is not a factor of this model: it serves "
        r"x2, x3, x4 \(task\.scales\)",
    ):
        bundle.with_scale(5)


def test_with_scale_keeps_the_fwhm_per_slice_spacing():
    """FWHM 6 at x4 (overlapping slices, 1.5 spacings) is FWHM 3 at x2 and 9 at x6."""
    task = Manifest.from_dict(shipped_manifest_dict(), DEFAULT_MANIFEST).task
    task = dataclasses.replace(
        task,
        plane="through-plane",
        degradation=ThickSlicePlanes(4, "gaussian", 6.0),
        consistency="project",
        scales=(2, 4, 6),
    )
    assert task.with_scale(2).degradation == ThickSlicePlanes(2, "gaussian", 3.0)
    assert task.with_scale(6).degradation == ThickSlicePlanes(6, "gaussian", 9.0)
    assert task.with_scale(6).consistency == "project" and task.with_scale(6).scales == (2, 4, 6)


# --- the volume core ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
def test_the_plan_takes_every_factor_the_model_serves(tmp_path, pipeline, scale):
    volume = load_image(_save(tmp_path, _noise_volume((10, 12, 9)), [1.0, 1.0, float(scale)]), None, None, False)
    plan = plan_through_plane(volume, pipeline.bundle)
    assert (plan.axis, plan.scale, plan.output_spacing, plan.isotropic) == (2, scale, 1.0, True)
    assert plan.acquisition == ThickSlices(scale, 2, "gaussian", float(scale))
    chosen = plan_through_plane(volume, pipeline.bundle, scale=2)
    assert (chosen.scale, chosen.output_spacing) == (2, scale / 2)


def test_a_factor_the_model_does_not_serve_is_refused_naming_its_factors(tmp_path, pipeline):
    volume = load_image(_save(tmp_path, _noise_volume((10, 12, 9)), [1.0, 1.0, 5.0]), None, None, False)
    with pytest.raises(InputError) as caught:
        plan_through_plane(volume, pipeline.bundle)
    message = str(caught.value)
    assert "\n" not in message
    assert re.search(
        r"slices every 5 mm over 1 mm in-plane need x5 through-plane, but model 'tiny-through-plane' upsamples "
        r"x2, x3, x4; --through-plane-scale 2 gives 2\.5 mm; --through-plane-scale 3 gives 1\.66667 mm; "
        r"--through-plane-scale 4 gives 1\.25 mm$",
        message,
    ), message
    with pytest.raises(InputError, match=r"--through-plane-scale 6 asks for x6 through-plane, but model"):
        plan_through_plane(volume, pipeline.bundle, scale=6)


@pytest.mark.parametrize("scale", (2, 3))
def test_the_volume_core_runs_at_another_factor_of_the_model(tmp_path, pipeline, scale):
    data = _noise_volume((10, 12, 9))
    volume = load_image(_save(tmp_path, data, [1.0, 1.0, float(scale)]), None, None, False)
    plan = plan_through_plane(volume, pipeline.bundle)
    prepared = prepare_input(volume, window_percentiles(pipeline.bundle))
    result = super_resolve_through_plane(prepared, volume.affine, pipeline, plan, SamplingOptions(batch_size=8))
    assert result.data.shape == (10, 12, 9 * scale) and result.data.dtype == np.float32
    assert pipeline.bundle.scale == 4  # the caller's pipeline is left as it was
    measured = plan.acquisition.forward(result.data.astype(np.float64))
    assert np.linalg.norm(measured - data) / np.linalg.norm(data) <= 1e-5
    assert result.residuals.shape == (9,) and result.residuals.max() <= 1e-5
    # LR slice i sits on HR voxel s i + (s-1)/2 along the slice axis: the same world position
    for i in (0, 4, 8):
        hr = scale * i + (scale - 1) / 2
        np.testing.assert_allclose(result.affine @ [3, 5, hr, 1], volume.affine @ [3, 5, i, 1], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(result.affine[:3, :3], axis=0), [1.0, 1.0, 1.0], rtol=1e-12)


def test_the_volume_core_refuses_a_plan_at_a_factor_the_model_does_not_serve(tmp_path, pipeline):
    volume = load_image(_save(tmp_path, _noise_volume((10, 12, 9)), [1.0, 1.0, 5.0]), None, None, False)
    plan = ThroughPlanePlan(2, 5, 5.0, 1.0, 5.0, "the slice spacing", "gaussian")
    prepared = prepare_input(volume, window_percentiles(pipeline.bundle))
    with pytest.raises(InputError, match=r"plan x5: .*x5 is not a factor of this model: it serves x2, x3, x4"):
        super_resolve_through_plane(prepared, volume.affine, pipeline, plan, SamplingOptions())


def test_medsr_infer_names_and_records_the_factor_it_ran(tmp_path, multi_bundle, monkeypatch):
    source = _save(tmp_path, _noise_volume((10, 12, 9)), [1.0, 1.0, 3.0], "thick.nii.gz")
    monkeypatch.chdir(tmp_path)
    args = [str(source), "--model", str(multi_bundle), "--through-plane", "--engine", "ort", "--threads", "1"]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code == 0, result.output
    assert "through-plane x3 along axis 2: slices every 3 mm (3 mm thick, the slice spacing) -> 1 mm" in result.output
    sr = nib.load(tmp_path / "thick_sr3x.nii.gz")
    assert sr.shape == (10, 12, 27)
    (extension,) = [e for e in sr.header.extensions if e.get_code() == 6]
    provenance = json.loads(extension.get_content())["medsr"]
    assert provenance["scale"] == 3 and provenance["through_plane"]["scale"] == 3


# --- medsr-eval through-plane -------------------------------------------------------------------------------------


def test_the_harness_runs_the_model_at_each_of_its_factors(tmp_path, multi_bundle):
    path = _save_isotropic(tmp_path / "head.nii.gz", _phantom((24, 16, 32)))
    out = tmp_path / "out"
    args = ["through-plane", "--model", str(multi_bundle), "--data", str(path), "-o", str(out), "--no-eclare"]
    args += ["--factor", "2", "--factor", "3", "--baselines", "bspline", "--fwhm", "3"]
    result = CliRunner().invoke(cli, [*args, "--engine", "ort", "--steps", "1", "--threads", "1", "--no-figures"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert [run["factor"] for run in doc["runs"]] == [2, 3]
    for run in doc["runs"]:
        assert list(run["metrics"]) == ["tiny-through-plane", "bspline"]
        assert run["metrics"]["tiny-through-plane"]["volume"]["psnr_fg"] is not None
    assert doc["model"]["scales"] == list(SCALES)
    # FWHM 3 is the model's own at x3 (FWHM = the factor) but not at x2
    (note,) = [n for n in doc["notes"] if n.startswith("the model was made for")]
    assert "FWHM 2 at x2 HR voxels; the slices here are gaussian of FWHM 3 at x2 (" in note and "x3" not in note


def test_the_harness_defaults_to_every_factor_and_refuses_others(tmp_path, multi_bundle):
    path = _save_isotropic(tmp_path / "head.nii.gz", _phantom((24, 16, 32)))
    args = ["through-plane", "--model", str(multi_bundle), "--data", str(path), "--no-eclare", "--no-figures"]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "bad"), "--factor", "3", "--factor", "5"])
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert re.search(r"upsamples x2, x3, x4 through-plane, but --factor asks for x5; give --factor among 2, 3, 4", line)
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [*args, "-o", str(out), "--baselines", "none", "--steps", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert doc["settings"]["factors"] == list(SCALES) and [run["factor"] for run in doc["runs"]] == list(SCALES)
    assert not [n for n in doc["notes"] if n.startswith("the model was made for")]


def test_medsr_export_prebuilds_trt_plans_for_each_factor_asked_where_inference_finds_them(
    multi_bundle, tmp_path, monkeypatch
):
    """``medsr-export --trt fp32 --trt-scale 2 --trt-scale 3`` builds each graph's plan at both factors (TensorRT
    fakes: tests/trt_fakes.py); an x3 run's sessions, opened on the bundle as medsr-infer opens them and with
    building off, then find every plan of its shapes."""
    from trt_fakes import FakeCuda, fake_tensorrt

    import medsr.engine.trt as trt_module
    from medsr.cli.export import _build_trt_plans
    from medsr.engine.profiles import graph_input_shapes

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    cuda, built = FakeCuda(), []
    trt = fake_tensorrt(cuda)
    real_open = trt_module.open_trt_sessions

    def open_with_fakes(bundle, precision, profiles=None, build=True):
        sessions = real_open(bundle, precision, profiles=profiles, build=build, trt=trt, cuda=cuda)
        for graph, session in sessions.items():
            session.builder = lambda path, profile, p, g=graph: built.append((g, profile.tag)) or f"plan:{g}".encode()
        return sessions

    monkeypatch.setattr(trt_module, "open_trt_sessions", open_with_fakes)
    _build_trt_plans(multi_bundle, "fp32", 2, 16, 8, scales=(2, 3))
    bundle = load_bundle(multi_bundle)
    wanted = {
        (graph, tuple(shapes.items()))
        for scale in (2, 3)
        for graph, shapes in graph_input_shapes(bundle.with_scale(scale), 2, 16, 8).items()
    }
    assert len(built) == len(set(built)) == len(wanted)  # each distinct shape once (an LR-conditioned encoder: one)
    assert sorted(g for g, _ in built) == sorted(g for g, _ in wanted)
    sessions = open_with_fakes(bundle, "fp32", build=False)
    for graph, shapes in graph_input_shapes(bundle.with_scale(3), 2, 16, 8).items():
        sessions[graph].executor(shapes)  # loads the plan of exactly these shapes; building is off
    assert len(built) == len(wanted)  # nothing built again


def test_trt_scale_needs_trt_and_a_served_factor(tmp_path):
    from medsr.cli.export import export

    base = ["--preset", "tiny-through-plane", "--random-init", "-o", str(tmp_path / "b")]
    alone = CliRunner().invoke(export, [*base, "--trt-scale", "4"])
    assert alone.exit_code == 1 and "--trt-scale chooses the factors --trt builds plans for" in alone.output
    unserved = CliRunner().invoke(export, [*base, "--trt", "fp32", "--trt-scale", "3"])
    assert unserved.exit_code == 1 and "--trt-scale 3: preset tiny-through-plane serves x4" in unserved.output
    assert not (tmp_path / "b").exists()
