"""The job of ``medsr-infer`` below the command line: read and check one input, decide its output, run the volume
engine, write the result atomically with its provenance, and the batch's bookkeeping (output names planned once for
the whole batch, existing outputs skipped so a rerun resumes, a summary JSON kept current in the output directory).

The batch of medsr.cli.jobs and the Ray workers of medsr.serve.ray_batch both run each job through the same
stages (:func:`run_batch_job`), so a batch gives the same files and the same records whichever runs it. The model
work is medsr.engine.volume's.

A local batch overlaps the host stages with the engine (:func:`run_batch_jobs`): while the engine runs job i on the
calling thread, one background thread reads and prepares job i + 1 and another writes job i - 1, at most one read
ahead and one write behind. At GPU speed reading, normalizing, consistency and saving take about as long as the
model (docs/sources.md, "GPU engines"), so run one after the other they cap what a faster engine gains end to end.
Every job still goes through the same stages in the same order, so the files are the same byte for byte; a stage's
error becomes the record of its own job; an interrupt cancels what has not started and waits for a write under way,
which the atomic writer finishes or removes (medsr.io.atomic): never a partial output.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsr.bundle.manifest import thaw
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.volume import (
    NetworkInput,
    ThroughPlanePlan,
    VolumeResult,
    check_plane_size,
    choose_slice_axis,
    min_plane_side,
    plan_through_plane,
    prepare_input,
    super_resolve_through_plane,
    super_resolve_volume,
    window_percentiles,
)
from medsr.errors import InputError, MedsrError, OutputExistsError
from medsr.io.image import Volume, flat

#: The batch summary's file name in the output directory.
SUMMARY_NAME = "medsr_summary.json"
#: The key of a model adapted to one input (``medsr-infer --adapt``) in its bundle's ``provenance.recipe_config``:
#: what it was adapted to and how; every output of such a model records it (:func:`provenance_of`).
ADAPTED = "adapted"


@dataclass(frozen=True)
class InferSettings:
    """What the command line asked for, shared by every job of a run.

    ``fmt``: output format (None: from the output name, else the input's default); ``dtype``: a
    medsr.io.dtypes.DTYPE_CHOICES entry; ``frame``: one frame of a 4D input; ``axis``: the slice axis (None: for
    DICOM the acquisition plane, else the largest spacing); ``max_bytes``: the memory limit (None: the available
    memory); ``engine`` and ``precision`` (what runs: ``--engine auto`` resolved by
    medsr.engine.select.resolve_engine) and ``engine_reason`` (why): recorded in each output's provenance.
    ``through_plane``: upsample along the slice axis with a through-plane model (medsr.engine.volume), by
    ``through_plane_scale`` (None: from the spacings) with slices ``slice_thickness`` mm thick (None: DICOM
    SliceThickness, else the slice spacing). ``overlap``: a local batch reads the next input and writes the previous
    output while the engine runs (:func:`run_batch_jobs`), and, when the engine is not on the CPU, within each volume
    the next batch of planes is prepared and the previous one finished while the engine runs (medsr.engine.volume);
    False runs every stage one after the other.
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
    engine_reason: str = ""
    through_plane: bool = False
    through_plane_scale: int | None = None
    slice_thickness: float | None = None
    overlap: bool = True


@dataclass(frozen=True)
class PreparedJob:
    """A job whose input is read, checked and prepared for the network and whose output is decided: everything but
    the model run. ``plan``: the through-plane run (None: in-plane)."""

    job: object
    volume: Volume
    image: NetworkInput
    axis: int
    fmt: str
    dtype: np.dtype
    output: Path
    plan: ThroughPlanePlan | None = None


def _memory_limit(settings: InferSettings, bundle):
    """The memory limit an input is checked against before it is read: in-plane the bundle's s x s; through-plane s
    along one axis, s being ``--through-plane-scale`` or else the largest factor the model serves (the input's own
    factor is known only once it is read)."""
    from medsr.io.limits import MemoryLimit, available_memory

    scale, axes = bundle.scale, 2
    if settings.through_plane:
        scale, axes = settings.through_plane_scale or max(bundle.scales), 1
    if settings.max_bytes is not None:
        return MemoryLimit(settings.max_bytes, scale, "--max-memory", axes)
    return MemoryLimit(available_memory(), scale, "the available memory; set --max-memory to change it", axes)


def _slice_axis(volume: Volume, requested: int | None, fmt: str) -> int:
    """The slice axis for ``volume``: a 2D image's singleton axis, DICOM's acquisition plane, or the largest spacing."""
    natural = choose_slice_axis(volume.zooms, volume.data.shape)
    if volume.data.ndim == 3 and volume.data.shape.count(1) == 1:
        if requested is not None and requested != natural:
            raise InputError(f"{volume.path}: a 2D image of shape {volume.data.shape}: --axis must be {natural}")
        return natural
    if fmt == "dicom" and requested not in (None, 2):
        raise InputError(f"{volume.path}: DICOM output keeps the acquired slices: --axis must be 2")
    if requested is not None:
        return requested
    return 2 if volume.format == "dicom" else natural


def prepare_job(
    job, output: Path | None, bundle, settings: InferSettings, named_scale: int | None = None
) -> PreparedJob:
    """Read and check ``job.source``, prepare it for the network and decide its output (None: the default name in
    the current directory).

    ``named_scale``: the factor a batch named ``output`` by before reading the input (:func:`batch_name_scale`); a
    through-plane plan of another factor renames it to its own (``_sr<s>x``), so a name always says its factor.
    Every bad input or output is refused here, before a model is loaded. Raises MedsrError naming the file
    (OutputExistsError for an output that exists without --overwrite).
    """
    from medsr.io.atomic import check_output_path
    from medsr.io.dtypes import resolve_dtype
    from medsr.io.formats import default_output_name, load_image, output_format, output_is_directory

    if output is not None:
        check_output_path(output, settings.overwrite, directory=output.is_dir())
    volume = load_image(job.source, job.series, _memory_limit(settings, bundle), settings.repair_nonfinite)
    fmt = output_format(output, settings.fmt, volume)
    plan = None
    if settings.through_plane:
        if fmt == "dicom":
            raise InputError(
                f"{volume.path}: --through-plane makes new slices, but DICOM output keeps the acquired ones; "
                "write NIfTI (--format nifti)"
            )
        plan = plan_through_plane(volume, bundle, settings.axis, settings.through_plane_scale, settings.slice_thickness)
        if named_scale is not None and output is not None and plan.scale != named_scale:
            output = output.with_name(_renamed(output.name, named_scale, plan.scale))
    dtype = resolve_dtype(settings.dtype, fmt, volume)
    scale = bundle.scale if plan is None else plan.scale
    output = output or Path(default_output_name(volume, fmt, scale, job.stem))
    check_output_path(output, settings.overwrite, directory=output_is_directory(fmt, volume))
    prepared = prepare_input(volume, window_percentiles(bundle), settings.frame)
    if plan is not None:
        return PreparedJob(job, volume, prepared, plan.axis, fmt, dtype, output, plan)
    axis = _slice_axis(volume, settings.axis, fmt)
    check_plane_size(prepared, axis, min_plane_side(bundle))
    return PreparedJob(job, volume, prepared, axis, fmt, dtype, output)


#: The pipeline one prepared job runs on, held for its engine stage (a ``with`` block): a model made for that job
#: alone (``medsr-infer --adapt`` fine-tunes one on the job's own input). Without one every job runs on the run's
#: shared pipeline.
JobPipeline = Callable[[PreparedJob], AbstractContextManager[LatentSRPipeline]]


def job_pipeline(prepared: PreparedJob, open_pipeline, per_job: JobPipeline | None):
    """The context that holds ``prepared``'s pipeline: ``per_job(prepared)``, or the shared ``open_pipeline()``."""
    return nullcontext(open_pipeline()) if per_job is None else per_job(prepared)


def provenance_of(pipeline: LatentSRPipeline, settings: InferSettings) -> dict:
    """What every output records about medsr, the model and the run (NIfTI extension, DICOM derivation, summary)."""
    import medsr

    bundle, options = pipeline.bundle, settings.options
    providers = ",".join(next(iter(pipeline.sessions.values())).providers)
    recipe = bundle.manifest.provenance.recipe_config or {}
    return {
        "medsr_version": medsr.__version__,
        "model": bundle.name,
        "scale": bundle.scale,
        "weights": bundle.manifest.provenance.weights.to_dict(),
        "engine": f"{settings.engine} {settings.precision} [{providers}]",
        "engine_reason": settings.engine_reason,
        "sampler": pipeline.scheduler_config.algorithm,
        "steps": options.steps or pipeline.scheduler_config.default_steps,
        "seed": options.seed,
        "consistency": options.consistency or bundle.manifest.task.consistency,
        "tile_size": options.tile_size,
        "tile_overlap": options.tile_overlap,
        "noise": options.noise,
        **({ADAPTED: thaw(recipe[ADAPTED])} if ADAPTED in recipe else {}),
        **({"precision_islands": islands} if (islands := _precision_reports(pipeline)) else {}),
    }


def _precision_reports(pipeline: LatentSRPipeline) -> dict:
    """Per graph, what a session built in mixed precision decided (TensorRT's ``precision_report``: precision, fp32
    islands, parity); empty for engines that run one precision throughout."""
    return {
        graph: session.precision_report
        for graph, session in pipeline.sessions.items()
        if hasattr(session, "precision_report")
    }


@dataclass(frozen=True)
class ComputedJob:
    """A prepared job whose SR volume is computed, with the provenance its output records: all but the write."""

    prepared: PreparedJob
    result: VolumeResult
    provenance: dict
    seconds: float


def compute_prepared(
    prepared: PreparedJob,
    pipeline: LatentSRPipeline,
    settings: InferSettings,
    progress: Callable[[int], None] | None = None,
) -> ComputedJob:
    """Super-resolve a prepared job (the engine stage), without writing anything."""
    started = time.perf_counter()
    volume = prepared.volume
    plan = prepared.plan
    overlap = None if settings.overlap else False  # None: within the volume only where the engine is off the CPU
    if plan is None:
        result = super_resolve_volume(
            prepared.image, volume.affine, pipeline, prepared.axis, settings.options, progress, overlap
        )
    else:
        result = super_resolve_through_plane(
            prepared.image, volume.affine, pipeline, plan, settings.options, progress, overlap
        )
    provenance = {
        **provenance_of(pipeline, settings),
        "input": volume.path.name,
        "axis": prepared.axis,
        "frame": settings.frame,
        "intensity_window": result.window.to_dict(),
        "date": _now(),
        **({} if plan is None else {"scale": plan.scale, "through_plane": plan.to_dict()}),
    }
    return ComputedJob(prepared, result, provenance, time.perf_counter() - started)


def run_prepared(
    prepared: PreparedJob,
    pipeline: LatentSRPipeline,
    settings: InferSettings,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Super-resolve a prepared job and write its output; return its record for the user and the batch summary."""
    return write_computed(compute_prepared(prepared, pipeline, settings, progress), settings)


def write_computed(computed: ComputedJob, settings: InferSettings) -> dict:
    """Write a computed job's output atomically with its provenance; return its record (``seconds``: the engine
    stage and the write)."""
    from medsr.io.formats import save_image

    started = time.perf_counter()
    prepared, result = computed.prepared, computed.result
    volume, plan = prepared.volume, prepared.plan
    clipped_output = save_image(
        prepared.output,
        prepared.fmt,
        result.data,
        result.affine,
        volume,
        prepared.dtype,
        computed.provenance,
        settings.overwrite,
    )
    return {
        "input": str(prepared.job.source),
        "series": prepared.job.series,
        "output": str(prepared.output),
        "status": "done",
        "format": prepared.fmt,
        "dtype": str(prepared.dtype),
        "input_shape": list(prepared.image.data.shape),
        "output_shape": list(result.data.shape),
        "axis": prepared.axis,
        "slices": result.slices,
        "clipped_input_fraction": result.clipped_fraction,
        "clipped_output_fraction": clipped_output,
        "residual_median": float(np.median(result.residuals)),
        "notes": list(volume.notes),
        "seconds": round(computed.seconds + time.perf_counter() - started, 3),
        **({} if plan is None else {"through_plane": plan.describe()}),
        **({ADAPTED: computed.provenance[ADAPTED]} if ADAPTED in computed.provenance else {}),
    }


@dataclass(frozen=True)
class EngineOptions:
    """The engine a run's pipeline opens on: ``engine`` (medsr.engine.sessions.ENGINES), its ``precision``,
    ``device`` (cpu or cuda), ``sampler`` (None: the bundle's) and CPU ``threads`` (None: the available cores)."""

    engine: str = "ort"
    precision: str = "fp32"
    device: str = "cpu"
    sampler: str | None = None
    threads: int | None = None

    def open(self, bundle) -> LatentSRPipeline:
        """The bundle's pipeline on this engine. ``torch`` needs medsr.export.reference imported first (the
        command-line layer does it; the engine never imports the PyTorch side)."""
        from medsr.engine.sessions import open_sessions

        scheduler_config = bundle.manifest.scheduler
        if self.sampler:
            scheduler_config = scheduler_config.with_sampler(self.sampler)
        sessions = open_sessions(
            bundle, self.engine, device=self.device, threads=self.threads, precision=self.precision
        )
        return LatentSRPipeline(bundle, sessions, scheduler_config)


def _renamed(name: str, named: int, scale: int) -> str:
    """An output ``name`` planned as ``<stem>_sr<named>x<suffix>`` (medsr.io.inputs.Job.output_name) with the
    factor ``scale`` instead."""
    stem, marker, suffix = name.rpartition(f"_sr{named}x")
    return f"{stem}_sr{scale}x{suffix}" if marker else name


def batch_name_scale(bundle, settings: InferSettings) -> int:
    """The factor in a batch's output names, decided before any input is read: ``--through-plane-scale`` when a
    through-plane run gives one, else the model's scale (a through-plane job of another factor is renamed when it
    is read: :func:`prepare_job`)."""
    return (settings.through_plane and settings.through_plane_scale) or bundle.scale


def _failed(job, record: dict, exc: Exception) -> dict:
    """The record of a job whose stage raised ``exc``: a MedsrError's one line, or a bug named as one."""
    if isinstance(exc, MedsrError):
        return {**record, "status": "failed", "error": str(exc)}
    error = f"{job.source}: unexpected error (a medsr bug): {type(exc).__name__}: {flat(exc)}"
    return {**record, "status": "failed", "error": error}


# A job between stages: (job, record, PreparedJob | ComputedJob), or its final record (a dict) once it failed or
# was skipped. Each stage turns its own errors into its own job's record: a bug must not stop the other jobs.
def _read_stage(job, output: Path, bundle, settings: InferSettings, record: dict):
    if "status" in record:  # final already (plan_batch: a name taken twice)
        return record
    if output.exists() and not settings.overwrite:
        return {**record, "status": "skipped", "reason": "output exists"}
    try:
        return job, record, prepare_job(job, output, bundle, settings, batch_name_scale(bundle, settings))
    except OutputExistsError as exc:
        if Path(exc.path) != output:  # renamed for its factor, and done by an earlier run
            return {**record, "output": str(exc.path), "status": "skipped", "reason": "output exists"}
        return _failed(job, record, exc)
    except Exception as exc:  # noqa: BLE001
        return _failed(job, record, exc)


def _run_stage(stage, open_pipeline, settings: InferSettings, per_job: JobPipeline | None = None):
    if isinstance(stage, dict):
        return stage
    job, record, prepared = stage
    try:
        with job_pipeline(prepared, open_pipeline, per_job) as pipeline:
            return job, record, compute_prepared(prepared, pipeline, settings)
    except Exception as exc:  # noqa: BLE001
        return _failed(job, record, exc)


def _write_stage(stage, settings: InferSettings) -> dict:
    if isinstance(stage, dict):
        return stage
    job, record, computed = stage
    try:
        return write_computed(computed, settings)
    except Exception as exc:  # noqa: BLE001
        return _failed(job, record, exc)


def run_batch_jobs(
    plan: list[tuple[object, Path, dict]],
    bundle,
    open_pipeline,
    settings: InferSettings,
    on_record: Callable[[dict], None],
    per_job: JobPipeline | None = None,
) -> None:
    """Run the planned jobs (:func:`plan_batch`) in order, calling ``on_record(record)`` for each as it finishes,
    in plan order: the jobs of :func:`run_batch_job`, with the host stages overlapped with the engine when
    ``settings.overlap`` (module docstring). ``per_job``: each job's own pipeline instead of the shared one.

    The engine stage (and ``open_pipeline()``, when the first job passes its checks) runs on the calling thread; a
    reader thread prepares at most the next job while it runs, a writer thread writes at most the previous one.
    On any exception of the calling thread (an interrupt, or ``on_record``'s), reads not started are cancelled and
    a write under way is waited for (it completes or removes its temporary), then the exception propagates.
    """
    if not settings.overlap:
        for job, output, record in plan:
            on_record(run_batch_job(job, output, bundle, open_pipeline, settings, record, per_job))
        return
    reader = ThreadPoolExecutor(1, thread_name_prefix="medsr-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="medsr-write")
    try:
        reading = _submit_read(reader, plan, 0, bundle, settings)
        writing: Future | None = None
        for index in range(len(plan)):
            stage = reading.result()
            reading = _submit_read(reader, plan, index + 1, bundle, settings)
            stage = _run_stage(stage, open_pipeline, settings, per_job)
            if writing is not None:
                on_record(writing.result())
            writing = writer.submit(_write_stage, stage, settings)
        if writing is not None:
            on_record(writing.result())
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


def _submit_read(reader: ThreadPoolExecutor, plan, index: int, bundle, settings: InferSettings) -> Future | None:
    if index >= len(plan):
        return None
    job, output, record = plan[index]
    return reader.submit(_read_stage, job, output, bundle, settings, record)


def plan_batch(jobs: list, outdir: Path, bundle, settings: InferSettings) -> list[tuple[object, Path, dict]]:
    """(job, output, record) for every job of a batch into ``outdir``, in order, without touching any file.

    Outputs are named by :func:`batch_name_scale` (the inputs are not read here, so their own factors are not known
    yet; a through-plane job of another factor is renamed when it is read). A job whose output name another job already
    took gets its unique name; if that too is taken, its record is already final (``status`` failed). Every other
    record holds input, series and output only, for :func:`run_batch_job`.
    """
    planned, plan = {}, []
    scale = batch_name_scale(bundle, settings)
    for job in jobs:
        fmt = settings.fmt or job.default_format()
        output = outdir / job.output_name(fmt, scale)
        if output in planned:
            output = outdir / job.output_name(fmt, scale, unique=True)
        record = {"input": str(job.source), "series": job.series, "output": str(output)}
        if output in planned:
            message = f"{job.source}: output name {output.name} is also that of {planned[output]}"
            record.update(status="failed", error=message)
        planned[output] = job.source
        plan.append((job, output, record))
    return plan


def run_batch_job(
    job, output: Path, bundle, open_pipeline, settings: InferSettings, record: dict, per_job: JobPipeline | None = None
) -> dict:
    """A planned job (:func:`plan_batch`): skipped when its output exists (unless overwriting), else run (read,
    engine, write, one after the other), on its own pipeline when ``per_job`` gives one."""
    stage = _read_stage(job, output, bundle, settings, record)
    return _write_stage(_run_stage(stage, open_pipeline, settings, per_job), settings)


def new_summary(bundle) -> dict:
    """The head of a batch summary, as a batch starts."""
    return {"medsr_version": _version(), "model": bundle.name, "started": _now()}


def write_summary(outdir: Path, summary: dict, records: list[dict], finished: bool = False) -> None:
    """Rewrite ``outdir/medsr_summary.json`` (atomically) with ``records`` and their counts; ``finished`` stamps
    the end of the batch."""
    from medsr.io.atomic import write_text_atomic

    summary.update(items=records, counts=count_records(records))
    if finished:
        summary["finished"] = _now()
    write_text_atomic(outdir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")


def count_records(records: list[dict]) -> dict:
    return {status: sum(r["status"] == status for r in records) for status in ("done", "skipped", "failed")}


def _version() -> str:
    import medsr

    return medsr.__version__


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
