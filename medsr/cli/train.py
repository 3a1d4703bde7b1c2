"""``medsr-train``: train the VAE (``vae``), the denoiser (``denoiser``), or a whole model (``recipe``).

Each run writes into its directory: ``checkpoint/`` (every --checkpoint-every steps), ``metrics.jsonl`` and the
final weights (``vae.safetensors`` or ``weights.safetensors``, the file ``medsr-export --weights`` takes).
"""

from __future__ import annotations

from pathlib import Path

import click

from medsr.cli.common import medsr_errors, run_command

#: The names of medsr.export.train.recipe.RECIPES, known here without importing torch (a test checks they agree).
RECIPE_NAMES = ("default", "through-plane")

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _loop_options(function):
    """The optimisation options shared by ``vae`` and ``denoiser`` (medsr.export.train.loop.LoopConfig)."""
    options = [
        click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak AdamW learning rate."),
        click.option("--min-lr", type=float, default=1e-6, show_default=True, help="End of the cosine decay."),
        click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True, help="Linear warmup steps."),
        click.option("--weight-decay", type=float, default=0.01, show_default=True),
        click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Max gradient norm (0: off)."),
        click.option("--ema", "ema_decay", type=float, default=0.999, show_default=True, help="EMA decay (0: off)."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=500, show_default=True),
        click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True),
        click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch (default: torch's)."),
        click.option("--no-progress", is_flag=True, help="No progress bar (metrics.jsonl is still written)."),
        click.option(
            "--source",
            "sources",
            multiple=True,
            default=("default:train",),
            show_default=True,
            help="Training data: a file (NIfTI volume, DICOM/PNG/TIFF image), a source name of the default split, "
            "or default:train / default:train-mri / default:heldout. Repeatable.",
        ),
        click.option(
            "--modality",
            type=click.Choice(["mri", "xray"]),
            default="mri",
            show_default=True,
            help="Modality of --source files (mri: k-space LR; xray: Lanczos LR).",
        ),
        click.option("--preset", default="default", show_default=True, help="Model preset (medsr-export --help)."),
        click.option(
            "-o",
            "--out",
            "run_dir",
            type=click.Path(path_type=Path, file_okay=False),
            required=True,
            help="Run directory.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _loop_config(kw: dict):
    from medsr.export.train.loop import LoopConfig

    return LoopConfig(
        steps=kw["steps"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        min_lr=kw["min_lr"],
        warmup_steps=kw["warmup"],
        weight_decay=kw["weight_decay"],
        grad_clip=kw["grad_clip"],
        ema_decay=kw["ema_decay"],
        checkpoint_every=kw["checkpoint_every"],
        log_every=kw["log_every"],
        seed=kw["seed"],
    )


def _setup(kw: dict):
    """(preset, slices, device, data note) from the shared options."""
    import torch

    from medsr.data.pairs import source_slices
    from medsr.data.sources import resolve_sources
    from medsr.export.presets import get_preset
    from medsr.export.train.loop import pick_device

    if kw["threads"]:
        torch.set_num_threads(kw["threads"])
    preset = get_preset(kw["preset"])
    sources = resolve_sources(list(kw["sources"]), kw["modality"])
    percentiles = (preset.intensity["low"], preset.intensity["high"])
    slices = [s for source in sources for s in source_slices(source, percentiles)]
    note = f"{len(slices)} slices from {', '.join(s.name for s in sources)}"
    return preset, slices, pick_device(kw["device"]), note


@click.group(context_settings=CONTEXT)
def cli():
    """Train medsr models on real images (PyTorch; CPU here, CUDA when present)."""


@cli.command(context_settings=CONTEXT)
@_loop_options
@click.option("--crop", type=click.IntRange(min=8), default=64, show_default=True, help="HR crop size in pixels.")
@click.option("--kl-weight", type=float, default=1e-6, show_default=True)
@click.option(
    "--init",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Fine-tune from this safetensors file (vae.* keys).",
)
@medsr_errors
def vae(crop, kl_weight, init, **kw):
    """Train or fine-tune the preset's KL autoencoder (L1 + kl_weight * KL) on HR crops."""
    from medsr.export.train.vae import VaeConfig, train_vae

    preset, slices, device, note = _setup(kw)
    out = train_vae(
        kw["run_dir"],
        preset,
        slices,
        _loop_config(kw),
        VaeConfig(crop=crop, kl_weight=kl_weight),
        device,
        init=init,
        resume=kw["resume"],
        progress=not kw["no_progress"],
        data_note=note,
    )
    click.echo(f"wrote {out}")


@cli.command(context_settings=CONTEXT)
@_loop_options
@click.option(
    "--vae",
    "vae_weights",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="The frozen VAE: a safetensors file with vae.* keys (medsr-train vae writes one).",
)
@click.option("--pairs", type=click.IntRange(min=1), default=2048, show_default=True, help="Cached crop pairs.")
@click.option("--crop", type=click.IntRange(min=8), default=64, show_default=True, help="HR crop size in pixels.")
@click.option("--loss", type=click.Choice(["l1", "l2"]), default="l1", show_default=True)
@click.option(
    "--terminal-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fraction of each batch trained at the noisiest time, where a 1-step sampler evaluates the model.",
)
@click.option(
    "--contrast-copies",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Randomly remapped-contrast copies of every training slice (medsr.data.augment).",
)
@click.option(
    "--prediction-type",
    type=click.Choice(["epsilon", "v_prediction", "sample", "flow"]),
    help="Override the preset's target (x0 = sample); recorded in the weights (medsr-export "
    "--objective-from-weights exports them with it).",
)
@click.option(
    "--beta-schedule",
    type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2", "cosine"]),
    help="Override the preset's schedule; recorded in the weights like --prediction-type.",
)
@click.option(
    "--factor",
    type=click.IntRange(min=2),
    help="A preset trained for several factors (through-plane): train for this one of them only.",
)
@medsr_errors
def denoiser(
    vae_weights, pairs, crop, loss, terminal_fraction, contrast_copies, prediction_type, beta_schedule, factor, **kw
):
    """Train the preset's denoiser on cached latents of a frozen VAE."""
    from medsr.export.train.denoiser import DenoiserConfig, train_denoiser

    preset, slices, device, note = _setup(kw)
    if factor is not None:
        preset = _single_factor(preset, factor)
    objective = DenoiserConfig(
        pairs=pairs,
        crop=crop,
        loss=loss,
        terminal_fraction=terminal_fraction,
        contrast_copies=contrast_copies,
        prediction_type=prediction_type,
        beta_schedule=beta_schedule,
    )
    out = train_denoiser(
        kw["run_dir"],
        preset,
        vae_weights,
        slices,
        _loop_config(kw),
        objective,
        device,
        resume=kw["resume"],
        progress=not kw["no_progress"],
        data_note=note,
    )
    click.echo(f"wrote {out}")


@cli.command(context_settings=CONTEXT)
@click.argument("name", type=click.Choice(sorted(RECIPE_NAMES)))
@click.option("-o", "--out", "run_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option(
    "--bundle",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to export the bundle (default: OUT/bundle).",
)
@click.option("--resume", is_flag=True, help="Skip finished stages and continue an interrupted one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="CPU threads for torch (default: torch's; 1 is faster when other processes share the cores).",
)
@click.option("--no-progress", is_flag=True)
@medsr_errors
def recipe(name, run_dir, bundle, resume, overwrite, threads, no_progress):
    """Reproduce a shipped model: VAE, denoiser, export, held-out table (OUT/heldout.md)."""
    import torch

    from medsr.export.train.recipe import run_recipe

    if threads:
        torch.set_num_threads(threads)

    summary = run_recipe(
        name, run_dir, bundle or run_dir / "bundle", resume, overwrite, not no_progress, _through_plane_heldout
    )
    click.echo((run_dir / "heldout.md").read_text())
    click.echo(f"total {summary['timings']['total_s'] / 60:.1f} min; bundle {bundle or run_dir / 'bundle'}")


def _single_factor(preset, factor: int):
    """``preset`` trained for ``factor`` alone, one of its ``scales``."""
    import dataclasses

    if factor not in preset.trained_scales:
        raise click.BadParameter(f"preset {preset.name} is trained for {preset.trained_scales}", param_hint="--factor")
    return dataclasses.replace(preset, scale=factor, scales=(), degradation=preset.degradation_at(factor))


#: The held-out volume of through-plane recipes and its slice axis: the Colin27 slab is 24 voxels along axis 2, too
#: few thick slices there, so thick sagittal slices (axis 0) are simulated (docs/through_plane.md).
THROUGH_PLANE_HELDOUT = ("colin27-slab", 0)


def _through_plane_heldout(bundle_dir: Path, out_dir: Path, factors: tuple[int, ...]) -> tuple[dict, str]:
    """``medsr-eval through-plane`` of a recipe's bundle on the held-out slab at each factor: (report, table)."""
    import json

    from medsr.cli.eval import cli as eval_cli

    data, axis = THROUGH_PLANE_HELDOUT
    args = ["through-plane", "--model", str(bundle_dir), "--data", data, "--axis", str(axis), "-o", str(out_dir)]
    args += [arg for factor in factors for arg in ("--factor", str(factor))]
    eval_cli.main([*args, "--overwrite"], standalone_mode=False)
    return json.loads((out_dir / "through_plane.json").read_text()), (out_dir / "through_plane.md").read_text()


def main() -> None:
    run_command(cli)
