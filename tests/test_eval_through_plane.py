"""``medsr-eval through-plane``: thick slices simulated from isotropic volumes, the slice-axis baselines, a
through-plane model through the volume core of medsr-infer, and the 3D metrics (medsr.eval.thick_slices)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("skimage")

from click.testing import CliRunner
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medsr.cli.eval import cli
from medsr.cli.infer import infer
from medsr.degrade import ThickSlices, upsample_slices
from medsr.errors import InputError
from medsr.eval import thick_slices as ts
from medsr.eval import thick_slices_report as report


def _phantom(shape=(28, 24, 24), seed=0):
    """A smooth random 'head': a bright ellipsoid of smoothed noise in a dark background, float32."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    inside = np.sum(grid**2 / 0.8**2, axis=0) < 1
    texture = gaussian_filter(rng.normal(size=shape), 1.5)
    return np.where(inside, 100 + 400 * texture, 2.0 * rng.random(shape)).astype(np.float32)


def _truth(data, name="phantom"):
    return ts.TruthVolume(name, Path(f"{name}.nii.gz"), np.asarray(data, np.float32), np.eye(4))


def _range(x):
    low, high = np.percentile(np.asarray(x, np.float64), (0.5, 99.5))
    return high - low


# --- the metrics against hand-computed values ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "bspline", "sinc"])
def test_baseline_psnr_is_skimage_on_the_simulated_thick_slices(method):
    truth = _phantom()
    settings = ts.ThickSliceSettings(factors=(4,), axis=2, baselines=(method,), eclare=False)
    run = ts.run_factor(_truth(truth), 4, settings)
    lr = ThickSlices(4, 2, "gaussian", 4.0).forward(truth)
    np.testing.assert_array_equal(run.lr, lr.astype(np.float32))
    expected = upsample_slices(lr, 4, axis=2, method=method).astype(np.float32)
    peak = _range(truth)
    row = run.metrics[method]["volume"]
    assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(truth, expected, data_range=peak), rel=1e-9)
    mask = run.mask
    hand = 10 * np.log10(peak**2 / np.mean((expected[mask].astype(np.float64) - truth[mask]) ** 2))
    assert row["psnr_fg"] == pytest.approx(hand, rel=1e-6)
    ssim = structural_similarity(
        truth.astype(np.float64),
        expected.astype(np.float64),
        data_range=peak,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert row["ssim"] == pytest.approx(ssim, rel=1e-9)
    assert run.seconds[method] >= 0 and run.shape == truth.shape


def test_crops_to_a_multiple_of_the_factor_along_the_slice_axis_only():
    truth = _phantom((28, 24, 26))
    run = ts.run_factor(_truth(truth), 4, ts.ThickSliceSettings(factors=(4,), eclare=False))
    assert run.shape == (28, 24, 24) and run.lr.shape == (28, 24, 6)
    np.testing.assert_array_equal(run.truth, truth[:, :, 1:25])
    _, affine = ts.crop_to_multiple(truth, np.eye(4), 2, 4)
    assert affine[2, 3] == 1.0  # the crop's first voxel was voxel 1


def test_a_volume_constant_along_the_slice_axis_is_reproduced_by_every_baseline():
    plane = _phantom((28, 24, 1))
    truth = np.repeat(plane, 24, axis=2)
    settings = ts.ThickSliceSettings(factors=(3,), axis=2, profile="box", eclare=False)
    run = ts.run_factor(_truth(truth), 3, settings)
    for method in ("linear", "bspline", "sinc"):
        row = run.metrics[method]
        assert row["volume"]["psnr"] > 100 or math.isinf(row["volume"]["psnr"])
        assert row["continuity_error"] < 1e-6


def test_the_foreground_mask_is_the_filled_otsu_foreground():
    shape = (30, 30, 30)
    grid = np.stack(np.meshgrid(*(np.arange(n) - 14.5 for n in shape), indexing="ij"))
    radius = np.sqrt(np.sum(grid**2, axis=0))
    sphere = radius < 10
    volume = np.where(sphere, 100.0, 1.0)
    volume[radius < 3] = 1.0  # a dark hole inside (a ventricle): filled
    mask = ts.foreground_mask(volume)
    np.testing.assert_array_equal(mask, sphere)
    with pytest.raises(InputError, match="constant"):
        ts.foreground_mask(np.ones(shape))


def test_per_orientation_metrics_are_means_over_the_foreground_planes():
    truth = _phantom().astype(np.float64)
    pred = truth + np.random.default_rng(3).normal(0, 5, truth.shape)
    mask = ts.foreground_mask(truth)
    peak = _range(truth)
    metrics = ts.volume_metrics(pred, truth, mask, peak, slice_axis=2)
    assert set(metrics) == {"volume", "orientations", "continuity_error", "continuity_ratio", "continuity_profile"}
    assert list(metrics["orientations"]) == ["axial", "sagittal", "coronal"]
    for name, axis in (("axial", 2), ("sagittal", 0), ("coronal", 1)):
        row = metrics["orientations"][name]
        assert set(row) == {"psnr", "ssim", "psnr_fg", "ssim_fg", "planes"}
        kept = [i for i in range(truth.shape[axis]) if np.take(mask, i, axis).mean() >= ts.PLANE_FOREGROUND]
        assert row["planes"] == len(kept) > 0
        psnr_fg = [
            peak_signal_noise_ratio(
                np.take(truth, i, axis)[np.take(mask, i, axis)],
                np.take(pred, i, axis)[np.take(mask, i, axis)],
                data_range=peak,
            )
            for i in kept
        ]
        assert row["psnr_fg"] == pytest.approx(np.mean(psnr_fg), rel=1e-9)
        ssim = [
            structural_similarity(
                np.take(truth, i, axis),
                np.take(pred, i, axis),
                data_range=peak,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for i in kept
        ]
        assert row["ssim"] == pytest.approx(np.mean(ssim), rel=1e-9)
        assert 0 < row["ssim_fg"] < 1
    assert metrics["continuity_profile"].shape == (truth.shape[2] - 1,)


def test_the_truth_against_itself_is_perfect_and_continuous():
    truth = _phantom()
    mask = ts.foreground_mask(truth)
    metrics = ts.volume_metrics(truth, truth, mask, _range(truth), slice_axis=2)
    assert metrics["continuity_error"] == 0.0 and metrics["continuity_ratio"] == 1.0
    assert math.isinf(metrics["volume"]["psnr"]) and math.isinf(metrics["volume"]["psnr_fg"])
    assert metrics["volume"]["ssim"] == pytest.approx(1.0) and metrics["volume"]["ssim_fg"] == pytest.approx(1.0)
    for row in metrics["orientations"].values():
        assert row["ssim_fg"] == pytest.approx(1.0)


def test_plane_differences_by_hand():
    v = np.zeros((2, 1, 3))
    v[:, 0, 1] = [1.0, 3.0]
    v[:, 0, 2] = [1.0, 3.0]
    np.testing.assert_allclose(ts.plane_differences(v, 2), [2.0, 0.0])
    mask = np.zeros(v.shape, bool)
    mask[0, 0, :] = True  # only voxel x = 0 is foreground: |1 - 0|, |1 - 1|
    np.testing.assert_allclose(ts.plane_differences(v, 2, mask), [1.0, 0.0])


def test_orientations_follow_the_affine():
    assert ts.orientation_axes(np.eye(4)) == {"axial": 2, "sagittal": 0, "coronal": 1}
    swapped = np.eye(4)[[2, 0, 1, 3]]  # world x <- voxel axis 2, y <- 0, z <- 1
    assert ts.orientation_axes(swapped) == {"axial": 1, "sagittal": 2, "coronal": 0}


def test_settings_refuse_factors_out_of_range_and_unknown_baselines():
    with pytest.raises(InputError, match="factors must be integers in 2..6"):
        ts.ThickSliceSettings(factors=(7,))
    with pytest.raises(InputError, match="unknown slice baseline"):
        ts.ThickSliceSettings(baselines=("cubic",))
    with pytest.raises(InputError, match="slice fwhm must be"):
        ts.ThickSliceSettings(fwhm=-1.0)


def test_eclare_is_skipped_with_a_line_when_not_on_path(monkeypatch):
    monkeypatch.setattr(ts, "eclare_available", lambda: None)
    settings = ts.ThickSliceSettings(eclare=None)
    assert ts.eclare_note(settings) == "ECLARE skipped: run-eclare is not on PATH (pip install eclare)"
    assert ts.ECLARE not in ts.methods_of(settings, None)


# --- the command --------------------------------------------------------------------------------------------------


def _save(path, data, zoom=1.0):
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 2.5]
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)
    return path


