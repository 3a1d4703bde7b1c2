"""Reading the images training pairs are cut from, through medsr.io's one reader (NIfTI, DICOM, PNG, TIFF).

The training side must see an image as ``medsr-infer`` will: the same reader (medsr.io.formats.load_image: DICOM
modality LUT applied) and the same window convention, where a MONOCHROME1 image (low values display bright) gets an
inverted window so that bright always means dense tissue or high signal (medsr.infer.super_resolve_volume).
"""

from __future__ import annotations

import os

import numpy as np

from medsr.errors import InputError
from medsr.io.dicom import DICOM_SUFFIXES as _DICOM
from medsr.io.formats import load_image
from medsr.io.normalize import IntensityWindow, fit_window
from medsr.io.raster import RASTER_SUFFIXES as _RASTER

#: File suffixes (lower case) read as DICOM and as PNG/TIFF images.
DICOM_SUFFIXES = tuple(_DICOM)
RASTER_SUFFIXES = tuple(_RASTER)


def load_source(path: str | os.PathLike, frame: int | None = None) -> tuple[np.ndarray, bool]:
    """(data (X, Y, Z) float32 in the file's units, inverted) of one image file; a 4D file needs ``frame``.

    A 2D image (DICOM radiograph, PNG, TIFF) comes as (rows, columns, 1), its display orientation. ``inverted``
    is True for DICOM MONOCHROME1, whose window `training_window` then flips.
    """
    volume = load_image(path)
    data = volume.data
    if data.ndim == 4:
        if frame is None or not 0 <= frame < data.shape[3]:
            raise InputError(f"{path}: 4D image of shape {data.shape}: choose a frame in [0, {data.shape[3] - 1}]")
        data = data[..., frame]
    elif frame not in (None, 0):
        raise InputError(f"{path}: frame {frame} requested from a 3D image of shape {data.shape}")
    if volume.format != "nifti" and data.shape[2] == 1:
        data = np.ascontiguousarray(data.transpose(1, 0, 2))  # medsr.io gives X = columns, Y = rows
    return data, volume.inverted


def load_image2d(path: str | os.PathLike) -> np.ndarray:
    """One 2D image (rows, columns) float64, MONOCHROME1 inverted (max + min - value) so bright is dense.

    Colour PNG/TIFF files, which medsr-infer refuses, are averaged to grey (studies on natural photographs use them).
    """
    if str(path).lower().endswith(RASTER_SUFFIXES) and _is_colour(path):
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float64).mean(axis=2)
    data, inverted = load_source(path)
    if data.shape[2] != 1:
        raise InputError(f"{path}: expected a single 2D image, got shape {data.shape}")
    image = data[..., 0].astype(np.float64)
    return image.max() + image.min() - image if inverted else image


def _is_colour(path: str | os.PathLike) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr")
    except (UnidentifiedImageError, OSError):
        return False  # load_source reports the unreadable file


def training_window(data: np.ndarray, inverted: bool, low: float = 0.5, high: float = 99.5) -> IntensityWindow:
    """The window medsr-infer fits on ``data`` (percentiles of the whole image), flipped when ``inverted``."""
    window = fit_window(data, low, high)
    return IntensityWindow(window.high, window.low) if inverted else window
