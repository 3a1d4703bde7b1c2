"""Training pairs: normalized HR slices from a source, LR made from them by medsr.degrade, and aligned crops.

Slices are the network input ``medsr-infer`` would prepare from the same file (medsr.engine.volume.prepare_input:
one window fitted on the whole source with the bundle's or preset's percentiles, the same plane orientation), so
the model trains on what it will see.
LR is always the degradation of the *whole* (augmented) HR slice, never of a crop, so crops carry the same
boundary conditions as an acquired image; an LR crop at LR offset (i, j) is the HR crop at offset (s*i, s*j), or
(i, s*j) for a through-plane task's thick slices along the crop's second axis (1 x s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from medsr.data.images import load_source
from medsr.data.sources import Source
from medsr.degrade import SLICE_BASELINES, Degradation, make_degradation, upsample_baseline, upsample_slices
from medsr.errors import InputError, ShapeError

#: Degradation per modality (docs/sources.md, "Degradations and fair baselines"; the paper made its LR images with
#: PIL LANCZOS).
MODALITY_DEGRADATION = {"mri": "kspace", "xray": "lanczos"}
#: A slice is foreground when at least FOREGROUND_FRACTION of its pixels exceed FOREGROUND_LEVEL (normalized
#: units: -0.8 is 10 % of the intensity window): skips air-only slices at the edges of a volume.
FOREGROUND_LEVEL = -0.8
FOREGROUND_FRACTION = 0.1


@dataclass(frozen=True)
class Slice:
    """One normalized HR slice (H, W) float32 in [-1, 1]: ``index`` along ``axis`` of ``source`` (-1 for 2D)."""

    source: str
    modality: str
    axis: int
    index: int
    image: np.ndarray


def source_slices(source: Source, percentiles: tuple[float, float], min_size: int = 16) -> list[Slice]:
    """The foreground slices of ``source``, each at least ``min_size`` pixels on both sides, normalized to [-1, 1]
    (clipped) with the window of ``percentiles`` (low, high: the bundle's or the training preset's ``intensity``).

    The window is fitted on the whole file (before the box is cut), as medsr-infer fits it on the whole input.
    A 2D image is the single slice along axis 2, in display orientation (rows, columns).
    """
    prepared = load_source(source.path, percentiles, source.frame)
    if source.box is not None:
        prepared = prepared.crop(source.box)
    axes = source.axes if prepared.data.shape[2] > 1 else (2,)
    slices = []
    for axis in axes:
        if min(prepared.plane_shape(axis)) < min_size:
            continue
        normalized, _ = prepared.planes(axis)
        for index, image in enumerate(normalized):
            if np.mean(image > FOREGROUND_LEVEL) >= FOREGROUND_FRACTION:
                slices.append(Slice(source.name, source.modality, axis, index, image))
    if not slices:
        raise InputError(f"{source.path}: no foreground slice of at least {min_size} pixels in source {source.name}")
    return slices


def degradation_for(modality: str, scale: int) -> Degradation:
    """The operator that makes LR for ``modality`` at ``scale`` (:data:`MODALITY_DEGRADATION`)."""
    if modality not in MODALITY_DEGRADATION:
        raise InputError(f"unknown modality {modality!r}; expected one of {sorted(MODALITY_DEGRADATION)}")
    return make_degradation(MODALITY_DEGRADATION[modality], scale)


def trim_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Centre-crop the last two axes of ``image`` down to multiples of ``multiple``."""
    h, w = image.shape[-2:]
    th, tw = h - h % multiple, w - w % multiple
    if th == 0 or tw == 0:
        raise ShapeError(f"image of shape {image.shape} is smaller than {multiple} pixels")
    top, left = (h - th) // 2, (w - tw) // 2
    return image[..., top : top + th, left : left + tw]