def test_the_baselines_run_end_to_end_and_refuse_to_overwrite(tmp_path):
    path = _save(tmp_path / "head.nii.gz", _phantom((28, 24, 24)))
    out = tmp_path / "out"
    args = ["through-plane", "--data", str(path), "-o", str(out), "--factor", "2", "--factor", "3", "--no-eclare"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "ECLARE skipped: --no-eclare" in result.output
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert [(r["factor"], list(r["metrics"])) for r in doc["runs"]] == [
        (2, ["linear", "bspline", "sinc"]),
        (3, ["linear", "bspline", "sinc"]),
    ]
    assert doc["runs"][1]["shape"] == [28, 24, 24] and doc["runs"][1]["lr_shape"] == [28, 24, 8]
    assert len(doc["runs"][0]["continuity_profiles"]["truth"]) == 23
    table = (out / report.MARKDOWN_NAME).read_text()
    assert "| head | x3 | bspline |" in table
    for folder in (report.PANELS_DIR, report.CONTINUITY_DIR):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["head_x2.png", "head_x3.png"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "pass --overwrite to replace" in again.output
    assert len(again.output.strip().splitlines()) == 1


def test_a_random_weight_through_plane_bundle_runs_end_to_end(tmp_path, through_bundle):
    path = _save(tmp_path / "head.nii.gz", _phantom((24, 16, 32)))
    out = tmp_path / "out"
    args = ["through-plane", "--model", str(through_bundle), "--data", str(path), "-o", str(out), "--no-eclare"]
    result = CliRunner().invoke(cli, [*args, "--engine", "ort", "--steps", "1", "--threads", "1", "--no-figures"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / report.JSON_NAME).read_text())
    (run,) = doc["runs"]
    assert run["factor"] == 4 and list(run["metrics"]) == ["tiny-through-plane", "linear", "bspline", "sinc"]
    assert doc["model"]["engine"].startswith("ort") and doc["model"]["consistency"] == "project"
    row = run["metrics"]["tiny-through-plane"]
    assert set(row["orientations"]) == {"axial", "sagittal", "coronal"} and row["volume"]["psnr_fg"] is not None
    assert run["seconds_per_volume"]["tiny-through-plane"] > 0
    assert not (out / report.PANELS_DIR).exists()


def test_the_model_output_is_the_volume_core_of_medsr_infer(tmp_path, through_bundle):
    """The same thick slices through medsr-infer --through-plane give the very volume the harness measured."""
    from medsr.bundle import load_bundle
    from medsr.engine.jobs import EngineOptions
    from medsr.engine.pipeline import SamplingOptions

    bundle = load_bundle(through_bundle)
    pipeline = EngineOptions(engine="ort", threads=1).open(bundle)
    runner = ts.through_plane_runner(pipeline, SamplingOptions(steps=1, batch_size=8))
    truth = _phantom((24, 16, 32))
    run = ts.run_factor(_truth(truth), 4, ts.ThickSliceSettings(factors=(4,), baselines=(), eclare=False), runner)
    lr_path = tmp_path / "lr.nii.gz"
    nib.save(nib.Nifti1Image(run.lr, ts.lr_affine_of(np.eye(4), 2, 4)), lr_path)

    sr_path = tmp_path / "sr.nii.gz"
    result = CliRunner().invoke(
        infer,
        [
            str(lr_path),
            "-o",
            str(sr_path),
            "--model",
            str(through_bundle),
            "--through-plane",
            "--engine",
            "ort",
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(nib.load(sr_path).get_fdata(), run.outputs[bundle.name], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "IN_PLANE"], r"is in-plane \(task\.plane\), but this run is through-plane"),
        (["--model", "THROUGH", "--factor", "3"], r"upsamples x4 through-plane, but --factor asks for x3"),
    ],
)
def test_refusals_are_one_line(tmp_path, through_bundle, extra, message):
    from medsr.models import DEFAULT_BUNDLE

    path = _save(tmp_path / "head.nii.gz", _phantom((24, 16, 32)))
    extra = [{"IN_PLANE": str(DEFAULT_BUNDLE), "THROUGH": str(through_bundle)}.get(a, a) for a in extra]
    result = CliRunner().invoke(cli, ["through-plane", "--data", str(path), "-o", str(tmp_path / "o"), *extra])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()


def test_an_anisotropic_volume_is_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    path = tmp_path / "thick.nii.gz"
    nib.save(nib.Nifti1Image(_phantom((24, 16, 32)), affine), path)
    result = CliRunner().invoke(cli, ["through-plane", "--data", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "not isotropic" in result.output


FAKE_ECLARE = """#!{python}
import argparse, pathlib, nibabel as nib, numpy as np
parser = argparse.ArgumentParser()
parser.add_argument("--in-fpath")
parser.add_argument("--out-dir")
parser.add_argument("--gpu-id", default="0")
args = parser.parse_args()
image = nib.load(args.in_fpath)
factor = int(round(float(np.linalg.norm(image.affine[:3, 2]))))
out = pathlib.Path(args.out_dir)
out.mkdir(parents=True)
nib.save(nib.Nifti1Image(np.repeat(image.get_fdata(), factor, axis=2), np.eye(4)), out / "lr_eclare.nii.gz")
"""


def test_eclare_runs_as_a_peer_when_on_path(tmp_path, monkeypatch):
    """A stand-in run-eclare (nearest neighbour along the slice axis) on PATH: the harness runs it on the thick
    slices written as NIfTI and measures its output like any method."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / ts.ECLARE_COMMAND
    script.write_text(FAKE_ECLARE.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    path = _save(tmp_path / "head.nii.gz", _phantom((28, 24, 24)))
    out = tmp_path / "out"
    args = ["through-plane", "--data", str(path), "-o", str(out), "--factor", "4", "--baselines", "none"]
    result = CliRunner().invoke(cli, [*args, "--eclare-args", "--gpu-id 0", "--no-figures"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / report.JSON_NAME).read_text())
    assert list(doc["runs"][0]["metrics"]) == ["eclare"]
    assert doc["notes"][0].startswith(f"ECLARE: {script} --in-fpath LR.nii.gz --out-dir DIR --gpu-id 0")
    truth = _phantom((28, 24, 24))
    nearest = np.repeat(ThickSlices(4, 2).forward(truth), 4, axis=2)
    expected = peak_signal_noise_ratio(truth, nearest.astype(np.float32), data_range=_range(truth))
    assert doc["runs"][0]["metrics"]["eclare"]["volume"]["psnr"] == pytest.approx(expected, rel=1e-5)


def test_fidelity_points_a_through_plane_bundle_to_this_command(tmp_path, through_bundle):
    path = _save(tmp_path / "head.nii.gz", _phantom((24, 16, 32)))
    result = CliRunner().invoke(cli, ["fidelity", "--model", str(through_bundle), "--data", str(path), "-o", "o"])
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert "is through-plane (task.plane)" in line and "medsr-eval through-plane" in line


def test_thick_slices_too_few_for_the_model_are_refused_before_anything_runs(tmp_path, through_bundle):
    path = _save(tmp_path / "thin.nii.gz", _phantom((24, 16, 16)))
    args = ["through-plane", "--model", str(through_bundle), "--data", str(path), "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    (line,) = result.output.strip().splitlines()
    assert "thin (" in line and "x4: the thick slices: a volume of 24x16x4 voxels makes planes" in line
    assert not (tmp_path / "o").exists()
