"""The one in-memory layout of every image medsr reads, whatever the file format.

``data`` is float32 (X, Y, Z) or (X, Y, Z, T) in the file's own units: NIfTI after scl_slope/scl_inter, DICOM after
the modality LUT (e.g. Hounsfield units), PNG/TIFF as stored. For DICOM, PNG and TIFF, X runs along a row (the
column index) and Y down the columns (the row index), so ``pixel_array[j, i]`` is ``data[i, j, k]``; a 2D image is a
volume with Z = 1. ``affine`` (4, 4) maps voxel centre indices (i, j, k) to RAS+ millimetres.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsr.errors import InputError

FORMATS = ("nifti", "dicom", "png", "tiff")
FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class Volume:
    """A loaded image.

    Attributes:
        path: the input file, or the DICOM series directory.
        data: float32 (X, Y, Z) or (X, Y, Z, T), input units (see the module docstring).
        affine: (4, 4) float64, voxel centre -> RAS+ mm.
        format: one of FORMATS; a writer of the same format can reuse ``meta``.
        meta: what that writer needs: the nibabel header (NIfTI), a ``DicomSeries`` (DICOM), a ``RasterInfo``.
        stored_dtype: the file's pixel type before scaling (``--dtype input`` writes this type).
        inverted: DICOM MONOCHROME1: low values display bright. ``data`` keeps the stored meaning; the model sees it
            inverted (medsr.engine.volume) so that bright is dense tissue, as it was trained.
        notes: warnings for the user (a pixel spacing fallback, repaired voxels, ...).
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray
    format: str
    meta: object = None
    stored_dtype: np.dtype = FLOAT32
    inverted: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) of the three spatial axes, from the affine's columns."""
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def is_2d(self) -> bool:
        """One 2D image: three axes, one of them of length 1 (a radiograph, a PNG, a single slice)."""
        return self.data.ndim == 3 and 1 in self.data.shape

    @property
    def frames(self) -> int:
        return self.data.shape[3] if self.data.ndim == 4 else 1


def check_input_file(path: Path, what: str) -> None:
    """Refuse a ``path`` that is missing, a directory, unreadable or empty, naming it (``what``: "a NIfTI file")."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied: cannot read it")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")


def check_finite(path: Path, data: np.ndarray, repair: bool) -> tuple[np.ndarray, str | None]:
    """Refuse NaN/Inf voxels, or with ``repair`` replace NaN and -Inf by the finite minimum and +Inf by the maximum.

    Returns the (possibly repaired, in place) data and a note for the user, or None when every voxel was finite.
    """
    finite = np.isfinite(data)
    bad = int(data.size - np.count_nonzero(finite))
    if not bad:
        return data, None
    if not repair:
        raise InputError(
            f"{path}: {bad} voxel(s) are NaN or Inf; pass --repair-nonfinite to replace them by the finite "
            "minimum (NaN, -Inf) and maximum (+Inf)"
        )
    if bad == data.size:
        raise InputError(f"{path}: every voxel is NaN or Inf: nothing to repair")
    low, high = float(data[finite].min()), float(data[finite].max())
    np.copyto(data, np.float32(low), where=np.isnan(data) | np.isneginf(data))
    np.copyto(data, np.float32(high), where=np.isposinf(data))
    return data, f"{bad} NaN/Inf voxel(s) replaced by {low:g} / {high:g}"


def require(module: str, extra: str, purpose: str):
    """Import the optional dependency ``module``, or raise InputError naming the medsr extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(f"{purpose} needs {module.split('.')[0]}: pip install 'medsr[{extra}]'") from exc


def flat(exc: BaseException) -> str:
    """A third-party exception's message on one line (some span several), for a one-line InputError."""
    return " ".join(str(exc).split()) or type(exc).__name__


@contextlib.contextmanager
def collect_logs(name: str) -> Iterator[list[str]]:
    """Collect the messages of the library logger ``name`` instead of letting them print: nibabel and pydicom log
    warnings to stderr (header repairs, excess pixel padding), which medsr reports once, as notes."""
    logger = logging.getLogger(name)
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(" ".join(record.getMessage().split()))

    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [Collect()], False
    try:
        yield messages
    finally:
        logger.handlers, logger.propagate = handlers, propagate
