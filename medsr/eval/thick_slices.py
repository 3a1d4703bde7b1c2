"""Through-plane fidelity: thick slices simulated from isotropic volumes, made isotropic again, measured in 3D.

The work behind ``medsr-eval through-plane`` (docs/through_plane.md). For every truth volume (an isotropic
held-out volume, input units) and every factor s:

- The truth is centre-cropped along the slice ``axis`` to a multiple of s, and the measured thick slices are
  LR = A(truth) with :class:`medsr.degrade.ThickSlices` (``profile`` Gaussian or box, ``fwhm`` in HR voxels, default
  s: contiguous slices; LR slice i on HR voxel s*i + (s-1)/2, docs/conventions.md).
- Baselines interpolate LR back along the slice axis alone (:func:`medsr.degrade.upsample_slices`: linear, cubic
  B-spline, sinc), on the same geometry, so none is penalised by a shift.
- A through-plane model runs through ``super_resolve_through_plane``, the volume core of
  ``medsr-infer --through-plane`` (both orientations, fused, projected onto the measured slices), on a thick-slice
  :class:`~medsr.io.image.Volume` whose spacing along the slice axis is s HR voxels; ``--engine`` chooses a
  torch-free engine by default.
- ECLARE (``run-eclare``, an optional peer; docs/sources.md, "Through-plane super-resolution") runs on the LR volume
  written as NIfTI when it is on PATH.

Metrics (:func:`volume_metrics`), against the cropped truth, in input units with ``data_range`` the span of the
truth's 0.5 / 99.5 percentile window (:data:`DATA_RANGE_PERCENTILES`):

- over the volume: PSNR (skimage.metrics.peak_signal_noise_ratio) and 3D SSIM (skimage.metrics.structural_similarity
  with the Gaussian window of :mod:`medsr.eval.metrics`), each also over the foreground mask
  (:func:`foreground_mask`): PSNR of the masked voxels' MSE, SSIM the mean of the SSIM map over the masked voxels
  whose window lies inside the volume;
- per orientation (the axial, sagittal and coronal reformats, named from the affine): the mean over the planes with
  foreground (at least :data:`PLANE_FOREGROUND` of their pixels) of each plane's PSNR and 2D SSIM, whole and over
  the mask;
- through-plane continuity (:func:`plane_differences`): the mean absolute difference between consecutive planes
  along the slice axis within the mask, for the output and the truth; ``continuity_error`` is the mean of their
  absolute difference over data_range (0 for the truth itself) and ``continuity_ratio`` the output's mean over the
  truth's (below 1: smoother than the truth; jumps at the measured slices show in the figure).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsr.degrade import ThickSlices, upsample_slices
from medsr.degrade.slices import SLICE_BASELINES
from medsr.errors import InputError, ShapeError
from medsr.eval.metrics import SSIM_K1, SSIM_K2, SSIM_RADIUS, SSIM_SIGMA

#: Percentiles of the truth whose span is the PSNR peak and the SSIM range (the window medsr fits by default).
DATA_RANGE_PERCENTILES = (0.5, 99.5)
#: A plane enters the per-orientation means when at least this fraction of its pixels is foreground.
PLANE_FOREGROUND = 0.05
#: Factors of the command (3-6 mm slices over 1 mm voxels, and 2 mm).
FACTORS = (2, 3, 4, 5, 6)
TRUTH = "truth"
ECLARE = "eclare"
ECLARE_COMMAND = "run-eclare"
ORIENTATIONS = ("axial", "sagittal", "coronal")
_ORIENTATION_OF_CODE = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}


# --- truth volumes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthVolume:
    """An isotropic volume to make thick slices from: ``data`` float32 (X, Y, Z) in input units, ``affine`` voxel ->
    RAS mm (of ``data``, its box already cut), ``name`` its source name, ``path`` the file."""

    name: str
    path: Path
    data: np.ndarray
    affine: np.ndarray

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))


def _crop_affine(affine: np.ndarray, starts) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = starts
    return np.asarray(affine, np.float64) @ shift


def load_truth_volumes(inputs: list[str | os.PathLike]) -> list[TruthVolume]:
    """Truth volumes from files (NIfTI, frame 0 of a 4D one) or default-split source names (``colin27-slab``,
    ``default:heldout``: their voxel box is cut); 2D images are refused naming them, as are volumes whose voxels
    are not isotropic to 1 % (thick slices are simulated in HR voxels)."""
    from medsr.eval.slices import eval_sources
    from medsr.io.formats import load_image

    volumes = []
    for source in eval_sources(inputs):
        if not source.is_volume:
            raise InputError(f"{source.path}: source {source.name} is a 2D image; through-plane needs a volume")
        volume = load_image(source.path)
        data = volume.data if volume.data.ndim == 3 else volume.data[..., source.frame or 0]
        starts = [0, 0, 0]
        if source.box is not None:
            region = []
            for axis, bounds in enumerate(source.box):
                bounds = slice(None) if bounds is None else slice(*bounds)
                start, _, _ = bounds.indices(data.shape[axis])
                starts[axis] = start
                region.append(bounds)
            data = data[tuple(region)]
        if 1 in data.shape or data.ndim != 3:
            raise InputError(f"{source.path}: source {source.name} has shape {data.shape}, not a volume")
        data = np.ascontiguousarray(data, np.float32)
        truth = TruthVolume(source.name, source.path, data, _crop_affine(volume.affine, starts))
        zooms = truth.zooms
        if max(zooms) > 1.01 * min(zooms):
            raise InputError(
                f"{source.path}: voxels of {' x '.join(f'{z:g}' for z in zooms)} mm are not isotropic; thick slices "
                "are simulated from an isotropic truth"
            )
        volumes.append(truth)
    return volumes


def crop_to_multiple(data: np.ndarray, affine: np.ndarray, axis: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop ``data`` along ``axis`` to a multiple of ``multiple`` voxels (ShapeError when under one), and the
    affine of the crop."""
    n = data.shape[axis]
    keep = n - n % multiple
    if keep < multiple:
        raise ShapeError(f"axis {axis} has {n} voxels, fewer than one thick slice of {multiple}")
    start = (n - keep) // 2
    starts = [0, 0, 0]
    starts[axis] = start
    index = [slice(None)] * data.ndim
    index[axis] = slice(start, start + keep)
    return data[tuple(index)], _crop_affine(affine, starts)


