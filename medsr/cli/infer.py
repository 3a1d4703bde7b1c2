"""``medsr-infer``: super-resolve NIfTI, DICOM, PNG or TIFF images with a model bundle, torch-free unless
``--engine torch``; one image, or a batch of files, directories and glob patterns into an output directory."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import click

from medsr.bundle.scheduler import ALGORITHMS
from medsr.cli.common import medsr_errors, run_command, torch_reference
from medsr.cli.model import INFER_MODEL_HELP, adapt_limit_options
from medsr.degrade import CONSISTENCY_MODES
from medsr.engine.pipeline import NOISE_MODES
from medsr.engine.precision import describe_precisions, precision_choices
from medsr.engine.select import ENGINE_CHOICES, ENGINE_HELP, PRECISION_DEFAULT_HELP
from medsr.engine.sessions import ENGINES
from medsr.io.dtypes import DTYPE_CHOICES
from medsr.io.formats import OUTPUT_FORMATS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file (one input; default <name>_sr<s>x in the current directory), or directory (a batch).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(OUTPUT_FORMATS),
    help="Output format (default: from -o's suffix, "
    "else NIfTI for NIfTI/DICOM inputs and the input's format for PNG/TIFF).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="Output pixel type: auto = float32, or the input's type where the format holds integers only "
    "(PNG, DICOM); input = the input's stored type and scaling.",
)
@click.option("--series", help="DICOM series to read from a directory holding several (SeriesInstanceUID or number).")
@click.option("--model", type=click.Path(path_type=Path), help=INFER_MODEL_HELP)
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True, help=ENGINE_HELP)
@click.option(
    "--precision",
    type=click.Choice(precision_choices(*ENGINES)),
    help=f"{describe_precisions(*ENGINES)} (auto: reduced precision per graph where parity passes); "
    f"{PRECISION_DEFAULT_HELP}.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Never detected: cuda runs on the GPU.",
)
@click.option("--sampler", type=click.Choice(ALGORITHMS), help="Sampler (default: the bundle's).")
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: the bundle's).")
@click.option(
    "--consistency",
    type=click.Choice(CONSISTENCY_MODES),
    help="Data consistency with the LR input after decoding (default: the bundle's).",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the initial noise (>= 0)."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Slices (or tiles) per batch."
)
@click.option(
    "--axis", type=click.IntRange(0, 2), help="Slice axis (default: DICOM's slice axis, else the largest spacing)."
)
@click.option("--frame", type=click.IntRange(min=0), help="Only this frame of a 4D volume (default: every frame).")
@click.option(
    "--through-plane",
    is_flag=True,
    help="Upsample along the slice axis (--axis, default the largest spacing) with a through-plane model "
    "(--model): both orientations containing it, averaged, consistent with the measured slices; writes NIfTI.",
)
@click.option(
    "--through-plane-scale",
    type=click.IntRange(min=2),
    help="With --through-plane: HR voxels per slice, one of the model's factors (task.scales; default: "
    "round(slice spacing / in-plane spacing)).",
)
@click.option(
    "--slice-thickness",
    type=click.FloatRange(min=0, min_open=True),
    help="With --through-plane: slice thickness in mm (default: DICOM SliceThickness, else the slice spacing).",
)
@click.option(
    "--adapt",
    is_flag=True,
    help="With --through-plane: first fine-tune the model on the input's own in-plane planes (thick slices simulated "
    "along one in-plane axis), for --adapt-time or --adapt-steps, then run the adapted model on the chosen engine; "
    "each input of a batch gets its own adapted model. Needs PyTorch (medsr[torch]).",
)
@adapt_limit_options
@click.option(
    "--adapt-save",
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="With --adapt and one input: keep the adapted model as a bundle DIR (refused if it exists unless "
    "--overwrite), which --model DIR runs again.",
)
@click.option(
    "--noise",
    type=click.Choice(NOISE_MODES),
    default="per-plane",
    show_default=True,
    help="Initial noise: drawn per plane, or one field shared by every plane of a stack (no seams between planes).",
)
@click.option(
    "--tile",
    type=click.IntRange(min=0),
    default=128,
    show_default=True,
    help="Slices whose SR has a side longer than this times the scale run in overlapping tiles of this many LR "
    "pixels (in-plane: an LR side longer than this); 0: never.",
)
@click.option(
    "--tile-overlap",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="LR pixels shared by neighbouring tiles.",
)
@click.option(
    "--max-memory", help="Refuse images whose arrays need more than this (e.g. 8G; default: available memory)."
)
@click.option(
    "--repair-nonfinite",
    is_flag=True,
    help="Replace NaN/Inf voxels by the finite minimum/maximum instead of refusing the image.",
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: the available cores).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (a batch otherwise skips them).")
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run the batch on a Ray cluster, one engine per worker (docs/scale-out.md): local starts one on this "
    "machine, auto or HOST:PORT joins one; files must be on a filesystem every node sees. Needs medsr[ray].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="With --ray: workers (default: as many as the cluster's GPUs, or CPUs / --threads, allow); "
    "each uses --threads CPU threads (default 1 with --ray).",
)
@medsr_errors
def infer(
    inputs,
    output,
    fmt,
    dtype,
    series,
    model,
    engine,
    precision,
    device,
    sampler,
    steps,
    consistency,
    seed,
    batch_size,
    axis,
    frame,
    through_plane,
    through_plane_scale,
    slice_thickness,
    adapt,
    adapt_time,
    adapt_steps,
    adapt_save,
    noise,
    tile,
    tile_overlap,
    max_memory,
    repair_nonfinite,
    threads,
    overwrite,
    ray_address,
    workers,
):
    """Super-resolve INPUT in-plane by the model's scale factor, or along the slice axis (--through-plane).

    INPUT is a .nii/.nii.gz volume, a DICOM series directory or file, or a PNG/TIFF image. Several INPUTs, a glob
    pattern or a directory of images make a batch: -o names the output directory, failures are reported and skipped,
    existing outputs are skipped, and OUTPUT/medsr_summary.json records every input.
    """
    from medsr.cli.model import load_model
    from medsr.engine.jobs import InferSettings
    from medsr.engine.pipeline import SamplingOptions
    from medsr.engine.select import AUTO_ENGINE, EngineChoice, resolve_engine
    from medsr.engine.tiling import check_tile_options
    from medsr.engine.volume import check_task_plane
    from medsr.errors import InputError, MedsrError
    from medsr.io.inputs import expand_inputs
    from medsr.io.limits import parse_size

    jobs, batch = expand_inputs(inputs, series, output)
    if batch and series is not None:
        raise InputError("--series chooses among one directory's series; a batch runs every series")
    if batch and output is None:
        raise InputError("a batch (several inputs, a pattern or a directory of images) needs -o OUTPUT_DIRECTORY")
    if ray_address is not None and not batch:
        raise InputError("--ray runs a batch: give several inputs, a pattern or a directory, and -o OUTPUT_DIRECTORY")
    if workers is not None and ray_address is None:
        raise InputError("--workers is the size of a --ray batch's worker pool; add --ray ADDRESS")
    if not through_plane and (through_plane_scale is not None or slice_thickness is not None):
        raise InputError("--through-plane-scale and --slice-thickness apply to --through-plane only")
    if not adapt and (adapt_time is not None or adapt_steps is not None or adapt_save is not None):
        raise InputError("--adapt-time, --adapt-steps and --adapt-save apply to --adapt only")
    if adapt and not through_plane:
        raise InputError("--adapt fine-tunes a through-plane model on the input; add --through-plane")
    if adapt and ray_address is not None:
        raise InputError("--adapt fine-tunes a model per input on this machine; it does not run on --ray")
    if adapt_save is not None and batch:
        raise InputError("--adapt-save keeps the adapted model of one input; a batch adapts one per input")
    options = SamplingOptions(
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        consistency=consistency,
        tile_size=tile or None,
        tile_overlap=tile_overlap,
        noise=noise,
    )
    if ray_address is not None and engine == AUTO_ENGINE:  # each worker chooses on its own node
        choice = EngineChoice(AUTO_ENGINE, precision or AUTO_ENGINE, "chosen by each Ray worker on its node")
    else:
        choice = resolve_engine(engine, device, precision)  # no model yet: a missing GPU engine fails fast
    settings = InferSettings(
        options=options,
        fmt=fmt,
        dtype=dtype,
        frame=frame,
        axis=axis,
        engine=choice.engine,
        precision=choice.precision,
        engine_reason=choice.reason,
        max_bytes=parse_size(max_memory) if max_memory else None,
        repair_nonfinite=repair_nonfinite,
        overwrite=overwrite,
        through_plane=through_plane,
        through_plane_scale=through_plane_scale,
        slice_thickness=slice_thickness,
    )
    bundle = load_model(model, through_plane)
    check_task_plane(bundle, through_plane)
    if options.tile_size is not None:
        check_tile_options(options.tile_size, tile_overlap, bundle.lr_multiple)
    engine_options = (choice.engine, choice.precision, device, sampler, threads)
    pipeline = functools.cache(lambda: _open_pipeline(bundle, *engine_options))
    per_job = None
    if adapt:
        per_job = _adapter(bundle, engine_options, (seed, adapt_time, adapt_steps), adapt_save, overwrite)
    if batch:
        ray = None
        if ray_address is not None:
            from medsr.engine.jobs import EngineOptions

            ray = (ray_address, EngineOptions(choice.engine, choice.precision, device, sampler, threads), workers)
        failed = _run_batch(jobs, output, bundle, pipeline, settings, ray, per_job)
        if failed:
            raise MedsrError(f"{failed} of {len(jobs)} input(s) failed; see {output / 'medsr_summary.json'}")
    else:
        _run_one(jobs[0], output, bundle, pipeline, settings, per_job)


def _open_pipeline(bundle, engine, precision, device, sampler, threads):
    """The bundle's pipeline on ``engine`` (sessions are opened only once an input has passed its checks); the Ray
    workers open theirs through the same EngineOptions."""
    from medsr.engine.jobs import EngineOptions

    if engine == "torch":
        torch_reference()
    return EngineOptions(engine, precision, device, sampler, threads).open(bundle)


def _adapter(bundle, engine_options, limits: tuple, save: Path | None, overwrite: bool):
    """The per-job pipeline of ``--adapt``: ``bundle`` fine-tuned on each prepared job's input
    (medsr.export.train.adapt, imported only then: the rest of medsr-infer never imports PyTorch) within
    ``limits`` (seed, seconds, steps), exported (kept in ``save`` when given) and opened on ``engine_options``
    (engine, precision, device, sampler, threads) for that job's engine stage."""
    from medsr.cli.model import adaptation
    from medsr.io.atomic import check_output_path

    adapt, config = adaptation(*limits)
    if save is not None:
        check_output_path(save, overwrite, directory=True)
    _, _, device, _, threads = engine_options

    @contextlib.contextmanager
    def per_job(prepared):
        with adapt.adapted_bundle(
            bundle, prepared.image, prepared.plan, config, device, threads, save, overwrite, disable=None
        ) as adapted:
            yield _open_pipeline(adapted, *engine_options)

    return per_job


