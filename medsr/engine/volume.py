"""A volume through the model plane by plane, and the one preparation of an image for the network.

:func:`prepare_input` is the only way medsr turns a read image into network input: medsr-infer (here), training
pairs (medsr.data) and evaluation (medsr.eval) all call it, so the same file gives the same planes everywhere.

- Intensity: one window per image, the percentiles the bundle (or the training preset) declares
  (manifest ``task.intensity``), fitted on every voxel of the chosen frame(s); inverted for DICOM MONOCHROME1 so
  the model always sees bright = dense (docs/conventions.md, intensity window).
- Orientation: a plane of a DICOM, PNG or TIFF image along axis 2 (its acquired plane) is presented in display
  orientation, (rows, columns), as the file stores and a viewer shows it; medsr.io holds those images as (X =
  columns, Y = rows), so that plane is transposed. Every other plane (NIfTI, or a plane reformatted across DICOM
  slices) is ``np.moveaxis(data, axis, 0)``. The SR planes are put back through the same view, so the output keeps
  medsr.io's layout.

:func:`super_resolve_volume` runs the pipeline over every plane along one axis and denormalizes the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.errors import InputError
from medsr.io.affine import upsample_affine
from medsr.io.image import Volume
from medsr.io.normalize import IntensityWindow, denormalize, fit_window, normalize

#: Smallest plane side (pixels) any model takes: a side of one pixel has no in-plane structure to super-resolve.
MIN_PLANE_SIDE = 2


def choose_slice_axis(zooms: Sequence[float], shape: Sequence[int] | None = None) -> int:
    """The through-plane axis: the length-1 axis when ``shape`` has exactly one (a 2D image), else the axis with the
    largest voxel spacing (ties: the last such axis). A volume with two length-1 axes (a line of voxels) gets the
    spacing rule, and its planes are then refused by :func:`check_plane_size`: never a silent switch of plane."""
    if shape is not None and list(shape[:3]).count(1) == 1:
        return list(shape[:3]).index(1)
    return max(range(3), key=lambda axis: (zooms[axis], axis))


def window_percentiles(bundle) -> tuple[float, float]:
    """(low, high) percentiles of the bundle's intensity window (docs/bundle.md, ``task.intensity``)."""
    intensity = bundle.manifest.task.intensity
    return intensity.low, intensity.high


def min_plane_side(bundle) -> int:
    """The smallest plane side (LR pixels) ``bundle``'s model takes."""
    return max(MIN_PLANE_SIDE, bundle.lr_multiple)


@dataclass(frozen=True)
class NetworkInput:
    """An image ready for the network: its voxels (input units) and the window that maps them to [-1, 1].

    ``data``: float32 (X, Y, Z) or (X, Y, Z, T) in medsr.io's layout; ``window``: input intensities mapped to -1
    and +1 (low > high for MONOCHROME1); ``display``: planes along axis 2 are shown as (rows, columns) (a DICOM,
    PNG or TIFF image; module docstring); ``path``: the file, named in errors.
    """

    path: Path
    data: np.ndarray
    window: IntensityWindow
    display: bool

    def plane_shape(self, axis: int) -> tuple[int, int]:
        """(H, W) of the planes along ``axis``, in the orientation the network sees."""
        height, width = (self.data.shape[a] for a in range(3) if a != axis)
        return (width, height) if self.display and axis == 2 else (height, width)

    def planes_view(self, array: np.ndarray, axis: int) -> np.ndarray:
        """A view (N, H, W) of the 3D ``array`` (X, Y, Z)-shaped like ``data``, or its upsampled counterpart, with
        its planes along ``axis`` in the network's orientation: writing to it writes ``array``."""
        stack = np.moveaxis(array, axis, 0)
        return stack.transpose(0, 2, 1) if self.display and axis == 2 else stack

    def planes(self, axis: int, frame: int = 0, start: int = 0, stop: int | None = None, clip: bool = True):
        """(planes ``start:stop`` along ``axis`` of ``frame``, normalized float32 (n, H, W), fraction outside the
        window). ``clip=False`` keeps values outside [-1, 1], as the engine does so that data consistency sees the
        measured values; the pipeline clips them for the networks."""
        volume = self.data[..., frame] if self.data.ndim == 4 else self.data
        return normalize(self.planes_view(volume, axis)[start:stop], self.window, clip=clip)

    def crop(self, box: Sequence[tuple[int | None, int | None] | None]) -> NetworkInput:
        """The same input cut to a voxel ``box`` ((start, stop) or None per spatial axis); the window is kept."""
        region = tuple(slice(*r) if r is not None else slice(None) for r in box)
        return NetworkInput(self.path, self.data[region], self.window, self.display)


