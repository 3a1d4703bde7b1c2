"""NIfTI volumes in and out, with nibabel.

Loading applies scl_slope/scl_inter (``get_fdata``) and refuses what cannot be super-resolved with a one-line
InputError naming the file. Saving writes float32 with slope 1 / intercept 0 (a copied int16 header would otherwise
re-quantize the output), the given affine, and the input's qform/sform codes set explicitly (REFERENCE.md section 3).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.errors import InputError
from medsr.io.atomic import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Volume:
    """A loaded image: ``data`` float32 (X, Y, Z) or (X, Y, Z, T) in the file's units, ``affine`` (4, 4) voxel
    centre -> RAS+ mm, and the nibabel ``header`` it came with."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: object

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) of the three spatial axes, from the affine's columns."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D or 4D NIfTI file as float32 with its scaling applied.

    Raises:
        InputError: missing, empty, unreadable, corrupt or truncated file; not 3D/4D; NaN or Inf voxels.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a NIfTI file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"{path}: unreadable or corrupt NIfTI: {exc}") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(image).__name__})")
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[..., 0, :]
    if data.ndim not in (3, 4):
        raise InputError(f"{path}: expected a 3D or 4D volume, got shape {data.shape}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: {bad} voxel(s) are NaN or Inf")
    return Volume(path=path, data=data, affine=np.asarray(image.affine, dtype=np.float64), header=image.header)


def save_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    template: Volume,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Write ``data`` (float32) with ``affine`` as NIfTI, keeping the template's codes, units and time step.

    The file appears atomically under ``path``; an existing file is replaced only with ``overwrite``.
    """
    import nibabel as nib

    header = template.header.copy()
    header.set_data_dtype(np.float32)
    image = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine, header=header)
    qform_code = int(template.header["qform_code"])
    sform_code = int(template.header["sform_code"])
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header.set_slope_inter(1.0, 0.0)
    zooms = list(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    image.header.set_zooms(tuple(zooms + list(template.header.get_zooms()[3 : data.ndim])))
    if description:
        image.header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_path(path, overwrite=overwrite) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