def make_pair(hr: np.ndarray, op: Degradation) -> tuple[np.ndarray, np.ndarray]:
    """(HR trimmed to a multiple of the scale, LR = op(HR)), both float32: (H, W) and (H/f_H, W/f_W) (op's factors:
    (s, s), or (1, s) for thick slices)."""
    hr = trim_to_multiple(np.asarray(hr, np.float32), op.scale)
    return hr, op.forward(hr).astype(np.float32)


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations of a 2D image (k in 0..7): rot90 k % 4 times, transposed when k >= 4."""
    out = np.rot90(image, k % 4)
    return np.ascontiguousarray(out.T if k >= 4 else out)


class CropPairs(NamedTuple):
    """Aligned crops, float32: HR (n, H, H), LR (n, H/f_H, H/f_W) (the operator's factors: s x s, or 1 x s through-plane)
    and, when asked for, the crop of the whole LR slice clipped to [-1, 1] (as the engine clips it for its networks)
    and upsampled by a medsr.degrade baseline (n, H, H)."""

    hr: np.ndarray
    lr: np.ndarray
    upsampled: np.ndarray | None = None


def random_crop_pairs(
    slices: list[Slice],
    count: int,
    hr_size: int,
    scale: int,
    rng: np.random.Generator,
    augment: bool = True,
    upsampler: str | None = None,
    degradation: Degradation | None = None,
) -> CropPairs:
    """``count`` aligned crops: HR (count, hr_size, hr_size) and LR (count, hr_size/f_H, hr_size/f_W), float32.

    Each crop picks a slice uniformly, optionally one of its 8 flips/rotations, degrades the whole slice with
    ``degradation`` (default: its modality's in-plane operator at ``scale``; a through-plane task passes its
    ``thick_slices``, factors 1 x s) and cuts an HR window at a multiple of the factors together with the matching
    LR window (and the window of the whole LR slice's ``upsampler`` baseline, when given: an in-plane one, or a
    slice-axis one along the second axis). Slices smaller than ``hr_size`` (after trimming to a multiple of s) are
    never picked.
    """
    if hr_size % scale:
        raise ShapeError(f"HR crop size {hr_size} must be a multiple of the scale {scale}")
    usable = [s for s in slices if min(trim_to_multiple(s.image, scale).shape) >= hr_size]
    if not usable:
        raise ShapeError(f"no slice is at least {hr_size} x {hr_size} pixels; use a smaller crop")
    ops = {modality: degradation or degradation_for(modality, scale) for modality in MODALITY_DEGRADATION}
    f_h, f_w = (scale, scale) if degradation is None else degradation.factors
    lr_h, lr_w = hr_size // f_h, hr_size // f_w
    hr_out = np.empty((count, hr_size, hr_size), np.float32)
    lr_out = np.empty((count, lr_h, lr_w), np.float32)
    up_out = np.empty((count, hr_size, hr_size), np.float32) if upsampler else None
    for n in range(count):
        chosen = usable[rng.integers(len(usable))]
        image = dihedral(chosen.image, int(rng.integers(8))) if augment else chosen.image
        hr, lr = make_pair(image, ops[chosen.modality])
        i = int(rng.integers(lr.shape[0] - lr_h + 1))
        j = int(rng.integers(lr.shape[1] - lr_w + 1))
        window = (slice(f_h * i, f_h * (i + lr_h)), slice(f_w * j, f_w * (j + lr_w)))
        hr_out[n] = hr[window]
        lr_out[n] = lr[i : i + lr_h, j : j + lr_w]
        if up_out is not None:
            clipped = np.clip(lr, -1.0, 1.0)
            if upsampler in SLICE_BASELINES:
                up_out[n] = upsample_slices(clipped, scale, axis=-1, method=upsampler)[window]
            else:
                up_out[n] = upsample_baseline(clipped, upsampler, scale)[window]
    return CropPairs(hr_out, lr_out, up_out)


def random_crops(slices: list[Slice], count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` HR crops (count, size, size) float32, slice picked uniformly, with a random flip/rotation."""
    usable = [s for s in slices if min(s.image.shape) >= size]
    if not usable:
        raise ShapeError(f"no slice is at least {size} x {size} pixels; use a smaller crop")
    out = np.empty((count, size, size), np.float32)
    for n in range(count):
        image = dihedral(usable[rng.integers(len(usable))].image, int(rng.integers(8)))
        i, j = int(rng.integers(image.shape[0] - size + 1)), int(rng.integers(image.shape[1] - size + 1))
        out[n] = image[i : i + size, j : j + size]
    return out
