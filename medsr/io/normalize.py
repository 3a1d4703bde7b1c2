"""The one intensity normalization of medsr: robust percentiles of the input mapped to the model's [-1, 1].

The window is fitted once per volume, recorded, and inverted on output so the SR volume is in the input's units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsr.errors import InputError


@dataclass(frozen=True)
class IntensityWindow:
    """Input intensities ``low`` -> -1 and ``high`` -> +1 (input units, e.g. MR signal or HU).

    ``low > high`` is an inverted window: medsr.engine.volume uses one for MONOCHROME1 images (low values display
    bright), so that the model always sees bright = dense.
    """

    low: float
    high: float

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high}


def fit_window(data: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5) -> IntensityWindow:
    """The percentile window of ``data`` (any shape). A constant image has no window: InputError."""
    low, high = np.percentile(data, [low_percentile, high_percentile])
    if not high > low:
        low, high = float(np.min(data)), float(np.max(data))
        if not high > low:
            raise InputError(f"image is constant (every voxel is {low:g}): nothing to super-resolve")
    return IntensityWindow(float(low), float(high))


def normalize(data: np.ndarray, window: IntensityWindow, clip: bool = True) -> tuple[np.ndarray, float]:
    """Map ``data`` to [-1, 1] through ``window``, clipping outside it unless ``clip`` is False.

    Returns the float32 array and the fraction of values outside the window (clipped for the model; reported to the
    user). The engine passes ``clip=False`` so that data consistency sees the measured values; the networks still
    get them clipped (medsr.engine.pipeline).
    """
    scaled = (np.asarray(data, dtype=np.float64) - window.low) * (2.0 / (window.high - window.low)) - 1.0
    clipped = float(np.mean((scaled < -1.0) | (scaled > 1.0))) if scaled.size else 0.0
    if clip:
        scaled = np.clip(scaled, -1.0, 1.0)
    return scaled.astype(np.float32), clipped


def denormalize(data: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Invert ``normalize`` (without clipping): model range back to the input's units, float32.

    Computed in float32 (a new array), so a large SR image needs no float64 copy.
    """
    out = np.asarray(data, dtype=np.float32) + np.float32(1.0)
    out *= np.float32((window.high - window.low) / 2.0)
    out += np.float32(window.low)
    return out
