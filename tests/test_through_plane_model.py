"""The shipped through-plane model: a valid bundle within the size budget, one network for thick slices x2 to x6,
that beats cubic B-spline along the slice axis on the held-out Colin27 slab through the torch-free engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsr.bundle import load_bundle
from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.degrade import ThickSlicePlanes
from medsr.models import DEFAULT_BUNDLE, THROUGH_PLANE_BUNDLE


def _size(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_through_plane_bundle_is_valid_and_both_bundles_stay_under_50_mb():
    bundle = load_bundle(THROUGH_PLANE_BUNDLE)  # checks every graph's sha256
    assert _size(THROUGH_PLANE_BUNDLE) <= 25 * 2**20
    assert _size(THROUGH_PLANE_BUNDLE) + _size(DEFAULT_BUNDLE) <= 50 * 10**6
    assert (THROUGH_PLANE_BUNDLE / "NOTICE").is_file()
    task = bundle.manifest.task
    assert task.plane == "through-plane" and bundle.scales == (2, 3, 4, 5, 6)
    assert task.degradation == ThickSlicePlanes(4, profile="gaussian", fwhm=4.0)
    assert task.consistency == "project"
    assert bundle.manifest.provenance.recipe == "medsr-train recipe through-plane"
    assert bundle.conditioning == Conditioning(UPSAMPLED, "bspline", residual=True)


@pytest.mark.parametrize(("factor", "margin_db"), [(2, 0.5), (4, 1.5), (6, 0.5)])
def test_through_plane_model_beats_cubic_bspline_on_the_held_out_slab(factor, margin_db):
    """The model's acceptance bars over the foreground of the held-out slab made into thick sagittal slices
    (Gaussian, FWHM = the factor): at least +1.5 dB over cubic B-spline at x4, +0.5 dB at the other factors
    (x2 and x6 here; docs/through_plane_model.md has x2 to x6); about 8 s each."""
    from medsr.engine.jobs import EngineOptions
    from medsr.engine.pipeline import SamplingOptions
    from medsr.eval import thick_slices as ts

    bundle = load_bundle(THROUGH_PLANE_BUNDLE)
    pipeline = EngineOptions("ort", "fp32", "cpu", None, 2).open(bundle)
    runner = ts.through_plane_runner(pipeline, SamplingOptions(batch_size=8))
    settings = ts.ThickSliceSettings((factor,), "gaussian", None, axis=0, baselines=("bspline",), eclare=False)
    (volume,) = ts.load_truth_volumes(["colin27-slab"])
    run = ts.run_factor(volume, factor, settings, runner)
    model, bspline = (run.metrics[name]["volume"]["psnr_fg"] for name in ("through-plane", "bspline"))
    assert model >= bspline + margin_db, (factor, model, bspline)
    assert run.metrics["through-plane"]["volume"]["ssim_fg"] > run.metrics["bspline"]["volume"]["ssim_fg"]


def test_a_through_plane_batch_names_each_output_by_its_own_factor(tmp_path):
    """The bundled model serves x2 to x6; a batch of a 2 mm and a 4 mm volume (1 mm in-plane) writes _sr2x and
    _sr4x, records them, and a rerun skips both (found under their renamed names)."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from io_fixtures import smooth_image, write_nifti

    from medsr.cli.infer import infer

    source = tmp_path / "in"
    source.mkdir()
    for name, spacing in (("two", 2.0), ("four", 4.0)):
        write_nifti(source / f"{name}.nii.gz", smooth_image((24, 24, 8)), np.diag([1.0, 1.0, spacing, 1.0]))
    out = tmp_path / "out"
    args = [str(source), "-o", str(out), "--through-plane", "--threads", "1"]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["four_sr4x.nii.gz", "medsr_summary.json", "two_sr2x.nii.gz"]
    items = json.loads((out / "medsr_summary.json").read_text())["items"]
    assert sorted(Path(i["output"]).name for i in items) == ["four_sr4x.nii.gz", "two_sr2x.nii.gz"]
    again = CliRunner().invoke(infer, args)
    assert again.exit_code == 0, again.output
    items = json.loads((out / "medsr_summary.json").read_text())["items"]
    assert [i["status"] for i in items] == ["skipped", "skipped"]
    assert sorted(Path(i["output"]).name for i in items) == ["four_sr4x.nii.gz", "two_sr2x.nii.gz"]
