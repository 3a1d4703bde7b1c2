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

:func:`super_resolve_volume` runs the pipeline over every plane along one axis and denormalizes the result (an
in-plane task: s x s on each slice). :func:`super_resolve_through_plane` makes a thick-slice volume (near)
isotropic with a through-plane task (1 x s): it runs the 2D model on the planes of both orientations that contain
the slice axis, the slice direction as the planes' second axis, averages the two, projects the result exactly onto
the measured slices and keeps every measured slice at its world position (docs/conventions.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.bundle.manifest import IN_PLANE, THROUGH_PLANE
from medsr.degrade import ThickSlices, check_consistency
from medsr.degrade.slices import thick_slice_pinv
from medsr.engine.pipeline import LatentSRPipeline, PlaneBatch, SamplingOptions, SRResult
from medsr.errors import BundleError, InputError
from medsr.io.affine import upsample_affine, upsample_affine_along
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
    overlap: bool | None = None,
) -> VolumeResult:
    """Super-resolve every plane of ``prepared`` along spatial ``axis``; ``affine`` is the input's (voxel -> mm).

    Plane i of frame k is seeded with index k * n_planes + i, so each output voxel is reproducible on its own (with
    shared noise every plane draws the field of stack 0, ``options.noise``).
    Planes go to the pipeline ``options.batch_size`` at a time, normalized as they are drawn, and are denormalized
    straight into the output volume; ``overlap`` does both on the pipeline's host-stage thread while the engine runs
    the batch between them (LatentSRPipeline.super_resolve_batches; None: when the engine is not on the CPU).
    """
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2, got {axis}")
    check_task_plane(pipeline.bundle, through_plane=False)
    check_plane_size(prepared, axis, min_plane_side(pipeline.bundle))
    frames = prepared.data[..., None] if prepared.data.ndim == 3 else prepared.data
    factors = [pipeline.bundle.scale] * 3
    factors[axis] = 1
    out = np.empty((*(n * f for n, f in zip(frames.shape[:3], factors)), frames.shape[3]), dtype=np.float32)
    clipped, residuals = [], []
    n_planes = frames.shape[axis]

    def batches():
        for frame in range(frames.shape[3]):
            for start in range(0, n_planes, options.batch_size):
                normalized, fraction = prepared.planes(axis, frame, start, start + options.batch_size, clip=False)
                clipped.append(fraction * len(normalized))
                yield PlaneBatch(normalized, frame * n_planes + start, key=(frame, start))

    def sink(batch: PlaneBatch, result: SRResult) -> None:
        frame, start = batch.key
        target = prepared.planes_view(out[..., frame], axis)
        target[start : start + len(result.images)] = denormalize(result.images, prepared.window)
        residuals.append(result.residuals)

    pipeline.super_resolve_batches(batches(), options, sink, progress, overlap=overlap)
    return VolumeResult(
        data=out if prepared.data.ndim == 4 else out[..., 0],
        affine=upsample_affine(affine, factors),
        axis=axis,
        slices=n_planes * frames.shape[3],
        window=prepared.window,
        clipped_fraction=float(np.sum(clipped)) / (n_planes * frames.shape[3]),
        residuals=np.concatenate(residuals),
    )


def check_task_plane(bundle, through_plane: bool) -> None:
    """Refuse a bundle whose task (``task.plane``) is not the run's: ``--through-plane`` needs a through-plane
    model, an in-plane run (medsr-infer without it, medsr-eval) an in-plane one. One line naming the bundle and
    both."""
    wanted = THROUGH_PLANE if through_plane else IN_PLANE
    if bundle.plane != wanted:
        advice = "run it with medsr-infer --through-plane"
        if bundle.plane == IN_PLANE:
            advice = "--through-plane needs a through-plane --model"
        raise InputError(
            f"{bundle.root}: model {bundle.name!r} is {bundle.plane} (task.plane), but this run is {wanted}; {advice}"
        )


def dicom_slice_thickness(volume: Volume) -> float | None:
    """The DICOM SliceThickness (mm) of ``volume``'s first slice, or None for other formats or when missing."""
    if volume.format != "dicom" or not getattr(volume.meta, "datasets", None):
        return None
    from medsr.io.dicom import read_floats

    value = read_floats(volume.meta.datasets[0], "SliceThickness", 1)
    return float(value[0]) if value is not None and value[0] > 0 else None


