"""The shipped default model: a valid bundle within the size budget, trained for k-space x4 MRI with k-space
consistency by default, that super-resolves the shipped example with nothing else installed or downloaded."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from medsr.bundle import load_bundle
from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.data.sources import COLIN27_HELDOUT, Source, default_split
from medsr.degrade import KSpaceTruncation
from medsr.export.train.evaluate import evaluate_bundle
from medsr.models import DEFAULT_BUNDLE

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "colin27_lr_x4.nii.gz"


def test_default_bundle_is_valid_and_small():
    bundle = load_bundle(DEFAULT_BUNDLE)  # checks every graph's sha256
    size = sum(p.stat().st_size for p in DEFAULT_BUNDLE.rglob("*") if p.is_file())  # nothing else is ever written
    assert size <= 25 * 2**20
    assert (DEFAULT_BUNDLE / "NOTICE").is_file()
    task = bundle.manifest.task
    assert bundle.scale == 4 and task.degradation == KSpaceTruncation(4)
    assert task.consistency == "kspace"
    assert bundle.manifest.provenance.recipe == "medsr-train recipe default"
    assert bundle.conditioning == Conditioning(UPSAMPLED, "zerofill", residual=True)


def test_default_model_beats_zero_filling_on_held_out_mri():
    """The default model's acceptance bars, with k-space consistency: at least 0.5 dB over zero-filled k-space and
    1 dB over grid-aligned bicubic, on a third of the held-out Colin slab (8 slices) and on the whole unseen EPI
    volume (24 slices, another subject and contrast); about 10 s."""
    start = COLIN27_HELDOUT[0]
    heldout = {source.name: source for source in default_split()["heldout"]}
    part = Source("colin27-part", heldout["colin27-slab"].path, "mri", axes=(2,), box=(None, None, (start, start + 8)))
    results = evaluate_bundle(DEFAULT_BUNDLE, [part, heldout["epi"]], threads=2)
    for name, result in results.items():
        psnr = {method: scores["psnr"] for method, scores in result["metrics"].items()}
        assert psnr["model+kspace"] >= psnr["zerofill"] + 0.5, (name, psnr)
        assert psnr["model+kspace"] >= psnr["bicubic"] + 1.0, (name, psnr)


def test_example_runs_with_the_default_model(tmp_path):
    from medsr.cli.infer import infer

    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(infer, [str(EXAMPLE), "-o", str(out), "--threads", "2"])
    assert result.exit_code == 0, result.output
    lr, sr = nib.load(EXAMPLE), nib.load(out)
    assert sr.shape == (180, 216, 5)
    # the SR volume covers the same field of view: voxel centres 4i + 1.5 of the output are LR voxel centres i
    np.testing.assert_allclose(sr.affine @ [1.5, 1.5, 0, 1], lr.affine @ [0, 0, 0, 1], atol=1e-6)
