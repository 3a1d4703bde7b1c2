"""Reading the images training pairs and evaluation slices are cut from, prepared exactly as ``medsr-infer``
prepares its input: medsr.io's one reader (DICOM modality LUT applied), then medsr.engine.volume.prepare_input (the
window from the bundle's or preset's percentiles, MONOCHROME1 inverted, 2D images in display orientation)."""

from __future__ import annotations

import os

from medsr.engine.volume import NetworkInput, prepare_input
from medsr.errors import InputError
from medsr.io.formats import load_image


def load_source(path: str | os.PathLike, percentiles: tuple[float, float], frame: int | None = None) -> NetworkInput:
    """One image file as the network's input (medsr.engine.volume.NetworkInput); a 4D file needs ``frame``.

    ``percentiles``: (low, high) of the intensity window, the bundle's or the training preset's ``intensity``.
    """
    volume = load_image(path)
    if volume.data.ndim == 4 and (frame is None or not 0 <= frame < volume.data.shape[3]):
        shape = volume.data.shape
        raise InputError(f"{path}: 4D image of shape {shape}: choose a frame in [0, {shape[3] - 1}]")
    if volume.data.ndim == 3 and frame not in (None, 0):
        raise InputError(f"{path}: frame {frame} requested from a 3D image of shape {volume.data.shape}")
    return prepare_input(volume, percentiles, frame if volume.data.ndim == 4 else None)