def _run_one(job, output, bundle, pipeline, settings, per_job=None) -> None:
    from tqdm import tqdm

    from medsr.cli.jobs import describe
    from medsr.engine.jobs import job_pipeline, prepare_job, provenance_of, run_prepared

    prepared = prepare_job(job, output, bundle, settings)
    with job_pipeline(prepared, pipeline, per_job) as opened:
        with tqdm(unit="slice", desc="super-resolving", disable=None) as bar:
            record = run_prepared(prepared, opened, settings, progress=bar.update)
        engine = provenance_of(opened, settings)["engine"]
    click.echo(f"{describe(record)}; engine {engine} ({settings.engine_reason})")


def _run_batch(jobs, outdir: Path, bundle, pipeline, settings, ray=None, per_job=None) -> int:
    """Run a batch into ``outdir`` (created if missing), here or on Ray (``ray``: address, EngineOptions and
    workers, medsr.serve.ray_batch), each job on its own pipeline when ``per_job`` gives one; return the number of
    failed inputs."""
    from medsr.cli.jobs import run_batch
    from medsr.engine.jobs import SUMMARY_NAME
    from medsr.errors import OutputError

    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: the output of a batch must be a directory")
    try:
        outdir.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{outdir}: cannot create the output directory: {exc.strerror or exc}") from exc
    if ray is None:
        summary = run_batch(jobs, outdir, bundle, pipeline, settings, click.echo, per_job)
    else:
        from tqdm import tqdm

        from medsr.cli.jobs import batch_line
        from medsr.serve.ray_batch import run_ray_batch

        address, engine, workers = ray
        echo = lambda record: tqdm.write(batch_line(record))  # lines above the bar over volumes
        summary = run_ray_batch(jobs, outdir, bundle, settings, engine, address, workers, echo)
    counts = summary["counts"]
    click.echo(
        f"batch: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"summary in {outdir / SUMMARY_NAME}; engine {settings.engine} {settings.precision} ({settings.engine_reason})"
    )
    return counts["failed"]


def main() -> None:
    run_command(infer)