@dataclass(frozen=True)
class ThroughPlanePlan:
    """How a thick-slice volume is made (near) isotropic.

    ``axis``: the slice axis (0, 1 or 2 of medsr.io's layout); ``scale``: s, HR voxels per measured slice;
    ``spacing``: the slice spacing (mm); ``in_plane``: the mean voxel spacing of the two other axes (mm);
    ``thickness``: the slice thickness (mm, the FWHM of the slice profile) and ``thickness_source`` where it came from;
    ``profile``: the slice profile of the model's degradation (``"gaussian"`` or ``"box"``).
    """

    axis: int
    scale: int
    spacing: float
    in_plane: float
    thickness: float
    thickness_source: str
    profile: str

    @property
    def output_spacing(self) -> float:
        """The SR voxel spacing along the slice axis (mm): the slice spacing / s."""
        return self.spacing / self.scale

    @property
    def isotropic(self) -> bool:
        """Whether the output spacing along the slice axis is the in-plane spacing (to 0.1 %)."""
        return math.isclose(self.output_spacing, self.in_plane, rel_tol=1e-3)

    @property
    def acquisition(self) -> ThickSlices:
        """The measurement along the slice axis on the SR grid: the profile of FWHM thickness / output spacing HR
        voxels, one slice every s voxels, LR slice i on HR voxel s*i + (s-1)/2."""
        return ThickSlices(self.scale, self.axis, self.profile, self.thickness / self.output_spacing)

    def describe(self) -> str:
        """One line for the summary: factor, spacings, thickness, and whether the output is isotropic."""
        text = (
            f"through-plane x{self.scale} along axis {self.axis}: slices every {self.spacing:g} mm "
            f"({self.thickness:g} mm thick, {self.thickness_source}) -> {self.output_spacing:g} mm"
        )
        if not self.isotropic:
            text += f", not isotropic (in-plane {self.in_plane:g} mm)"
        return text

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "output_spacing": self.output_spacing, "isotropic": self.isotropic}


def plan_through_plane(
    volume: Volume,
    bundle,
    axis: int | None = None,
    scale: int | None = None,
    thickness: float | None = None,
) -> ThroughPlanePlan:
    """Decide the through-plane run of ``volume`` with a through-plane ``bundle`` and check it before any model runs.

    ``axis``: the slice axis (default: the largest spacing); ``scale``: s, one of the factors the model serves
    (``bundle.scales``; default round(slice spacing / in-plane spacing)); ``thickness``: the slice thickness in mm
    (default: DICOM SliceThickness where known, else the slice spacing). Raises InputError naming the file for a 2D
    image, a volume not anisotropic enough (s < 2), a factor the model does not serve, planes smaller than the
    model's minimum, or a slice profile too wide for exact consistency, and a bundle that is not through-plane.
    """
    check_task_plane(bundle, through_plane=True)
    shape = volume.data.shape[:3]
    if 1 in shape:
        raise InputError(f"{volume.path}: --through-plane needs a volume of slices, got shape {volume.data.shape}")
    zooms = volume.zooms
    axis = max(range(3), key=lambda a: (zooms[a], a)) if axis is None else axis
    others = [a for a in range(3) if a != axis]
    spacing, in_plane = zooms[axis], float(np.mean([zooms[a] for a in others]))
    factor = round(spacing / in_plane) if scale is None else scale
    if factor < 2:
        raise InputError(
            f"{volume.path}: not anisotropic enough for --through-plane: slices every {spacing:g} mm over "
            f"{in_plane:g} mm in-plane make x{factor} (x2 or more needed; --through-plane-scale sets it)"
        )
    if factor not in bundle.scales:
        served = ", ".join(f"x{s}" for s in bundle.scales)
        choices = "; ".join(f"--through-plane-scale {s} gives {spacing / s:g} mm" for s in bundle.scales)
        wanted = f"slices every {spacing:g} mm over {in_plane:g} mm in-plane need"
        if scale is not None:
            wanted = f"--through-plane-scale {factor} asks for"
        raise InputError(
            f"{volume.path}: {wanted} x{factor} through-plane, but model {bundle.name!r} upsamples {served}; {choices}"
        )
    source = "--slice-thickness"
    if thickness is None:
        thickness, source = dicom_slice_thickness(volume), "DICOM SliceThickness"
    if thickness is None:
        thickness, source = spacing, "the slice spacing"
    plan = ThroughPlanePlan(
        axis, factor, spacing, in_plane, float(thickness), source, bundle.manifest.task.degradation.profile
    )
    minimum = min_plane_side(bundle)
    if min(shape) < minimum:
        raise InputError(
            f"{volume.path}: a volume of {'x'.join(map(str, shape))} voxels makes planes with a side under this "
            f"model's minimum of {minimum}"
        )
    try:
        thick_slice_pinv(shape[axis] * factor, factor, plan.acquisition.slice_profile)
    except InputError as exc:
        raise InputError(f"{volume.path}: slice thickness {thickness:g} mm ({source}): {exc}") from None
    return plan


def _orientations(axis: int) -> list[tuple[int, int, int]]:
    """The two orientations of planes containing the slice ``axis``: (stacked axis, row axis, slice axis), the
    stacked axis first the lower-numbered other axis (orientation 0), then the higher one (orientation 1)."""
    low, high = (a for a in range(3) if a != axis)
    return [(low, high, axis), (high, low, axis)]