def orientation_axes(affine: np.ndarray) -> dict[str, int]:
    """``{"axial": a, "sagittal": b, "coronal": c}``: the voxel axis whose planes are each reformat, from the
    affine's nearest world axis (the plane of voxel axis k is perpendicular to it; R/L -> sagittal, A/P -> coronal,
    S/I -> axial). An oblique affine whose axes map to one world axis twice falls back to axis 2 axial, 0
    sagittal, 1 coronal."""
    import nibabel as nib

    codes = nib.aff2axcodes(np.asarray(affine, np.float64))
    named = {_ORIENTATION_OF_CODE.get(code): axis for axis, code in enumerate(codes)}
    if set(named) != set(ORIENTATIONS):
        return {"axial": 2, "sagittal": 0, "coronal": 1}
    return {name: named[name] for name in ORIENTATIONS}


# --- metrics --------------------------------------------------------------------------------------------------------


def data_range_of(truth: np.ndarray) -> float:
    """The span of ``truth``'s :data:`DATA_RANGE_PERCENTILES` window (InputError for a constant volume)."""
    low, high = np.percentile(np.asarray(truth, np.float64), DATA_RANGE_PERCENTILES)
    if not high > low:
        raise InputError("the truth volume is constant over its percentile window; nothing to measure")
    return float(high - low)


def foreground_mask(truth: np.ndarray) -> np.ndarray:
    """Foreground of ``truth`` (bool, same shape): voxels above its Otsu threshold
    (skimage.filters.threshold_otsu), holes filled (scipy.ndimage.binary_fill_holes)."""
    from scipy.ndimage import binary_fill_holes
    from skimage.filters import threshold_otsu

    truth = np.asarray(truth, np.float64)
    if truth.min() == truth.max():
        raise InputError("the truth volume is constant: no foreground to measure")
    return binary_fill_holes(truth > threshold_otsu(truth))


def _ssim_map(pred: np.ndarray, ref: np.ndarray, data_range: float) -> np.ndarray | None:
    """SSIM map (skimage, the settings of :func:`medsr.eval.metrics.ssim`), None when a side is under the window."""
    from skimage.metrics import structural_similarity

    if min(ref.shape) < 2 * SSIM_RADIUS + 1:
        return None
    _, full = structural_similarity(
        ref,
        pred,
        data_range=data_range,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        K1=SSIM_K1,
        K2=SSIM_K2,
        full=True,
    )
    return full


