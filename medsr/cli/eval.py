"""``medsr-eval``: does the engine reproduce the reference (parity), how faithful is the output to the true image
(fidelity), and which configuration is better (compare). Thin shells over medsr.eval; heavy imports are lazy."""

from __future__ import annotations

import math
from pathlib import Path

import click

from medsr.cli.common import medsr_errors, run_command, torch_reference
from medsr.cli.model import MODEL_HELP, adapt_limit_options
from medsr.engine.precision import precision_choices
from medsr.engine.select import AUTO_ENGINE, ENGINE_CHOICES, ENGINE_HELP, PRECISION_DEFAULT_HELP

PARITY_ENGINES = ("ort", "trt", "openvino")


def _comma_list(ctx, param, value):
    """``"a,b"`` -> ("a", "b"); None stays None (the command's default)."""
    if value is None:
        return None
    return tuple(item.strip() for item in value.split(",") if item.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Parity with the PyTorch reference, fidelity to the true image, paired comparison of configurations."""


def _compared(report) -> str:
    """What a passing parity run compared: every stage, or the final image alone (tiled slices)."""
    if [stage.stage for stage in report.stages] == ["sr_image"]:
        return "the final image (sr_image)"
    return f"every one of the {len(report.stages)} stages"


def _parity_table(run) -> str:
    lines = [f"{'stage':<22} {'max abs':>10} {'rel L2':>10} {'PSNR dB':>9}  ok"]
    for stage in run.report.stages:
        mark = "yes" if stage.passed else "NO"
        lines.append(f"{stage.stage:<22} {stage.max_abs:>10.3g} {stage.rel_l2:>10.3g} {stage.psnr_db:>9.2f}  {mark}")
    return "\n".join(lines)


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option(
    "--engine", type=click.Choice((AUTO_ENGINE, *PARITY_ENGINES)), default="auto", show_default=True, help=ENGINE_HELP
)
@click.option("--precision", type=click.Choice(precision_choices(*PARITY_ENGINES)), help=f"{PRECISION_DEFAULT_HELP}.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--reference-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--data",
    multiple=True,
    type=click.Path(path_type=Path),
    help="NIfTI volumes, 2D images, directories or default-split source names (repeatable); default: nibabel's "
    "real example4d EPI volume.",
)
@click.option("--slices", type=click.IntRange(min=1), default=2, show_default=True, help="Slices per file.")
@click.option("--size", type=click.IntRange(min=1), default=64, show_default=True, help="LR crop side (pixels).")
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: the bundle's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--threshold-db", type=float, help="Pass threshold of every stage (default: 60 fp32, 40 fp16/bf16).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: the available cores).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
@medsr_errors
def parity(
    model,
    engine,
    precision,
    device,
    reference_device,
    data,
    slices,
    size,
    steps,
    seed,
    batch_size,
    threshold_db,
    threads,
    output,
    overwrite,
):
    """Run an engine and the PyTorch reference on the same real slices, seed and noise; compare every traced stage
    (slices run in tiles trace only their final image, and the report says so).

    Exit code 1 when a stage falls below the threshold (the first one is named) or a stage gives NaN/Inf.
    """
    import json

    from medsr.cli.model import load_model
    from medsr.engine.pipeline import SamplingOptions
    from medsr.engine.select import resolve_engine
    from medsr.engine.volume import window_percentiles
    from medsr.eval.harness import parity_inputs, run_parity
    from medsr.io.atomic import check_output_path, write_text_atomic

    if output is not None:
        check_output_path(output, overwrite)
    bundle = load_model(model)
    torch_reference()
    lr, ids = parity_inputs(list(data), slices, size, window_percentiles(bundle))
    options = SamplingOptions(steps=steps, seed=seed, batch_size=batch_size)
    engine, precision, reason = resolve_engine(engine, device, precision)
    run = run_parity(bundle, engine, lr, ids, options, precision, threshold_db, device, reference_device, threads)
    click.echo(
        f"{bundle.name}: engine {engine} {precision} [{','.join(run.providers)}] ({reason}) vs torch fp32 reference"
    )
    click.echo(f"{len(ids)} real slices, LR {lr.shape[1]}x{lr.shape[2]}: {', '.join(ids)}")
    if run.report is not None:
        click.echo(_parity_table(run))
        if run.report.note:
            click.echo(f"note: {run.report.note}")
    if output is not None:
        report = {"model": bundle.name, "bundle": str(bundle.root), **run.to_dict(), "engine_reason": reason}
        write_text_atomic(output, json.dumps(report, indent=1) + "\n", overwrite=overwrite)
    if not run.passed:
        raise click.ClickException(f"parity failed: {run.failure()}")
    passed = f"parity passed: {_compared(run.report)} >= {run.threshold_db:g} dB"
    click.echo(f"{passed} (final {run.report.final.psnr_db:.2f} dB)")


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option(
    "--data",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="NIfTI volumes, 2D images (DICOM/PNG/TIFF), directories of them, or source names of the default split "
    "(colin27-slab, epi, shoulder, default:heldout); repeatable.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Output dir.")
@click.option("--scale", type=click.IntRange(min=2), help="Checked against the model's scale factor.")
@click.option(
    "--baselines",
    callback=_comma_list,
    default="zerofill,bicubic,lanczos",
    show_default=True,
    help="Comma-separated baselines, or 'none'.",
)
@click.option(
    "--consistency",
    callback=_comma_list,
    help="Comma-separated modes (none,kspace,backproject) to "
    "measure the model with, each a configuration (default: the bundle's).",
)
@click.option("--name", help="Name of the model's configurations (default: the bundle's name).")
@click.option("--dataset", help="Dataset name in the summaries (default: the source names joined by '+').")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True, help=ENGINE_HELP)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: the bundle's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--axis", type=click.IntRange(0, 2), help="Slice axis of volumes (default: largest spacing).")
@click.option("--max-slices", type=click.IntRange(min=1), help="Evenly spaced foreground slices per file.")
@click.option("--panels", type=click.IntRange(min=0), default=4, show_default=True, help="Images given a panel.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: the available cores).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@medsr_errors
def fidelity(
    model,
    data,
    output,
    scale,
    baselines,
    consistency,
    name,
    dataset,
    engine,
    device,
    steps,
    seed,
    axis,
    max_slices,
    panels,
    threads,
    overwrite,
):
    """Super-resolve LR made from true HR slices; measure the model, the baselines and the autoencoder ceiling."""
    from tqdm import tqdm

    from medsr.cli.model import load_model
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
    from medsr.engine.select import resolve_engine
    from medsr.engine.sessions import open_sessions
    from medsr.engine.volume import window_percentiles
    from medsr.errors import InputError
    from medsr.eval import fidelity_report as report
    from medsr.eval.fidelity import FidelitySettings, evaluate
    from medsr.eval.slices import eval_sources, load_eval_slices, spread

    bundle = load_model(model)
    if bundle.plane != "in-plane":
        raise InputError(
            f"{bundle.root}: model {bundle.name!r} is {bundle.plane} (task.plane); fidelity measures in-plane "
            "models slice by slice, medsr-eval through-plane measures this one on thick-slice volumes"
        )
    choice = resolve_engine(engine, device)
    if scale is not None and scale != bundle.scale:
        raise InputError(f"--scale {scale}, but the model {bundle.root} super-resolves x{bundle.scale}")
    sources = eval_sources(list(data), axis=axis)
    slices = load_eval_slices(sources, window_percentiles(bundle), per_file=max_slices)
    modes = consistency or (bundle.manifest.task.consistency,)
    settings = FidelitySettings(
        model_name=name or bundle.name,
        consistency=tuple(modes),
        baselines=() if baselines == ("none",) else baselines,
        options=SamplingOptions(steps=steps, seed=seed, batch_size=1),
    )
    dataset = dataset or "+".join(source.name for source in sources)
    panel_ids = {s.id for s in spread(slices, panels)} if panels else set()
    report.prepare_output_dir(output, settings.configs, sorted(panel_ids), overwrite)
    if choice.engine == "torch":
        torch_reference()
    sessions = open_sessions(bundle, choice.engine, device=device, threads=threads, precision=choice.precision)
    pipeline = LatentSRPipeline(bundle, sessions)
    kept = []
    with tqdm(total=len(slices), unit="slice", desc="fidelity", disable=None) as bar:
        result = evaluate(
            pipeline,
            slices,
            settings,
            progress=bar.update,
            keep=lambda outputs: kept.append(outputs) if outputs.slice.id in panel_ids else None,
        )
    context = {
        "model": bundle.name,
        "bundle": str(bundle.root),
        "scale": bundle.scale,
        "degradation": pipeline.degradation.to_dict(),
        "engine": f"{choice.engine} {choice.precision}",
        "engine_reason": choice.reason,
        "steps": steps or pipeline.scheduler_config.default_steps,
        "seed": seed,
        "sources": {source.name: str(source.path) for source in sources},
    }
    report.write_report(output, result, dataset, context, kept)
    click.echo(report.markdown_summary(result, dataset))
    click.echo(f"wrote {output}: {len(slices)} images x {len(settings.configs)} configurations")
    providers = ",".join(next(iter(sessions.values())).providers)
    click.echo(f"engine {choice.engine} {choice.precision} [{providers}] ({choice.reason})")


TORCH_FREE_ENGINES = tuple(e for e in ENGINE_CHOICES if e != "torch")


@cli.command("through-plane")
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    help="A through-plane bundle (task.plane) to measure; without it only the baselines (and ECLARE) run.",
)
@click.option(
    "--data",
    multiple=True,
    default=("colin27-slab",),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Isotropic NIfTI volumes or default-split source names (colin27-slab, ...); repeatable.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path, file_okay=False), help="Output dir.")
@click.option(
    "--factor",
    "factors",
    multiple=True,
    type=click.IntRange(2, 6),
    help="Slice spacing in HR voxels; repeatable (default: every factor the model serves, else 4).",
)
@click.option("--profile", type=click.Choice(["gaussian", "box"]), default="gaussian", show_default=True)
@click.option(
    "--fwhm", type=click.FloatRange(min=0, min_open=True), help="Slice thickness in HR voxels (default: the factor)."
)
@click.option("--axis", type=click.IntRange(0, 2), default=2, show_default=True, help="Slice axis of the volumes.")
@click.option(
    "--baselines",
    callback=_comma_list,
    default="linear,bspline,sinc",
    show_default=True,
    help="Comma-separated slice-axis baselines, or 'none'.",
)
@click.option(
    "--eclare/--no-eclare",
    default=None,
    help="Run ECLARE (run-eclare) as a peer; default: when it is on PATH.",
)
@click.option("--eclare-args", default="", help="Extra arguments of run-eclare (quoted).")
@click.option("--name", help="Name of the model's configuration (default: the bundle's name).")
@click.option("--engine", type=click.Choice(TORCH_FREE_ENGINES), default="auto", show_default=True, help=ENGINE_HELP)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: the bundle's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--noise", type=click.Choice(["per-plane", "shared"]), default="per-plane", show_default=True)
@click.option(
    "--consistency",
    type=click.Choice(["none", "project", "backproject"]),
    help="Data consistency of the model (default: the bundle's).",
)
@click.option(
    "--adapt",
    is_flag=True,
    help="Fine-tune the model on each simulated volume's own in-plane planes before running it (as medsr-infer "
    "--adapt; its seconds count in the volume's time). Needs PyTorch (medsr[torch]).",
)
@adapt_limit_options
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: the available cores).")
@click.option("--no-figures", is_flag=True, help="Skip the PNG panels and continuity plots.")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@medsr_errors
def through_plane(
    model,
    data,
    output,
    factors,
    profile,
    fwhm,
    axis,
    baselines,
    eclare,
    eclare_args,
    name,
    engine,
    device,
    steps,
    seed,
    batch_size,
    noise,
    consistency,
    adapt,
    adapt_time,
    adapt_steps,
    threads,
    no_figures,
    overwrite,
):
    """Simulate thick slices from isotropic volumes and make them isotropic again: a through-plane model (same
    volume core as medsr-infer --through-plane), linear, cubic B-spline and sinc along the slice axis, and ECLARE
    when installed; PSNR and SSIM over the volume, the foreground and each orientation, continuity, seconds."""
    from medsr.eval import thick_slices as ts
    from medsr.eval import thick_slices_report as report

    if (adapt or adapt_time or adapt_steps) and model is None:
        raise click.UsageError("--adapt, --adapt-time and --adapt-steps need --model")
    if not adapt and (adapt_time is not None or adapt_steps is not None):
        raise click.UsageError("--adapt-time and --adapt-steps apply to --adapt only")
    runner, context = None, {"model": None}
    baselines = () if baselines == ("none",) else tuple(baselines)
    if model is not None:
        from medsr.cli.model import load_model
        from medsr.engine.volume import check_task_plane

        bundle = load_model(model)
        check_task_plane(bundle, through_plane=True)
        factors = factors or bundle.scales
    settings = ts.ThickSliceSettings(
        factors=tuple(factors or (4,)),
        profile=profile,
        fwhm=fwhm,
        axis=axis,
        baselines=baselines,
        eclare=eclare,
        eclare_args=eclare_args,
    )
    if model is not None:
        degradation = bundle.manifest.task.degradation
        ts.check_model_factors(name or bundle.name, bundle.scales, settings)
    volumes = ts.load_truth_volumes([str(d) for d in data])
    names = [v.name for v in volumes]
    planned = None
    if model is not None:
        planned = ts.ModelRunner(name or bundle.name, bundle.scales, None, {}, ts.plan_check(bundle))
    ts.check_runs(volumes, settings, planned)
    report.prepare_output_dir(output, names, list(settings.factors), overwrite, figures=not no_figures)
    notes = [ts.eclare_note(settings)]
    if model is not None:
        from medsr.engine.jobs import EngineOptions
        from medsr.engine.pipeline import SamplingOptions
        from medsr.engine.select import resolve_engine

        choice = resolve_engine(engine, device)
        engine_options = EngineOptions(engine=choice.engine, precision=choice.precision, device=device, threads=threads)
        pipeline = engine_options.open(bundle)
        options = SamplingOptions(steps=steps, seed=seed, batch_size=batch_size, consistency=consistency, noise=noise)
        providers = ",".join(next(iter(pipeline.sessions.values())).providers)
        described = {
            "model": bundle.name,
            "bundle": str(bundle.root),
            "scale": bundle.scale,
            "scales": list(bundle.scales),
            "degradation": degradation.to_dict(),
            "weights": bundle.manifest.provenance.weights.to_dict(),
            "engine": f"{choice.engine} {choice.precision} [{providers}]",
            "engine_reason": choice.reason,
            "steps": steps or pipeline.scheduler_config.default_steps,
            "seed": seed,
            "noise": noise,
            "consistency": consistency or bundle.manifest.task.consistency,
        }
        pipeline_for = None
        if adapt:
            pipeline_for = _adapting(bundle, engine_options, seed, adapt_time, adapt_steps)
            described["adapted"] = {"seconds": adapt_time, "steps": adapt_steps, "seed": seed}
        label = name or (f"{bundle.name}+adapt" if adapt else bundle.name)
        runner = ts.through_plane_runner(pipeline, options, label, described, pipeline_for)
        context["model"] = described
        trained = {f: bundle.with_scale(f).manifest.task.degradation for f in settings.factors}
        differ = [
            f for f, d in trained.items() if d.profile != profile or not math.isclose(d.fwhm, settings.fwhm_at(f))
        ]
        if differ:
            made = ", ".join(f"{trained[f].fwhm:g} at x{f}" for f in differ)
            here = ", ".join(f"{settings.fwhm_at(f):g} at x{f}" for f in differ)
            notes.append(
                f"the model was made for a {degradation.profile} profile of FWHM {made} HR voxels; the slices here "
                f"are {profile} of FWHM {here} (its consistency projects with its own profile)"
            )
    else:
        notes.append("no --model: the baselines alone")
    runs = []
    for volume in volumes:
        for factor in settings.factors:
            run = ts.run_factor(volume, factor, settings, runner)
            runs.append(run)
            click.echo(
                f"{volume.name} x{factor}: "
                + ", ".join(
                    f"{m} {row['volume']['psnr_fg']:.2f} dB fg ({run.seconds[m]:.2f} s)"
                    for m, row in run.metrics.items()
                )
            )
    settings_dict = {
        "factors": list(settings.factors),
        "profile": settings.profile,
        "fwhm": settings.fwhm,
        "axis": settings.axis,
        "baselines": list(settings.baselines),
        "data": {v.name: str(v.path) for v in volumes},
    }
    affines = {v.name: v.affine for v in volumes}
    report.write_report(output, runs, settings_dict, context, notes, affines, not no_figures, overwrite)
    click.echo(report.markdown_table(runs))
    for note in notes:
        click.echo(note)
    click.echo(f"wrote {output}: {len(volumes)} volume(s) x {len(settings.factors)} factor(s)")


@cli.command()
@click.argument("summaries", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Markdown report file.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False), help="Full report as JSON.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Screening scatter plot (PNG).")
@click.option("--metrics", callback=_comma_list, help="Comma-separated metrics (default: psnr,ssim,ms_ssim,cD1).")
@click.option("--intersect", is_flag=True, help="Compare only the images every pair shares (else: refuse).")
@click.option(
    "--alternative",
    type=click.Choice(["two-sided", "greater", "less"]),
    default="two-sided",
    show_default=True,
    help="Wilcoxon alternative, for first-file-minus-second differences.",
)
@click.option("--n-boot", type=click.IntRange(min=100), default=10_000, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@medsr_errors
def compare(summaries, output, json_path, plot, metrics, intersect, alternative, n_boot, seed, overwrite):
    """Paired statistics between fidelity summaries (JSON files of `medsr-eval fidelity`), paired by image id."""
    import json

    from medsr.errors import InputError
    from medsr.eval.compare import DEFAULT_METRICS, compare_files, render_markdown
    from medsr.eval.figures import save_screening_plot
    from medsr.io.atomic import check_output_path, write_text_atomic

    for path in (output, json_path, plot):
        if path is not None:
            check_output_path(path, overwrite)
    result = compare_files(
        list(summaries),
        metrics=metrics or DEFAULT_METRICS,
        intersect=intersect,
        alternative=alternative,
        n_boot=n_boot,
        seed=seed,
    )
    if plot is not None and result["screening"]["fit"] is None:
        raise InputError(f"--plot: no screening regression to draw ({result['screening']['note']})")
    text = render_markdown(result)
    if output is not None:
        write_text_atomic(output, text, overwrite=overwrite)
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(result, indent=1) + "\n", overwrite=overwrite)
    if plot is not None:
        save_screening_plot(plot, result["screening"])
    click.echo(text)


def _adapting(bundle, engine_options, seed: int, seconds: float | None, steps: int | None):
    """``pipeline_for(prepared, plan)`` of ``--adapt``: ``bundle`` adapted to that volume (medsr.export.train.adapt,
    imported only then), opened on ``engine_options`` for the ``with`` block."""
    import contextlib

    from medsr.cli.model import adaptation

    adapt, config = adaptation(seed, seconds, steps)

    @contextlib.contextmanager
    def pipeline_for(prepared, plan):
        with adapt.adapted_bundle(
            bundle, prepared, plan, config, engine_options.device, engine_options.threads
        ) as adapted:
            yield engine_options.open(adapted)

    return pipeline_for


def main() -> None:
    run_command(cli)