def prepare_input(volume: Volume, percentiles: tuple[float, float], frame: int | None = None) -> NetworkInput:
    """``volume`` (one ``frame`` of a 4D one, or all frames when None) ready for the network (module docstring).

    ``percentiles``: (low, high) of the window, from the bundle (:func:`window_percentiles`) or the training preset.
    Raises InputError naming the file for a frame it does not have or a constant image.
    """
    data = volume.data
    if frame is not None:
        if data.ndim != 4 or not 0 <= frame < data.shape[3]:
            raise InputError(f"{volume.path}: --frame {frame} but the image has shape {data.shape}")
        data = data[..., frame]
    try:
        window = fit_window(data, *percentiles)
    except InputError as exc:
        raise InputError(f"{volume.path}: {exc}") from exc
    if volume.inverted:
        window = IntensityWindow(window.high, window.low)
    return NetworkInput(volume.path, data, window, display=volume.format != "nifti")


def check_plane_size(prepared: NetworkInput, axis: int, minimum: int) -> None:
    """Refuse planes along ``axis`` with a side under ``minimum`` pixels, naming the file and the sizes."""
    height, width = prepared.plane_shape(axis)
    if min(height, width) < minimum:
        shape = "x".join(map(str, prepared.data.shape[:3]))
        raise InputError(
            f"{prepared.path}: planes of {height}x{width} pixels (axis {axis} of {shape}) are smaller than this "
            f"model's minimum of {minimum}x{minimum}"
        )


@dataclass(frozen=True)
class VolumeResult:
    """An SR volume (float32, input units), its affine, and what the run did.

    ``window``: the input intensities mapped to -1 and +1; ``clipped_fraction``: the fraction of input voxels outside
    it; ``residuals``: each plane's consistency residual.
    """

    data: np.ndarray
    affine: np.ndarray
    axis: int
    slices: int
    window: IntensityWindow
    clipped_fraction: float
    residuals: np.ndarray


def super_resolve_volume(
    prepared: NetworkInput,
    affine: np.ndarray,
    pipeline: LatentSRPipeline,
    axis: int,
    options: SamplingOptions,
    progress: Callable[[int], None] | None = None,
) -> VolumeResult:
    """Super-resolve every plane of ``prepared`` along spatial ``axis``; ``affine`` is the input's (voxel -> mm).

    Plane i of frame k is seeded with index k * n_planes + i, so each output voxel is reproducible on its own.
    Planes go to the pipeline ``options.batch_size`` at a time and are written straight into the output volume.
    """
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2, got {axis}")
    check_plane_size(prepared, axis, min_plane_side(pipeline.bundle))
    frames = prepared.data[..., None] if prepared.data.ndim == 3 else prepared.data
    factors = [pipeline.bundle.scale] * 3
    factors[axis] = 1
    out = np.empty((*(n * f for n, f in zip(frames.shape[:3], factors)), frames.shape[3]), dtype=np.float32)
    clipped, residuals = [], []
    n_planes = frames.shape[axis]
    for frame in range(frames.shape[3]):
        target = prepared.planes_view(out[..., frame], axis)
        for start in range(0, n_planes, options.batch_size):
            normalized, fraction = prepared.planes(axis, frame, start, start + options.batch_size, clip=False)
            clipped.append(fraction * len(normalized))
            first = frame * n_planes + start
            result = pipeline.super_resolve(normalized, options, progress=progress, first_index=first)
            target[start : start + len(normalized)] = denormalize(result.images, prepared.window)
            residuals.append(result.residuals)
    return VolumeResult(
        data=out if prepared.data.ndim == 4 else out[..., 0],
        affine=upsample_affine(affine, factors),
        axis=axis,
        slices=n_planes * frames.shape[3],
        window=prepared.window,
        clipped_fraction=float(np.sum(clipped)) / (n_planes * frames.shape[3]),
        residuals=np.concatenate(residuals),
    )
