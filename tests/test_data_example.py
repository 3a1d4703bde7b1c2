"""The shipped example volume: small, reproducible from Colin27, and placed in Colin27's world coordinates by the
one centre-aligned geometry (LR voxel i on HR voxel 4i + 1.5)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsr.data.example import EXAMPLE_SLICES, make_colin27_example
from medsr.data.sources import COLIN27_HELDOUT, COLIN27_PATH
from medsr.degrade import make_degradation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "colin27_lr_x4.nii.gz"
needs_colin = pytest.mark.skipif(not COLIN27_PATH.is_file(), reason="Debian package mricron-data not installed")


def test_example_is_small_and_sliced_along_its_thickest_axis():
    image = nib.load(EXAMPLE)
    assert EXAMPLE.stat().st_size < 1_000_000
    assert image.shape == (45, 54, 5)
    assert np.argmax(image.header.get_zooms()) == 2  # medsr-infer's default slice axis
    assert all(COLIN27_HELDOUT[0] <= z < COLIN27_HELDOUT[1] for z in EXAMPLE_SLICES)


@needs_colin
def test_example_is_reproducible_and_centre_aligned(tmp_path):
    make_colin27_example(tmp_path / "x.nii.gz")
    made, shipped = nib.load(tmp_path / "x.nii.gz"), nib.load(EXAMPLE)
    np.testing.assert_allclose(made.get_fdata(), shipped.get_fdata(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(made.affine, shipped.affine)
    colin = nib.load(COLIN27_PATH)
    hr = colin.get_fdata()[:180, :216, EXAMPLE_SLICES[2]]
    np.testing.assert_allclose(shipped.get_fdata()[..., 2], make_degradation("kspace", 4).forward(hr), atol=1e-3)
    lr_voxel = np.array([3, 7, 2, 1.0])
    hr_voxel = np.array([4 * 3 + 1.5, 4 * 7 + 1.5, EXAMPLE_SLICES[2], 1.0])
    np.testing.assert_allclose(shipped.affine @ lr_voxel, colin.affine @ hr_voxel)
