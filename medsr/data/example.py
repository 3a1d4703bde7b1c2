"""The example volume shipped in examples/: a low-resolution stack cut from the held-out Colin27 slab.

Axial slices z = 96, 101, ..., 116 (inside the held-out slab of medsr.data.sources, so the default model never
trained on them), each trimmed to 180 x 216 and degraded by the same k-space operator as training (x4, centre
-aligned): 45 x 54 x 5 voxels of 4 x 4 x 5 mm in Colin27's units. The through-plane spacing (5 mm) is the
largest, so ``medsr-infer`` picks axis 2 as the slice axis without being told.
"""

from __future__ import annotations

import os

import numpy as np

from medsr.data.pairs import degradation_for, trim_to_multiple
from medsr.data.sources import COLIN27_HELDOUT, _colin27
from medsr.io.formats import load_image

EXAMPLE_SLICES = tuple(range(COLIN27_HELDOUT[0], COLIN27_HELDOUT[1], 5))


def make_colin27_example(out_path: str | os.PathLike, scale: int = 4, slices: tuple[int, ...] = EXAMPLE_SLICES):
    """Write the example NIfTI (float32) and return its (X, Y, Z) shape.

    LR voxel (i, j, k) sits on Colin27 voxel (top + s*i + (s-1)/2, left + s*j + (s-1)/2, slices[0] + step*k),
    (top, left) the offset of the centre trim, so the affine is Colin27's times that map: the one geometry of
    medsr.degrade and medsr.io.affine. The sform code is Colin27's (4, MNI152).
    """
    import nibabel as nib

    colin = nib.load(str(_colin27()))
    data = load_image(_colin27()).data[..., list(slices)]
    stack = trim_to_multiple(np.moveaxis(data, 2, 0), scale)
    top, left = (data.shape[0] % scale) // 2, (data.shape[1] % scale) // 2  # as trim_to_multiple centres
    lr = degradation_for("mri", scale).forward(stack).astype(np.float32)
    step = slices[1] - slices[0] if len(slices) > 1 else 1
    voxel_map = np.diag([scale, scale, step, 1.0])
    voxel_map[:3, 3] = [top + (scale - 1) / 2, left + (scale - 1) / 2, slices[0]]
    affine = colin.affine @ voxel_map
    image = nib.Nifti1Image(np.moveaxis(lr, 0, 2), affine)
    code = int(colin.header["sform_code"])
    image.set_qform(affine, code=code)
    image.set_sform(affine, code=code)
    image.header.set_data_dtype(np.float32)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["descrip"] = b"Colin27 x4 k-space LR (medsr example)"
    nib.save(image, str(out_path))
    return image.shape
