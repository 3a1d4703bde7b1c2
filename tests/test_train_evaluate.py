"""The held-out evaluation of a bundle (medsr.export.train.evaluate) on the tiny bundle and a synthetic volume."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medsr.data.sources import Source
from medsr.export.train.evaluate import METHODS, evaluate_bundle, markdown_table


def test_evaluate_bundle_table(tiny_bundle, tmp_path):
    rng = np.random.default_rng(0)
    data = np.cumsum(np.cumsum(rng.standard_normal((32, 48, 3)), axis=0), axis=1).astype(np.float32)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    results = evaluate_bundle(tiny_bundle, [Source("vol", path, "mri", axes=(2,))], threads=1)
    entry = results["vol"]
    assert entry["slices"] == 3 and entry["shape"] == [32, 48]
    assert set(entry["metrics"]) == set(METHODS)
    metrics = entry["metrics"]
    # k-space consistency puts back the measured band: a random model gains from it, zero-filling is exact there
    assert metrics["model+kspace"]["psnr"] > metrics["model"]["psnr"]
    assert metrics["zerofill"]["psnr"] > metrics["model"]["psnr"]
    table = markdown_table(results)
    assert table.count("\n") == 2 + len(METHODS) and "vol (3 slices)" in table


def test_evaluate_bundle_refuses_a_missing_bundle(tmp_path):
    from medsr.errors import MedsrError

    with pytest.raises(MedsrError):
        evaluate_bundle(tmp_path / "nope", [])
