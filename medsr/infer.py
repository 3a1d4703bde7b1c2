"""Super-resolve medical images slice by slice: the work behind ``medsr-infer``, torch-free.

One image: read (medsr.io.formats) -> one frame or all -> slices along one axis, normalized to [-1, 1] (inverted for
MONOCHROME1, so the model sees bright = dense) -> LatentSRPipeline -> denormalized back to the input's units ->
written in the chosen format with the upsampled affine of medsr.io.affine. A batch runs the same for each job, reports
and skips failures, skips outputs that already exist, and keeps a summary JSON current in the output directory.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.errors import InputError, MedsrError
from medsr.io.affine import upsample_affine
from medsr.io.image import Volume, flat
from medsr.io.normalize import IntensityWindow, denormalize, fit_window, normalize

SUMMARY_NAME = "medsr_summary.json"


def choose_slice_axis(zooms: Sequence[float], shape: Sequence[int] | None = None) -> int:
    """The through-plane axis: an axis of length 1 when ``shape`` has one (a 2D image), else the axis with the
    largest voxel spacing (ties: the last such axis)."""
    if shape is not None and 1 in shape[:3]:
        return max(axis for axis in range(3) if shape[axis] == 1)
    return max(range(3), key=lambda axis: (zooms[axis], axis))


@dataclass(frozen=True)
class VolumeResult:
    """An SR volume (float32, input units), its affine, and what the run did.

    ``window``: the input intensities mapped to -1 and +1 (low > high for an inverted, MONOCHROME1, input);
    ``clipped_fraction``: the fraction of input voxels outside it; ``residuals``: each slice's consistency residual.
    """

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
    invert: bool = False,
    window: IntensityWindow | None = None,
) -> VolumeResult:
    """Super-resolve every slice of ``data`` (X, Y, Z) or (X, Y, Z, T) along spatial ``axis``.

    The intensity ``window`` is fitted on the whole volume (all frames) unless given, so every slice shares one
    mapping; ``invert`` maps the window's high end to -1 (MONOCHROME1). Slice i of frame k is seeded with index
    k * n_slices + i, so each output voxel is reproducible on its own. Slices go to the pipeline
    ``options.batch_size`` at a time and are written straight into the output volume.
    """
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2, got {axis}")
    frames = data[..., None] if data.ndim == 3 else data
    fitted = window or fit_window(frames, *_percentiles(pipeline.bundle))
    window = IntensityWindow(fitted.high, fitted.low) if invert else fitted
    scale = pipeline.bundle.scale
    factors = [scale, scale, scale]
    factors[axis] = 1
    out = np.empty((*(n * f for n, f in zip(frames.shape[:3], factors)), frames.shape[3]), dtype=np.float32)
    clipped, residuals = [], []
    n_slices = frames.shape[axis]
    for frame_index in range(frames.shape[3]):
        stack = np.moveaxis(frames[..., frame_index], axis, 0)
        target = np.moveaxis(out[..., frame_index], axis, 0)
        for start in range(0, n_slices, options.batch_size):
            normalized, fraction = normalize(stack[start : start + options.batch_size], window, clip=False)
            clipped.append(fraction * len(normalized))
            first = frame_index * n_slices + start
            result = pipeline.super_resolve(normalized, options, progress=progress, first_index=first)
            target[start : start + len(normalized)] = denormalize(result.images, window)
            residuals.append(result.residuals)
    return VolumeResult(
        data=out if data.ndim == 4 else out[..., 0],
        affine=upsample_affine(affine, factors),
        axis=axis,
        slices=n_slices * frames.shape[3],
        window=window,
        clipped_fraction=float(np.sum(clipped)) / (n_slices * frames.shape[3]),
        residuals=np.concatenate(residuals),
    )


def _percentiles(bundle) -> tuple[float, float]:
    intensity = bundle.manifest["task"]["intensity"]
    return float(intensity.get("low", 0.5)), float(intensity.get("high", 99.5))


@dataclass(frozen=True)
class InferSettings:
    """What the command line asked for, shared by every job of a run.

    ``fmt``: output format (None: from the output name, else the input's default); ``dtype``: a
    medsr.io.dtypes.DTYPE_CHOICES entry; ``frame``: one frame of a 4D input; ``axis``: the slice axis (None: for
    DICOM the acquisition plane, else the largest spacing); ``max_bytes``: the memory limit (None: the available
    memory); ``engine`` and ``precision``: recorded in each output's provenance.
    """

    options: SamplingOptions = field(default_factory=SamplingOptions)
    fmt: str | None = None
    dtype: str = "auto"
    frame: int | None = None
    axis: int | None = None
    max_bytes: int | None = None
    repair_nonfinite: bool = False
    overwrite: bool = False
    engine: str = "ort"
    precision: str = "fp32"


@dataclass(frozen=True)
class PreparedJob:
    """A job whose input is read and checked and whose output is decided: everything but the model run."""

    job: object
    volume: Volume
    data: np.ndarray
    axis: int
    window: IntensityWindow
    fmt: str
    dtype: np.dtype
    output: Path


def _memory_limit(settings: InferSettings, scale: int):
    from medsr.io.limits import MemoryLimit, available_memory

    if settings.max_bytes is not None:
        return MemoryLimit(settings.max_bytes, scale, "--max-memory")
    return MemoryLimit(available_memory(), scale, "the available memory; set --max-memory to change it")


def _select_frame(volume: Volume, frame: int | None) -> np.ndarray:
    if frame is None:
        return volume.data
    if volume.data.ndim != 4 or frame >= volume.data.shape[3]:
        raise InputError(f"{volume.path}: --frame {frame} but the image has shape {volume.data.shape}")
    return volume.data[..., frame]


def _slice_axis(volume: Volume, requested: int | None, fmt: str) -> int:
    """The slice axis for ``volume``: a 2D image's singleton axis, DICOM's acquisition plane, or the largest spacing."""
    natural = choose_slice_axis(volume.zooms, volume.data.shape)
    if volume.is_2d:
        if requested is not None and requested != natural:
            raise InputError(f"{volume.path}: a 2D image of shape {volume.data.shape}: --axis must be {natural}")
        return natural
    if fmt == "dicom" and requested not in (None, 2):
        raise InputError(f"{volume.path}: DICOM output keeps the acquired slices: --axis must be 2")
    if requested is not None:
        return requested
    return 2 if volume.format == "dicom" else natural


def _check_min_size(volume: Volume, data: np.ndarray, axis: int, minimum: int) -> None:
    in_plane = [data.shape[a] for a in range(3) if a != axis]
    if min(in_plane) < minimum:
        raise InputError(
            f"{volume.path}: slices of {in_plane[0]}x{in_plane[1]} pixels are smaller than this model's minimum of "
            f"{minimum}x{minimum}"
        )


def prepare_job(job, output: Path | None, bundle, settings: InferSettings) -> PreparedJob:
    """Read and check ``job.source`` and decide its output (None: the default name in the current directory).

    Every bad input or output is refused here, before a model is loaded. Raises MedsrError naming the file.
    """
    from medsr.io.atomic import check_output_path
    from medsr.io.dtypes import resolve_dtype
    from medsr.io.formats import default_output_name, load_image, output_format, output_is_directory

    if output is not None:
        check_output_path(output, settings.overwrite, directory=output.is_dir())
    volume = load_image(job.source, job.series, _memory_limit(settings, bundle.scale), settings.repair_nonfinite)
    fmt = output_format(output, settings.fmt, volume)
    dtype = resolve_dtype(settings.dtype, fmt, volume)
    output = output or Path(default_output_name(volume, fmt, bundle.scale, job.stem))
    check_output_path(output, settings.overwrite, directory=output_is_directory(fmt, volume))
    data = _select_frame(volume, settings.frame)
    axis = _slice_axis(volume, settings.axis, fmt)
    _check_min_size(volume, data, axis, bundle.lr_multiple)
    try:
        window = fit_window(data, *_percentiles(bundle))
    except InputError as exc:
        raise InputError(f"{volume.path}: {exc}") from exc
    return PreparedJob(job, volume, data, axis, window, fmt, dtype, output)


def provenance_of(pipeline: LatentSRPipeline, settings: InferSettings) -> dict:
    """What every output records about medsr, the model and the run (NIfTI extension, DICOM derivation, summary)."""
    import medsr

    bundle, options = pipeline.bundle, settings.options
    providers = ",".join(next(iter(pipeline.sessions.values())).providers)
    return {
        "medsr_version": medsr.__version__,
        "model": bundle.name,
        "scale": bundle.scale,
        "weights": bundle.manifest["provenance"].get("weights"),
        "engine": f"{settings.engine} {settings.precision} [{providers}]",
        "sampler": pipeline.scheduler_config.algorithm,
        "steps": options.steps or pipeline.scheduler_config.default_steps,
        "seed": options.seed,
        "consistency": options.consistency or bundle.manifest["task"].get("consistency", "none"),
        "tile_size": options.tile_size,
        "tile_overlap": options.tile_overlap,
    }


def run_prepared(
    prepared: PreparedJob,
    pipeline: LatentSRPipeline,
    settings: InferSettings,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Super-resolve a prepared job and write its output; return its record for the user and the batch summary."""
    from medsr.io.formats import save_image

    started = time.perf_counter()
    volume = prepared.volume
    result = super_resolve_volume(
        prepared.data,
        volume.affine,
        pipeline,
        prepared.axis,
        settings.options,
        progress,
        volume.inverted,
        prepared.window,
    )
    provenance = {
        **provenance_of(pipeline, settings),
        "input": volume.path.name,
        "axis": prepared.axis,
        "frame": settings.frame,
        "intensity_window": result.window.to_dict(),
        "date": _now(),
    }
    clipped_output = save_image(
        prepared.output,
        prepared.fmt,
        result.data,
        result.affine,
        volume,
        prepared.dtype,
        provenance,
        settings.overwrite,
    )
    return {
        "input": str(prepared.job.source),
        "series": prepared.job.series,
        "output": str(prepared.output),
        "status": "done",
        "format": prepared.fmt,
        "dtype": str(prepared.dtype),
        "input_shape": list(prepared.data.shape),
        "output_shape": list(result.data.shape),
        "axis": prepared.axis,
        "slices": result.slices,
        "clipped_input_fraction": result.clipped_fraction,
        "clipped_output_fraction": clipped_output,
        "residual_median": float(np.median(result.residuals)),
        "notes": list(volume.notes),
        "seconds": round(time.perf_counter() - started, 3),
    }


def describe(record: dict) -> str:
    """One line about a finished job, for the terminal."""
    shape_in = "x".join(map(str, record["input_shape"]))
    shape_out = "x".join(map(str, record["output_shape"]))
    text = (
        f"wrote {record['output']}: {record['slices']} slice{'s' if record['slices'] != 1 else ''} along axis "
        f"{record['axis']}, {shape_in} -> {shape_out} "
        f"({record['format']}, {record['dtype']}), {record['seconds']:.1f} s, "
        f"{100 * record['clipped_input_fraction']:.2f}% of input voxels clipped to the intensity window"
    )
    if record["clipped_output_fraction"]:
        text += f", {100 * record['clipped_output_fraction']:.2f}% of output voxels clipped to {record['dtype']}"
    text += f", consistency residual median {record['residual_median']:.2e}"
    return text + "".join(f"; note: {note}" for note in record["notes"])


def run_batch(
    jobs: list,
    outdir: Path,
    bundle,
    open_pipeline: Callable[[], LatentSRPipeline],
    settings: InferSettings,
    echo: Callable[[str], None],
) -> dict:
    """Run every job into ``outdir``; report and skip failures; skip outputs that exist (unless overwriting).

    ``open_pipeline()`` is called when the first job passes its checks (and should cache its pipeline).
    ``outdir/medsr_summary.json`` is rewritten (atomically) after every job, so an interrupted batch leaves a
    summary of what was finished. Returns the summary.
    """
    from medsr.io.atomic import write_text_atomic

    summary = {"medsr_version": _version(), "model": bundle.name, "started": _now()}
    records, planned = [], {}
    for job in jobs:
        fmt = settings.fmt or job.default_format()
        output = outdir / job.output_name(fmt, bundle.scale)
        if output in planned:
            output = outdir / job.output_name(fmt, bundle.scale, unique=True)
        record = {"input": str(job.source), "series": job.series, "output": str(output)}
        if output in planned:
            message = f"{job.source}: output name {output.name} is also that of {planned[output]}"
            record.update(status="failed", error=message)
        elif output.exists() and not settings.overwrite:
            record.update(status="skipped", reason="output exists")
        else:
            record = _run_job(job, output, bundle, open_pipeline, settings, record)
        planned[output] = job.source
        records.append(record)
        echo(_batch_line(record))
        summary.update(items=records, counts=_counts(records))
        write_text_atomic(outdir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    summary["finished"] = _now()
    write_text_atomic(outdir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    return summary


def _version() -> str:
    import medsr

    return medsr.__version__


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _run_job(job, output: Path, bundle, open_pipeline, settings: InferSettings, record: dict) -> dict:
    """One batch job; a failure becomes the record's error instead of stopping the batch."""
    try:
        return run_prepared(prepare_job(job, output, bundle, settings), open_pipeline(), settings)
    except MedsrError as exc:
        return {**record, "status": "failed", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bug must not stop the other jobs; it is reported as one
        return {
            **record,
            "status": "failed",
            "error": f"{job.source}: unexpected error (a medsr bug): {type(exc).__name__}: {flat(exc)}",
        }


def _counts(records: list[dict]) -> dict:
    return {status: sum(r["status"] == status for r in records) for status in ("done", "skipped", "failed")}


def _batch_line(record: dict) -> str:
    if record["status"] == "done":
        return describe(record)
    if record["status"] == "skipped":
        return f"skipped {record['input']}: {record['output']} exists"
    return f"FAILED {record['error']}"
