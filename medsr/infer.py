"""Super-resolve a NIfTI volume slice by slice: the work behind ``medsr-infer``, torch-free.

volume (X, Y, Z[, T]) -> slices along one axis -> normalized to [-1, 1] -> LatentSRPipeline -> denormalized ->
volume upsampled by s on the two in-plane axes, with the affine of medsr.io.affine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.errors import InputError
from medsr.io.affine import upsample_affine
from medsr.io.normalize import IntensityWindow, denormalize, fit_window, normalize


def choose_slice_axis(zooms: tuple[float, float, float]) -> int:
    """The axis with the largest voxel spacing (ties: the last such axis): the through-plane axis of a 2D stack."""
    return max(range(3), key=lambda axis: (zooms[axis], axis))


@dataclass(frozen=True)
class VolumeResult:
    """An SR volume (float32, input units), its affine, and what the run did."""

    data: np.ndarray
    affine: np.ndarray
    axis: int
    slices: int
    window: IntensityWindow
    clipped_fraction: float
    residuals: np.ndarray


def super_resolve_volume(
    data: np.ndarray,
    affine: np.ndarray,
    pipeline: LatentSRPipeline,
    axis: int,
    options: SamplingOptions,
    progress: Callable[[int], None] | None = None,
) -> VolumeResult:
    """Super-resolve every slice of ``data`` (X, Y, Z) or (X, Y, Z, T) along spatial ``axis``.

    ``residuals`` of the result: the consistency residual of each slice, frames in order.

    The intensity window is fitted on the whole volume (all frames), so every slice shares one mapping.
    Slice i of frame k is seeded with index k * n_slices + i, so each output voxel is reproducible on its own.
    """
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2, got {axis}")
    frames = data[..., None] if data.ndim == 3 else data
    window = fit_window(frames, *_percentiles(pipeline))
    scale = pipeline.bundle.scale
    outputs, clipped, residuals = [], [], []
    for frame_index in range(frames.shape[3]):
        stack = np.moveaxis(frames[..., frame_index], axis, 0)
        normalized, fraction = normalize(stack, window)
        clipped.append(fraction)
        result = pipeline.super_resolve(normalized, options, progress=progress, first_index=frame_index * stack.shape[0])
        outputs.append(np.moveaxis(denormalize(result.images, window), 0, axis))
        residuals.append(result.residuals)
    sr_data = np.stack(outputs, axis=-1) if data.ndim == 4 else outputs[0]
    factors = [scale, scale, scale]
    factors[axis] = 1
    return VolumeResult(
        data=sr_data,
        affine=upsample_affine(affine, factors),
        axis=axis,
        slices=frames.shape[axis] * frames.shape[3],
        window=window,
        clipped_fraction=float(np.mean(clipped)),
        residuals=np.concatenate(residuals),
    )


def _percentiles(pipeline: LatentSRPipeline) -> tuple[float, float]:
    intensity = pipeline.bundle.manifest["task"]["intensity"]
    return float(intensity.get("low", 0.5)), float(intensity.get("high", 99.5))
