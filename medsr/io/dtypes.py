"""Output pixel types: float32 wherever the format holds floats, integers only when asked or when the format has
nothing else (PNG, DICOM), with the rounding and the clipping to the type's range counted and reported.
"""

from __future__ import annotations

import numpy as np

from medsr.errors import InputError
from medsr.io.image import Volume

#: ``--dtype`` choices. ``auto``: float32 for NIfTI and TIFF; for PNG and DICOM (integer-only formats) the input's
#: stored type. ``input``: the input's stored type (with its NIfTI scl_slope/scl_inter or DICOM rescale).
DTYPE_CHOICES = ("auto", "float32", "input", "uint8", "int16", "uint16")

#: Integer types each output format can hold (NIfTI also takes whatever integer type its input had).
FORMAT_DTYPES = {
    "nifti": ("float32", "uint8", "int16", "uint16"),
    "tiff": ("float32", "uint8", "int16", "uint16"),
    "png": ("uint8", "uint16"),
}


def resolve_dtype(choice: str, fmt: str, source: Volume) -> np.dtype:
    """The numpy dtype to write for ``--dtype choice`` in output format ``fmt`` from ``source``.

    Raises:
        InputError: the format cannot hold that type (e.g. float32 in PNG, or DICOM in another type than its input's).
    """
    stored = np.dtype(source.stored_dtype)
    if fmt == "dicom":
        if choice not in ("auto", "input") and np.dtype(choice) != stored:
            raise InputError(
                f"{source.path}: --format dicom writes the source's pixel type ({stored}); "
                f"--dtype {choice} is not possible"
            )
        return stored
    if choice == "auto":
        if fmt != "png":
            return np.dtype(np.float32)
        choice = "input"
    dtype = stored if choice == "input" else np.dtype(choice)
    allowed = FORMAT_DTYPES[fmt] + ((stored.name,) if fmt == "nifti" and choice == "input" else ())
    if dtype.name not in allowed:
        raise InputError(
            f"{source.path}: {fmt.upper()} output cannot hold {dtype} pixels (the input stores {stored}); "
            f"choose --dtype {' or '.join(allowed)}"
        )
    return dtype


def quantize(
    values: np.ndarray, dtype: np.dtype, slope: float = 1.0, inter: float = 0.0, limits: tuple[int, int] | None = None
) -> tuple[np.ndarray, float]:
    """Values in input units -> stored values: ``round((values - inter) / slope)`` clipped to the range of ``dtype``
    (or the narrower ``limits``, e.g. DICOM BitsStored), or a plain cast for a float ``dtype``.

    Returns the stored array and the fraction of values that were clipped (0 for floats).
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.asarray(values, dtype=dtype), 0.0
    info = np.iinfo(dtype)
    low, high = limits if limits is not None else (info.min, info.max)
    work = np.float32 if max(abs(low), abs(high)) < 2**24 else np.float64
    scaled = np.asarray(values, dtype=work)
    if slope != 1.0 or inter != 0.0:
        scaled = (scaled - work(inter)) / work(slope)
        np.rint(scaled, out=scaled)
    else:
        scaled = np.rint(scaled)  # a new array: ``values`` stays untouched
    clipped = float(np.count_nonzero((scaled < low) | (scaled > high))) / max(scaled.size, 1)
    np.clip(scaled, low, high, out=scaled)
    return scaled.astype(dtype), clipped
