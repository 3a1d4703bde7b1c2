"""The one affine rule of medsr: upsampling voxel axes while keeping the field of view (docs/conventions.md).

New voxel j along an axis upsampled by f sits at old continuous index (j + 0.5) / f - 0.5 (voxel centres,
``F.interpolate(align_corners=False)``, MONAI ``Zoom(keep_size=False)``), so ``A_new = A_old @ S`` with
``S = diag(1/f, ..., 1)`` and a translation of (1/f - 1)/2 on each upsampled axis. Scaling the columns alone (or
``nibabel.affines.rescale_affine``) would shift the image by a quarter of a source voxel at f = 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def upsampling_matrix(factors: Sequence[float]) -> np.ndarray:
    """(4, 4) map from new voxel indices to old voxel indices for per-axis factors (f_i, f_j, f_k).

    >>> upsampling_matrix([4, 4, 1]) @ [0, 0, 0, 1]
    array([-0.375, -0.375,  0.   ,  1.   ])
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.shape != (3,) or np.any(factors <= 0):
        raise ValueError(f"factors must be three positive numbers, got {factors.tolist()}")
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(1.0 / factors)
    matrix[:3, 3] = (1.0 / factors - 1.0) / 2.0
    return matrix


def upsample_affine(affine: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Affine (4, 4, voxel -> world mm) of a grid upsampled by ``factors`` over the same field of view."""
    return np.asarray(affine, dtype=np.float64) @ upsampling_matrix(factors)


def upsample_affine_along(affine: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Affine of a grid upsampled by ``factor`` along voxel ``axis`` only (through-plane SR): old voxel i of that
    axis sits on new voxel centre factor*i + (factor-1)/2, the other axes keep their voxels.

    >>> upsample_affine_along(np.diag([1.0, 1.0, 4.0, 1.0]), 2, 4) @ [0, 0, 1.5, 1]
    array([0., 0., 0., 1.])
    """
    factors = [1, 1, 1]
    factors[axis] = factor
    return upsample_affine(affine, factors)


def grid_corners_world(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World coordinates (8, 3) of the outer corners of a voxel grid (voxel edges, not centres), in mm.

    Two grids that cover the same field of view have the same corners, whatever their voxel size.
    """
    shape = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
    voxel = corners * shape - 0.5
    return (np.asarray(affine)[:3, :3] @ voxel.T).T + np.asarray(affine)[:3, 3]