def _interior(shape: tuple[int, ...]) -> np.ndarray:
    """Voxels whose SSIM window lies inside the array (the ones skimage's mean SSIM averages)."""
    inside = np.zeros(shape, bool)
    inside[(slice(SSIM_RADIUS, -SSIM_RADIUS),) * len(shape)] = True
    return inside


def _psnr(pred: np.ndarray, ref: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    if mask is not None:
        if not mask.any():
            return math.nan
        pred, ref = pred[mask], ref[mask]
    if np.array_equal(pred, ref):
        return math.inf
    return float(peak_signal_noise_ratio(ref, pred, data_range=data_range))


def _region_metrics(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float) -> dict[str, float]:
    """psnr, ssim, psnr_fg, ssim_fg of one region (a volume or a plane); SSIM NaN under the window."""
    full = _ssim_map(pred, ref, data_range)
    row = {"psnr": _psnr(pred, ref, data_range), "psnr_fg": _psnr(pred, ref, data_range, mask)}
    if full is None:
        row.update(ssim=math.nan, ssim_fg=math.nan)
    else:
        inside = _interior(ref.shape)
        kept = inside & mask
        row["ssim"] = float(full[inside].mean())
        row["ssim_fg"] = float(full[kept].mean()) if kept.any() else math.nan
    return {key: row[key] for key in ("psnr", "ssim", "psnr_fg", "ssim_fg")}


def _finite_mean(values) -> float:
    arr = np.asarray(values, np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def orientation_metrics(
    pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, data_range: float, axis: int
) -> dict[str, float]:
    """The means over the planes along ``axis`` with foreground (>= :data:`PLANE_FOREGROUND` of their pixels) of
    each plane's psnr, ssim, psnr_fg, ssim_fg (non-finite plane values left out), and ``planes`` (how many)."""
    rows = []
    for index in range(ref.shape[axis]):
        plane_mask = np.take(mask, index, axis=axis)
        if plane_mask.mean() < PLANE_FOREGROUND:
            continue
        rows.append(
            _region_metrics(np.take(pred, index, axis=axis), np.take(ref, index, axis=axis), plane_mask, data_range)
        )
    means = {key: _finite_mean([row[key] for row in rows]) for key in ("psnr", "ssim", "psnr_fg", "ssim_fg")}
    return {**means, "planes": len(rows)}


def plane_differences(volume: np.ndarray, axis: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute difference between consecutive planes along ``axis`` (length n - 1, float64): d_i = mean of
    |v[i+1] - v[i]| over the pixels foreground in either plane (all pixels when ``mask`` is None; NaN where
    neither plane has any)."""
    v = np.moveaxis(np.asarray(volume, np.float64), axis, 0)
    diff = np.abs(np.diff(v, axis=0)).reshape(v.shape[0] - 1, -1)
    if mask is None:
        return diff.mean(axis=1)
    m = np.moveaxis(np.asarray(mask, bool), axis, 0)
    either = (m[1:] | m[:-1]).reshape(diff.shape)
    counts = either.sum(axis=1)
    sums = np.where(either, diff, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(counts), np.nan), where=counts > 0)


def continuity(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, axis: int, data_range: float) -> dict:
    """``continuity_error`` = mean |d_pred - d_ref| / data_range and ``continuity_ratio`` = mean d_pred / mean d_ref
    (:func:`plane_differences` within the mask along the slice ``axis``), and the profile d_pred itself."""
    d_pred, d_ref = plane_differences(pred, axis, mask), plane_differences(ref, axis, mask)
    both = np.isfinite(d_pred) & np.isfinite(d_ref)
    error = float(np.mean(np.abs(d_pred[both] - d_ref[both]))) / data_range if both.any() else math.nan
    ratio = float(np.mean(d_pred[both]) / np.mean(d_ref[both])) if both.any() and np.mean(d_ref[both]) > 0 else math.nan
    return {"continuity_error": error, "continuity_ratio": ratio, "profile": d_pred}


def volume_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    data_range: float,
    slice_axis: int,
    orientations: dict[str, int] | None = None,
) -> dict:
    """Every metric of one output against the truth (module docstring): ``{"volume": {psnr, ssim, psnr_fg,
    ssim_fg}, "orientations": {name: {... , planes}}, "continuity_error", "continuity_ratio", "continuity_profile"}``.
    ``orientations``: voxel axis of each reformat (default :func:`orientation_axes` of an identity affine)."""
    pred = np.asarray(pred, np.float64)
    ref = np.asarray(ref, np.float64)
    mask = np.asarray(mask, bool)
    if pred.shape != ref.shape or mask.shape != ref.shape or ref.ndim != 3:
        raise ShapeError(f"output {pred.shape}, truth {ref.shape} and mask {mask.shape} must be one 3D shape")
    if not np.all(np.isfinite(pred)):
        raise InputError(f"the output has {int(np.sum(~np.isfinite(pred)))} NaN or Inf voxels")
    orientations = orientations or {"axial": 2, "sagittal": 0, "coronal": 1}
    flow = continuity(pred, ref, mask, slice_axis, data_range)
    return {
        "volume": _region_metrics(pred, ref, mask, data_range),
        "orientations": {
            name: orientation_metrics(pred, ref, mask, data_range, axis) for name, axis in orientations.items()
        },
        "continuity_error": flow["continuity_error"],
        "continuity_ratio": flow["continuity_ratio"],
        "continuity_profile": flow["profile"],
    }


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThickSliceSettings:
    """What to simulate and measure: ``factors`` (slice spacing s in HR voxels), the slice ``profile`` and its
    ``fwhm`` in HR voxels (None: s), the slice ``axis``, the ``baselines`` of
    :data:`medsr.degrade.slices.SLICE_BASELINES`, and whether to run ECLARE (None: when it is on PATH) with extra
    ``eclare_args``."""

    factors: tuple[int, ...] = (4,)
    profile: str = "gaussian"
    fwhm: float | None = None
    axis: int = 2
    baselines: tuple[str, ...] = SLICE_BASELINES
    eclare: bool | None = None
    eclare_args: str = ""

    def __post_init__(self):
        bad = [f for f in self.factors if isinstance(f, bool) or not isinstance(f, int) or not 2 <= f <= 6]
        if not self.factors or bad:
            raise InputError(f"factors must be integers in 2..6, got {list(self.factors)}")
        if len(set(self.factors)) != len(self.factors):
            raise InputError(f"factors must be distinct, got {list(self.factors)}")
        unknown = [b for b in self.baselines if b not in SLICE_BASELINES]
        if unknown:
            raise InputError(f"unknown slice baseline(s) {unknown}; expected among {SLICE_BASELINES}")
        if self.axis not in (0, 1, 2):
            raise InputError(f"slice axis must be 0, 1 or 2, got {self.axis}")
        for factor in self.factors:
            self.acquisition(factor)  # checks the profile and fwhm

    def fwhm_at(self, factor: int) -> float:
        return float(factor) if self.fwhm is None else float(self.fwhm)

    def acquisition(self, factor: int) -> ThickSlices:
        return ThickSlices(factor, self.axis, self.profile, self.fwhm_at(factor))


def eclare_available() -> str | None:
    """Path of ``run-eclare`` when it is on PATH, else None."""
    return shutil.which(ECLARE_COMMAND)


def eclare_note(settings: ThickSliceSettings) -> str:
    """One line on ECLARE: skipped (not on PATH, or --no-eclare) or the settings it runs with."""
    found = eclare_available()
    if settings.eclare is False:
        return "ECLARE skipped: --no-eclare"
    if found is None:
        return f"ECLARE skipped: {ECLARE_COMMAND} is not on PATH (pip install eclare)"
    extra = f" {settings.eclare_args}" if settings.eclare_args else ""
    return (
        f"ECLARE: {found} --in-fpath LR.nii.gz --out-dir DIR{extra} (its defaults otherwise: slice profile estimated "
        "by ESPRESO, WDSR 16 blocks x 256 channels, 1,000,000 patches)"
    )


def run_eclare(lr: np.ndarray, lr_affine: np.ndarray, truth_shape: tuple[int, ...], extra_args: str) -> np.ndarray:
    """Run ``run-eclare`` on the LR volume (a NIfTI in a temporary directory) and return its output volume, which
    must have the truth's shape (ECLARE writes on the HR grid); InputError naming what failed otherwise."""
    import nibabel as nib

    with tempfile.TemporaryDirectory(prefix="medsr-eclare-") as tmp:
        src = Path(tmp) / "lr.nii.gz"
        image = nib.Nifti1Image(np.asarray(lr, np.float32), lr_affine)
        image.set_qform(lr_affine, code=1)
        image.set_sform(lr_affine, code=1)
        nib.save(image, src)
        out = Path(tmp) / "out"
        command = [ECLARE_COMMAND, "--in-fpath", str(src), "--out-dir", str(out), *shlex.split(extra_args)]
        done = subprocess.run(command, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise InputError(f"{ECLARE_COMMAND} failed (exit {done.returncode}): {tail[0]}")
        found = sorted(p for p in out.rglob("*") if p.name.endswith((".nii", ".nii.gz")))
        if not found:
            raise InputError(f"{ECLARE_COMMAND} wrote no NIfTI into its output directory")
        data = np.asarray(nib.load(found[0]).get_fdata(), np.float32)
    if data.shape != tuple(truth_shape):
        raise InputError(f"{ECLARE_COMMAND} wrote shape {data.shape}, not the truth's {tuple(truth_shape)}")
    return data


@dataclass
class FactorRun:
    """One (volume, factor): the cropped truth, its mask, the LR, every method's output and seconds, metrics."""

    volume: str
    factor: int
    fwhm: float
    shape: tuple[int, ...]
    data_range: float
    truth: np.ndarray
    mask: np.ndarray
    lr: np.ndarray
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    truth_profile: np.ndarray | None = None


@dataclass
class ModelRunner:
    """A through-plane model for the run: ``run(lr, lr_affine, axis, thickness_mm, factor)`` -> the SR volume on
    the truth's grid; ``name`` its configuration, ``scales`` the factors it serves, ``describe`` what it ran with,
    ``check`` (same arguments, LR of any content) its refusals without running (:func:`plan_check`)."""

    name: str
    scales: tuple[int, ...]
    run: Callable[[np.ndarray, np.ndarray, int, float, int], np.ndarray]
    describe: dict = field(default_factory=dict)
    check: Callable[[np.ndarray, np.ndarray, int, float, int], None] | None = None


def through_plane_runner(
    pipeline,
    options,
    name: str | None = None,
    describe: dict | None = None,
    pipeline_for: Callable | None = None,
) -> ModelRunner:
    """A :class:`ModelRunner` over ``super_resolve_through_plane`` (the core of ``medsr-infer --through-plane``):
    the LR volume is presented as a thick-slice NIfTI Volume (slices every s HR voxels), planned with
    ``plan_through_plane`` (axis, factor s, slice thickness = fwhm in mm) and run with ``options``; it serves every
    factor of the bundle's ``scales``. ``pipeline_for(prepared, plan)``, a context manager, gives the pipeline of
    each volume instead of ``pipeline`` (``medsr-eval through-plane --adapt``: the bundle adapted to that volume)."""
    from medsr.engine.volume import plan_through_plane, prepare_input, super_resolve_through_plane, window_percentiles

    bundle = pipeline.bundle

    def run(lr: np.ndarray, lr_affine: np.ndarray, axis: int, thickness_mm: float, factor: int) -> np.ndarray:
        volume = _thick_volume(lr, lr_affine)
        plan = plan_through_plane(volume, bundle, axis, factor, thickness_mm)
        prepared = prepare_input(volume, window_percentiles(bundle))
        if pipeline_for is None:
            return super_resolve_through_plane(prepared, lr_affine, pipeline, plan, options).data
        with pipeline_for(prepared, plan) as volume_pipeline:
            return super_resolve_through_plane(prepared, lr_affine, volume_pipeline, plan, options).data

    return ModelRunner(name or bundle.name, bundle.scales, run, describe or {}, plan_check(bundle))


def _thick_volume(lr: np.ndarray, lr_affine: np.ndarray):
    from medsr.io.image import Volume

    return Volume(Path("the thick slices"), np.asarray(lr, np.float32), lr_affine, "nifti")


def plan_check(bundle) -> Callable[[np.ndarray, np.ndarray, int, float, int], None]:
    """``check(lr, lr_affine, axis, thickness_mm, factor)``: ``plan_through_plane``'s refusals for ``bundle`` (a
    wrong task or factor, planes under its minimum, a profile too wide for exact consistency), without running
    anything."""
    from medsr.engine.volume import plan_through_plane

    def check(lr: np.ndarray, lr_affine: np.ndarray, axis: int, thickness_mm: float, factor: int) -> None:
        plan_through_plane(_thick_volume(lr, lr_affine), bundle, axis, factor, thickness_mm)

    return check


def lr_affine_of(affine: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """The affine of the thick slices of a volume with ``affine``: slice i on HR voxel s*i + (s-1)/2 along ``axis``
    (the inverse of medsr.io.affine.upsample_affine_along)."""
    from medsr.io.affine import upsample_affine_along

    return np.asarray(affine, np.float64) @ np.linalg.inv(upsample_affine_along(np.eye(4), axis, factor))


def check_model_factors(name: str, scales: tuple[int, ...], settings: ThickSliceSettings) -> None:
    """Refuse factors a model (``name``, serving the factors ``scales``) was not made for, in one line."""
    other = [f for f in settings.factors if f not in scales]
    if other:
        served = ", ".join(f"x{s}" for s in scales)
        give = f"--factor {scales[0]}" if len(scales) == 1 else f"--factor among {', '.join(map(str, scales))}"
        raise InputError(
            f"model {name!r} upsamples {served} through-plane, but --factor asks for "
            f"{', '.join(f'x{f}' for f in other)}; give {give} (or run the baselines without --model)"
        )


def methods_of(settings: ThickSliceSettings, model: ModelRunner | None) -> list[str]:
    """Configurations in report order: the model, the baselines, ECLARE (when it runs)."""
    names = ([model.name] if model is not None else []) + list(settings.baselines)
    if settings.eclare is not False and eclare_available() is not None:
        names.append(ECLARE)
    return names


def _simulated(truth_volume: TruthVolume, factor: int, settings: ThickSliceSettings):
    """The cropped truth, its affine and the thick slices' shape and affine at ``factor``."""
    truth, affine = crop_to_multiple(truth_volume.data, truth_volume.affine, settings.axis, factor)
    lr_shape = list(truth.shape)
    lr_shape[settings.axis] //= factor
    return truth, affine, tuple(lr_shape), lr_affine_of(affine, settings.axis, factor)


def check_runs(volumes: list[TruthVolume], settings: ThickSliceSettings, model: ModelRunner | None) -> None:
    """Refuse, before anything runs, a (volume, factor) the crop or the model cannot take (one line naming both):
    fewer voxels than one slice, thick slices too few for the model's planes, a profile too wide for its exact
    consistency, a factor it was not made for."""
    for volume in volumes:
        for factor in settings.factors:
            try:
                if model is not None:
                    check_model_factors(model.name, model.scales, ThickSliceSettings((factor,), settings.profile))
                _, _, lr_shape, lr_affine = _simulated(volume, factor, settings)
                if model is not None and model.check is not None:
                    lr = np.broadcast_to(np.float32(0), lr_shape)  # the plan reads shapes only
                    thickness_mm = settings.fwhm_at(factor) * volume.zooms[settings.axis]
                    model.check(lr, lr_affine, settings.axis, thickness_mm, factor)
            except (InputError, ShapeError) as exc:
                raise type(exc)(f"{volume.name} ({volume.path}) x{factor}: {exc}") from None


def run_factor(
    truth_volume: TruthVolume,
    factor: int,
    settings: ThickSliceSettings,
    model: ModelRunner | None = None,
) -> FactorRun:
    """Simulate, super-resolve and measure one volume at one factor (module docstring)."""
    if model is not None:
        check_model_factors(model.name, model.scales, ThickSliceSettings((factor,), settings.profile, settings.fwhm))
    axis = settings.axis
    truth, affine, _, lr_affine = _simulated(truth_volume, factor, settings)
    truth = np.ascontiguousarray(truth, np.float32)
    acquisition = settings.acquisition(factor)
    lr = acquisition.forward(truth).astype(np.float32)
    mask = foreground_mask(truth)
    data_range = data_range_of(truth)
    orientations = orientation_axes(affine)
    run = FactorRun(truth_volume.name, factor, acquisition.fwhm, truth.shape, data_range, truth, mask, lr)
    if model is not None:
        started = time.perf_counter()
        thickness_mm = acquisition.fwhm * truth_volume.zooms[axis]
        run.outputs[model.name] = np.asarray(model.run(lr, lr_affine, axis, thickness_mm, factor), np.float32)
        run.seconds[model.name] = time.perf_counter() - started
    for method in settings.baselines:
        started = time.perf_counter()
        run.outputs[method] = upsample_slices(lr, factor, axis=axis, method=method).astype(np.float32)
        run.seconds[method] = time.perf_counter() - started
    if ECLARE in methods_of(settings, model):
        started = time.perf_counter()
        run.outputs[ECLARE] = run_eclare(lr, lr_affine, truth.shape, settings.eclare_args)
        run.seconds[ECLARE] = time.perf_counter() - started
    for method, output in run.outputs.items():
        if output.shape != truth.shape:
            raise ShapeError(f"{method} made shape {output.shape} from the thick slices, not the truth's {truth.shape}")
        run.metrics[method] = volume_metrics(output, truth, mask, data_range, axis, orientations)
    run.truth_profile = plane_differences(truth, axis, mask)
    return run
