"""One geometry end to end (the voxel-centre rule s*i + (s-1)/2 and its affine update, docs/conventions.md): a
bright blob keeps its world position through medsr-infer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("scipy")

from click.testing import CliRunner

from medsr.cli.infer import infer
from medsr.models import DEFAULT_BUNDLE


def _world_centroid(image: nib.Nifti1Image, slice_index: int, near: np.ndarray, sigma_mm: float = 4.0) -> np.ndarray:
    """World centroid (mm) of one axial slice above its median, within 12 mm of ``near``, after a Gaussian blur.

    The blur (transfer 3e-9 at the LR Nyquist frequency for 2 mm LR voxels) keeps only what k-space consistency pins
    to the measured LR data, so the detail a model invents cannot move the centroid, while a grid off by the classic
    (s-1)/2 HR pixels would (0.75 mm here). The 12 mm disc leaves out the image borders, where a model may add
    edge artifacts of its own.
    """
    from scipy.ndimage import gaussian_filter

    data = image.get_fdata()[..., slice_index]
    spacing = np.linalg.norm(image.affine[:3, :2], axis=0)
    blurred = gaussian_filter(data, sigma=sigma_mm / spacing, mode="nearest")
    i, j = np.indices(data.shape)
    world = nib.affines.apply_affine(image.affine, np.stack([i, j, np.full_like(i, slice_index)], axis=-1))
    inside = np.linalg.norm(world - near, axis=-1) < 12.0
    weights = np.where(inside, np.clip(blurred - np.median(blurred), 0, None), 0.0)
    centre = np.array([(weights * i).sum(), (weights * j).sum()]) / weights.sum()
    return nib.affines.apply_affine(image.affine, [centre[0], centre[1], slice_index])


@pytest.mark.skipif(not (DEFAULT_BUNDLE / "medsr.json").is_file(), reason="no default model bundled")
def test_blob_keeps_its_world_position_through_medsr_infer(tmp_path):
    rng = np.random.default_rng(0)
    shape, centre = (40, 48, 3), (17.3, 26.6)
    i, j = np.indices(shape[:2])
    blob = np.exp(-((i - centre[0]) ** 2 + (j - centre[1]) ** 2) / (2 * 2.0**2))
    data = (100 + 800 * blob[..., None] + rng.normal(0, 2, shape)).astype(np.float32)
    rotation = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])  # oblique in-plane
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 2.0, 5.0])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    source = tmp_path / "blob.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)

    out = tmp_path / "blob_sr.nii.gz"
    result = CliRunner().invoke(infer, [str(source), "-o", str(out), "--consistency", "kspace"])
    assert result.exit_code == 0, result.output
    sr = nib.load(out)
    assert sr.shape == (160, 192, 3)
    near = nib.affines.apply_affine(affine, [centre[0], centre[1], 1])
    before = _world_centroid(nib.load(source), 1, near)
    after = _world_centroid(sr, 1, near)
    assert np.linalg.norm(after - before) < 0.1  # mm
