"""``medsr-infer``: super-resolve NIfTI, DICOM, PNG or TIFF images with a model bundle, torch-free unless
``--engine torch``; one image, or a batch of files, directories and glob patterns into an output directory."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from medsr.bundle.scheduler import ALGORITHMS
from medsr.cli.common import medsr_errors, run_command, torch_reference
from medsr.cli.model import MODEL_HELP
from medsr.degrade import CONSISTENCY_MODES
from medsr.engine.precision import describe_precisions, precision_choices
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
@click.option("--model", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--engine", type=click.Choice(ENGINES), default="ort", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(precision_choices(*ENGINES)),
    default="fp32",
    show_default=True,
    help=f"{describe_precisions(*ENGINES)} (auto: reduced precision per graph where parity passes).",
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
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
    "--tile",
    type=click.IntRange(min=0),
    default=128,
    show_default=True,
    help="Slices with a side longer than this (LR pixels) run in overlapping tiles of this size; 0: never.",
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
    tile,
    tile_overlap,
    max_memory,
    repair_nonfinite,
    threads,
    overwrite,
):
    """Super-resolve INPUT in-plane by the model's scale factor.

    INPUT is a .nii/.nii.gz volume, a DICOM series directory or file, or a PNG/TIFF image. Several INPUTs, a glob
    pattern or a directory of images make a batch: -o names the output directory, failures are reported and skipped,
    existing outputs are skipped, and OUTPUT/medsr_summary.json records every input.
    """
    from medsr.cli.jobs import InferSettings
    from medsr.cli.model import load_model
    from medsr.engine.pipeline import SamplingOptions
    from medsr.engine.tiling import check_tile_options
    from medsr.errors import InputError, MedsrError
    from medsr.io.inputs import expand_inputs
    from medsr.io.limits import parse_size

    jobs, batch = expand_inputs(inputs, series, output)
    if batch and series is not None:
        raise InputError("--series chooses among one directory's series; a batch runs every series")
    if batch and output is None:
        raise InputError("a batch (several inputs, a pattern or a directory of images) needs -o OUTPUT_DIRECTORY")
    options = SamplingOptions(
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        consistency=consistency,
        tile_size=tile or None,
        tile_overlap=tile_overlap,
    )
    settings = InferSettings(
        options=options,
        fmt=fmt,
        dtype=dtype,
        frame=frame,
        axis=axis,
        engine=engine,
        precision=precision,
        max_bytes=parse_size(max_memory) if max_memory else None,
        repair_nonfinite=repair_nonfinite,
        overwrite=overwrite,
    )
    bundle = load_model(model)
    if options.tile_size is not None:
        check_tile_options(options.tile_size, tile_overlap, bundle.lr_multiple)
    pipeline = functools.cache(lambda: _open_pipeline(bundle, engine, precision, device, sampler, threads))
    if batch:
        failed = _run_batch(jobs, output, bundle, pipeline, settings)
        if failed:
            raise MedsrError(f"{failed} of {len(jobs)} input(s) failed; see {output / 'medsr_summary.json'}")
    else:
        _run_one(jobs[0], output, bundle, pipeline, settings)


def _open_pipeline(bundle, engine, precision, device, sampler, threads):
    """The bundle's pipeline on ``engine`` (sessions are opened only once an input has passed its checks)."""
    from medsr.engine.pipeline import LatentSRPipeline
    from medsr.engine.sessions import open_sessions

    if engine == "torch":
        torch_reference()
    scheduler_config = bundle.manifest.scheduler
    if sampler:
        scheduler_config = scheduler_config.with_sampler(sampler)
    sessions = open_sessions(bundle, engine, device=device, threads=threads, precision=precision)
    return LatentSRPipeline(bundle, sessions, scheduler_config)


def _run_one(job, output, bundle, pipeline, settings) -> None:
    from tqdm import tqdm

    from medsr.cli.jobs import describe, prepare_job, provenance_of, run_prepared

    prepared = prepare_job(job, output, bundle, settings)
    with tqdm(unit="slice", desc="super-resolving", disable=None) as bar:
        record = run_prepared(prepared, pipeline(), settings, progress=bar.update)
    click.echo(f"{describe(record)}; engine {provenance_of(pipeline(), settings)['engine']}")


def _run_batch(jobs, outdir: Path, bundle, pipeline, settings) -> int:
    """Run a batch into ``outdir`` (created if missing); return the number of failed inputs."""
    from medsr.cli.jobs import SUMMARY_NAME, run_batch
    from medsr.errors import OutputError

    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"{outdir}: the output of a batch must be a directory")
    try:
        outdir.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{outdir}: cannot create the output directory: {exc.strerror or exc}") from exc
    summary = run_batch(jobs, outdir, bundle, pipeline, settings, click.echo)
    counts = summary["counts"]
    click.echo(
        f"batch: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
        f"summary in {outdir / SUMMARY_NAME}"
    )
    return counts["failed"]


def main() -> None:
    run_command(infer)