def super_resolve_through_plane(
    prepared: NetworkInput,
    affine: np.ndarray,
    pipeline: LatentSRPipeline,
    plan: ThroughPlanePlan,
    options: SamplingOptions,
    progress: Callable[[int], None] | None = None,
    overlap: bool | None = None,
) -> VolumeResult:
    """Upsample ``prepared`` by ``plan.scale`` along the slice axis with a through-plane model (module docstring).

    For each of the two orientations (:func:`_orientations`), the planes (stacked axis, row axis, slice axis) are
    super-resolved as (N, h, w) -> (N, h, s*w) in batches of ``options.batch_size``; the two SR volumes are averaged
    and, unless ``options.consistency`` (default the bundle's) is ``"none"``, projected exactly onto the measured
    slices with ``plan.acquisition`` (``backproject`` converges to that projection, which is computed directly), in
    the input's units. Seeds: per-plane noise numbers the planes of orientation 0 first, then those of orientation
    1, frame after frame; shared noise gives every plane of orientation o the field of ``default_rng([seed, o])``
    (docs/conventions.md, seeds). Planes are ``np.moveaxis`` views of medsr.io's layout, without the display
    transposition of in-plane DICOM slices: the slice direction is always their second axis. ``residuals`` are the
    relative residuals ||A(SR) - LR|| / ||LR|| of every measured slice (and frame). The affine keeps LR slice i at
    HR voxel s*i + (s-1)/2 along the slice axis. ``overlap``: as for :func:`super_resolve_volume`, within each
    frame.
    """
    check_task_plane(pipeline.bundle, through_plane=True)
    if plan.scale != pipeline.bundle.scale:
        try:
            bundle = pipeline.bundle.with_scale(plan.scale)
        except BundleError as exc:
            raise InputError(f"{prepared.path}: plan x{plan.scale}: {exc}") from None
        pipeline = LatentSRPipeline(bundle, pipeline.sessions, pipeline.scheduler_config)
    bundle = pipeline.bundle
    consistency = options.consistency or bundle.manifest.task.consistency
    check_consistency(consistency, pipeline.degradation)
    plane_options = dataclasses.replace(options, consistency="none")  # the fused volume is projected instead
    frames = prepared.data[..., None] if prepared.data.ndim == 3 else prepared.data
    shape = list(frames.shape[:3])
    shape[plan.axis] *= plan.scale
    out = np.empty((*shape, frames.shape[3]), dtype=np.float32)
    orientations = _orientations(plan.axis)
    per_frame = sum(frames.shape[stacked] for stacked, _, _ in orientations)
    clipped, residuals = 0.0, []

    def batches(measured: np.ndarray, first: int):
        nonlocal clipped
        for stack, order in enumerate(orientations):
            planes = np.moveaxis(measured, order, (0, 1, 2))
            for start in range(0, planes.shape[0], options.batch_size):
                batch = planes[start : start + options.batch_size]
                normalized, fraction = normalize(batch, prepared.window, clip=False)
                if stack == 0:
                    clipped += fraction * normalized.size
                yield PlaneBatch(normalized, first + start, stack, key=(order, start))
            first += planes.shape[0]

    for frame in range(frames.shape[3]):
        measured = frames[..., frame]
        fused = np.zeros(shape, dtype=np.float32)

        def sink(batch: PlaneBatch, result: SRResult, fused=fused) -> None:
            order, start = batch.key
            np.moveaxis(fused, order, (0, 1, 2))[start : start + len(result.images)] += result.images

        first = frame * per_frame
        pipeline.super_resolve_batches(batches(measured, first), plane_options, sink, progress, overlap=overlap)
        fused *= np.float32(0.5)
        sr = denormalize(fused, prepared.window)
        if consistency != "none":
            sr = plan.acquisition.project(sr, measured)
        out[..., frame] = sr
        residuals.append(_slice_residuals(plan.acquisition, sr, measured))
    return VolumeResult(
        data=out if prepared.data.ndim == 4 else out[..., 0],
        affine=upsample_affine_along(affine, plan.axis, plan.scale),
        axis=plan.axis,
        slices=per_frame * frames.shape[3],
        window=prepared.window,
        clipped_fraction=clipped / frames.size,
        residuals=np.concatenate(residuals),
    )


def _slice_residuals(acquisition: ThickSlices, sr: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """||A(sr)_i - lr_i|| / ||lr_i|| of every measured slice i along the slice axis (float64; 0 for a slice that is
    zero in both, inf where only the measurement is zero)."""
    other = tuple(a for a in range(3) if a != acquisition.axis)
    num = np.sqrt(np.sum((acquisition.forward(sr).astype(np.float64) - measured) ** 2, axis=other))
    den = np.sqrt(np.sum(np.asarray(measured, np.float64) ** 2, axis=other))
    return np.divide(num, den, out=np.where(num == 0, 0.0, np.inf), where=den > 0)
