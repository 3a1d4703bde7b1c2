"""PNG and TIFF radiographs in and out (8 and 16 bit, and float32 TIFF), with Pillow.

A raster image becomes a Volume of shape (X = columns, Y = rows, 1) placed like a DICOM image with the default
orientation (rows along +x, columns along +y in LPS) at the origin. Its pixel spacing comes from the file where the
format carries one: PNG ``pHYs`` in pixels per metre, TIFF XResolution/YResolution with ResolutionUnit inch or
centimetre. A file without one gets 1 mm pixels (noted) and its output carries none either. On output the spacing is
divided by the scale factor; PNG stores whole pixels per metre, so a spacing is written to about 1e-5 relative.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.errors import InputError
from medsr.io.atomic import atomic_path
from medsr.io.dtypes import quantize
from medsr.io.image import Volume, check_finite, check_input_file, flat, require
from medsr.io.limits import MemoryLimit

RASTER_SUFFIXES = {".png": "png", ".tif": "tiff", ".tiff": "tiff"}
#: Pillow modes medsr reads, and the numpy type each holds.
MODES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I": np.int32, "F": np.float32}
#: TIFF tags: XResolution, YResolution, ResolutionUnit (2 = inch, 3 = centimetre).
X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT = 282, 283, 296
MM_PER_UNIT = {2: 25.4, 3: 10.0}


@dataclass(frozen=True)
class RasterInfo:
    """``spacing``: (row spacing, column spacing) in mm as the file gave it, or None when it gave none."""

    spacing: tuple[float, float] | None


def raster_format(path: str | os.PathLike) -> str | None:
    """``"png"``, ``"tiff"`` or None, from the file name."""
    return RASTER_SUFFIXES.get(Path(path).suffix.lower())


def _spacing(image, fmt: str) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PNG pHYs or the TIFF resolution tags, None when absent or unusable."""
    if fmt == "png":
        dpi = image.info.get("dpi")
        xres, yres, unit = (dpi[0], dpi[1], 2) if dpi else (None, None, None)
    else:
        tags = image.tag_v2
        xres, yres, unit = tags.get(X_RESOLUTION), tags.get(Y_RESOLUTION), tags.get(RESOLUTION_UNIT, 2)
    try:
        xres, yres = float(xres), float(yres)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if unit not in MM_PER_UNIT or not (np.isfinite([xres, yres]).all() and xres > 0 and yres > 0):
        return None
    return MM_PER_UNIT[unit] / yres, MM_PER_UNIT[unit] / xres


def load_raster(path: str | os.PathLike, limit: MemoryLimit | None = None, repair_nonfinite: bool = False) -> Volume:
    """Read a grayscale PNG or TIFF as a Volume (X, Y, 1).

    Raises:
        InputError: missing, empty, unreadable or truncated file; colour, palette or bilevel images; multi-page TIFF;
            an image too large for ``limit``; NaN or Inf pixels (float TIFF) unless ``repair_nonfinite``.
    """
    Image = require("PIL.Image", "io", "reading PNG and TIFF")
    path = Path(path)
    fmt = raster_format(path)
    check_input_file(path, f"a {fmt.upper()} file")
    bomb_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # medsr's own MemoryLimit applies instead
    try:
        with Image.open(path) as image:
            if image.mode not in MODES:
                raise InputError(f"{path}: {image.mode} image; medsr reads grayscale (8/16-bit or float) images")
            if getattr(image, "n_frames", 1) > 1:
                raise InputError(f"{path}: multi-page file ({image.n_frames} pages); medsr reads one 2D image")
            if limit is not None:
                limit.check(path, (image.width, image.height, 1))
            spacing = _spacing(image, fmt)
            pixels = np.asarray(image)
    except InputError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt or truncated files
        raise InputError(f"{path}: unreadable or corrupt {fmt.upper()}: {flat(exc)}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    stored = np.dtype(MODES[image.mode])
    data = np.ascontiguousarray(pixels.T[:, :, None], dtype=np.float32)
    data, note = check_finite(path, data, repair_nonfinite)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    if spacing is not None:
        affine[0, 0], affine[1, 1] = -spacing[1], -spacing[0]
    notes = (note,) if note else ()
    if spacing is None:
        notes += (f"no pixel spacing in the {fmt.upper()} file: assuming 1 mm pixels",)
    return Volume(path, data, affine, fmt, RasterInfo(spacing), stored, notes=notes)


def save_raster(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    template: Volume,
    fmt: str,
    dtype: np.dtype,
    overwrite: bool = False,
) -> float:
    """Write ``data`` (X, Y, 1) as PNG or TIFF of ``dtype``, atomically; return the fraction of clipped pixels.

    The pixel spacing (from ``affine``'s columns) is written only when the source file carried one.
    """
    Image = require("PIL.Image", "io", "writing PNG and TIFF")
    if data.ndim != 3 or data.shape[2] != 1:
        raise InputError(f"{fmt.upper()} output holds one 2D image, not an image of shape {data.shape}")
    stored, clipped = quantize(data[:, :, 0].T, dtype)
    image = Image.fromarray(np.ascontiguousarray(stored))
    options = {}
    if _carries_spacing(template):
        columns, rows = np.linalg.norm(np.asarray(affine)[:3, :2], axis=0)
        if fmt == "png":
            options["dpi"] = (25.4 / columns, 25.4 / rows)
        else:
            options.update(resolution_unit=3, x_resolution=10.0 / columns, y_resolution=10.0 / rows)
    with atomic_path(path, overwrite=overwrite) as tmp:
        image.save(tmp, format=fmt.upper(), **options)
    return clipped


def _carries_spacing(template: Volume) -> bool:
    """Whether the source stated a physical pixel size (a NIfTI always does; a DICOM or raster file may not)."""
    if template.format == "nifti":
        return True
    if template.format == "dicom":
        return template.meta.spacing_known
    return template.meta.spacing is not None
