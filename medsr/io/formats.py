"""Which reader and writer an image goes through: format detection, output format and name, and the dispatch.

Inputs: ``.nii``/``.nii.gz`` (NIfTI), ``.png``, ``.tif``/``.tiff``, and DICOM (a series directory, a ``.dcm`` file,
or any file with the DICM preamble). Outputs: NIfTI (the default for NIfTI and DICOM inputs), PNG and TIFF (the
default for those inputs; one 2D image only), and DICOM (for DICOM inputs only: a file for one image, a directory for
a series).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medsr.errors import InputError
from medsr.io.image import Volume
from medsr.io.limits import MemoryLimit
from medsr.io.nifti import is_nifti
from medsr.io.raster import raster_format

OUTPUT_FORMATS = ("nifti", "dicom", "png", "tiff")
#: Default file suffix of each output format ("" for a DICOM series directory).
OUTPUT_SUFFIX = {"nifti": ".nii.gz", "png": ".png", "tiff": ".tif", "dicom": ".dcm"}


def input_format(path: str | os.PathLike) -> str:
    """``nifti``, ``dicom``, ``png`` or ``tiff`` for an input path; InputError for anything else."""
    from medsr.io.dicom import DICOM_SUFFIXES, has_dicom_preamble

    path = Path(path)
    if path.is_dir():
        return "dicom"
    if is_nifti(path):
        return "nifti"
    if raster_format(path):
        return raster_format(path)
    if path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path):
        return "dicom"
    if not path.exists():
        raise InputError(f"{path}: file not found")
    raise InputError(f"{path}: unknown image type; medsr reads .nii, .nii.gz, DICOM, .png, .tif and .tiff")


def load_image(
    path: str | os.PathLike,
    series: str | None = None,
    limit: MemoryLimit | None = None,
    repair_nonfinite: bool = False,
) -> Volume:
    """Read any supported input as a Volume (medsr.io.image), checking its size against ``limit`` first."""
    fmt = input_format(path)
    if series is not None and fmt != "dicom":
        raise InputError(f"{path}: --series applies to DICOM inputs only")
    if fmt == "nifti":
        from medsr.io.nifti import load_nifti

        return load_nifti(path, limit=limit, repair_nonfinite=repair_nonfinite)
    if fmt == "dicom":
        from medsr.io.dicom import load_dicom

        return load_dicom(path, series=series, limit=limit, repair_nonfinite=repair_nonfinite)
    from medsr.io.raster import load_raster

    return load_raster(path, limit=limit, repair_nonfinite=repair_nonfinite)


def output_format(output: Path | None, requested: str | None, source: Volume) -> str:
    """The output format: ``requested`` (``--format``), else the output file's suffix, else the source's default.

    Raises:
        InputError: a suffix that contradicts ``--format``; PNG/TIFF for a volume; DICOM for a non-DICOM source.
    """
    suffix_format = format_of_name(output) if output is not None else None
    if requested and suffix_format and suffix_format != requested:
        raise InputError(f"{output}: the file name says {suffix_format.upper()} but --format is {requested}")
    fmt = requested or suffix_format or ("nifti" if source.format in ("nifti", "dicom") else source.format)
    if fmt in ("png", "tiff") and not source.is_2d:
        raise InputError(
            f"{source.path}: {fmt.upper()} output holds one 2D image, but the input is a volume of shape "
            f"{source.data.shape}; use --format nifti"
        )
    if fmt == "dicom":
        from medsr.io.dicom_write import check_dicom_source

        check_dicom_source(source)
    return fmt


def format_of_name(path: Path) -> str | None:
    """The output format a file name implies (by suffix), or None."""
    if is_nifti(path):
        return "nifti"
    if raster_format(path):
        return raster_format(path)
    return "dicom" if path.suffix.lower() == ".dcm" else None


def output_is_directory(fmt: str, source: Volume) -> bool:
    """A DICOM series (more than one slice) is written as a directory; everything else as one file."""
    return fmt == "dicom" and source.data.shape[2] > 1


def default_output_name(source: Volume, fmt: str, scale: int, stem: str | None = None) -> str:
    """``<stem>_sr<scale>x<suffix>``: the input's name without its suffixes (or ``stem``); no suffix for a series
    directory."""
    if stem is None:
        name = source.path.name
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    suffix = "" if output_is_directory(fmt, source) else OUTPUT_SUFFIX[fmt]
    return f"{stem}_sr{scale}x{suffix}"


def save_image(
    path: Path,
    fmt: str,
    data: np.ndarray,
    affine: np.ndarray,
    source: Volume,
    dtype: np.dtype,
    provenance: dict,
    overwrite: bool = False,
) -> float:
    """Write the SR image in ``fmt`` (atomically); return the fraction of values clipped to the output type."""
    if fmt == "nifti":
        from medsr.io.nifti import save_nifti

        return save_nifti(path, data, affine, source, provenance, dtype=dtype, overwrite=overwrite)
    if fmt == "dicom":
        from medsr.io.dicom_write import save_dicom

        return save_dicom(path, data, affine, source, provenance, overwrite=overwrite)
    from medsr.io.raster import save_raster

    return save_raster(path, data, affine, source, fmt, dtype, overwrite=overwrite)
