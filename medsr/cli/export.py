"""``medsr-export``: build a model from a preset and weights, export its three graphs and write a bundle."""

from __future__ import annotations

import click

from medsr.cli.common import medsr_errors, run_command, torch_reference
from medsr.cli.serve import triton_export_options
from medsr.engine.precision import PRECISIONS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", "preset_name", required=True, help="Model configuration (see medsr.export.presets).")
@click.option("--weights", type=click.Path(dir_okay=False), help="safetensors file with vae.* and unet.* weights.")
@click.option("--vae-weights", type=click.Path(), help="The preset's published VAE (MedVAE .ckpt, SD-VAE folder/file).")
@click.option("--unet-weights", type=click.Path(dir_okay=False), help="A latent-sr denoiser .ckpt.")
@click.option(
    "--objective-from-weights",
    is_flag=True,
    help="Sample under the scheduler --weights was trained with (medsr-train records it) instead of refusing "
    "weights trained for another objective than the preset's.",
)
@click.option(
    "--random-init", is_flag=True, help="Random weights for whatever no file gives (tests, benchmarks); recorded."
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of --random-init (>= 0).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@click.option(
    "--validate",
    is_flag=True,
    help="Before keeping the bundle, run parity (ONNX Runtime vs the PyTorch reference, every stage >= 60 dB on "
    "real slices); a bundle that fails is not written. The figures are recorded in the manifest.",
)
@click.option(
    "--trt",
    "trt_precision",
    type=click.Choice(PRECISIONS["trt"]),
    help="Also build TensorRT plans in this precision into the engine cache ($MEDSR_CACHE, else ~/.cache/medsr; "
    "needs TensorRT and a GPU, checked before anything is exported).",
)
@click.option(
    "--trt-shape",
    type=(click.IntRange(min=1), click.IntRange(min=1), click.IntRange(min=1)),
    default=(4, 64, 64),
    show_default=True,
    help="Batch, LR height and LR width of the static TensorRT profile that --trt builds.",
)
@click.option(
    "--trt-scale",
    "trt_scales",
    type=click.IntRange(min=2),
    multiple=True,
    help="Build --trt plans for this factor of a model serving several (task.scales; repeatable; default: the "
    "model's default factor).",
)
@triton_export_options
@medsr_errors
def export(
    preset_name,
    weights,
    vae_weights,
    unet_weights,
    objective_from_weights,
    random_init,
    seed,
    output,
    overwrite,
    validate,
    trt_precision,
    trt_shape,
    trt_scales,
):
    """Export the VAE encoder, VAE decoder and denoiser of a model as a validated ONNX bundle."""
    from medsr.errors import InputError
    from medsr.export.builder import build_models
    from medsr.export.objective import with_trained_objective
    from medsr.export.onnx import export_bundle
    from medsr.export.presets import get_preset

    complete = bool(weights) or bool(vae_weights and unet_weights)
    if complete == random_init:
        raise InputError(
            "give exactly one of --weights FILE, --vae-weights with --unet-weights, or --random-init "
            "(which may complete one of --vae-weights/--unet-weights)"
        )
    preset = get_preset(preset_name)
    if objective_from_weights:
        preset = with_trained_objective(preset, weights)
    if trt_scales and not trt_precision:
        raise InputError("--trt-scale chooses the factors --trt builds plans for; add --trt PRECISION")
    unserved = sorted(set(trt_scales) - set(preset.trained_scales))
    if unserved:
        served = ", ".join(f"x{s}" for s in preset.trained_scales)
        raise InputError(f"--trt-scale {unserved[0]}: preset {preset.name} serves {served}")
    if trt_precision:
        _require_tensorrt()
    vae, unet, provenance = build_models(
        preset, weights=weights, vae_weights=vae_weights, unet_weights=unet_weights, seed=seed
    )
    if validate:
        path = _export_validated(vae, unet, preset, output, provenance, overwrite)
    else:
        path = export_bundle(vae, unet, preset, output, provenance, overwrite=overwrite)
    click.echo(f"wrote bundle {path} (preset {preset.name}, weights: {provenance['weights']['source']})")
    if trt_precision:
        _build_trt_plans(path, trt_precision, *trt_shape, trt_scales)


def _require_tensorrt() -> None:
    """Fail before exporting when TensorRT or a CUDA GPU is missing (a BackendError saying what to install)."""
    from medsr.engine.cuda import CudaRuntime
    from medsr.engine.trt import import_tensorrt

    import_tensorrt()
    CudaRuntime().gpu()


def _build_trt_plans(path, precision: str, batch: int, lr_height: int, lr_width: int, scales=()) -> None:
    """Build (or find up to date) one static plan per graph for this slice size and each factor of ``scales``
    (default: the model's), in the engine cache, where medsr-infer finds them: its sessions are the bundle's, whatever
    factor a run asks of a multi-factor model, and a plan is keyed by its shapes."""
    from medsr.bundle import load_bundle
    from medsr.engine.profiles import static_profiles
    from medsr.engine.trt import open_trt_sessions

    bundle = load_bundle(path)
    for scale in scales or (bundle.scale,):
        profiles = static_profiles(bundle.with_scale(scale), batch, lr_height, lr_width)
        sessions = open_trt_sessions(bundle, precision, profiles={g: [p] for g, p in profiles.items()})
        for graph, session in sessions.items():
            session.plan(profiles[graph])
            click.echo(f"TensorRT {precision} plan ready for {graph} at x{scale} ({profiles[graph].tag})")


def _export_validated(vae, unet, preset, output, provenance, overwrite):
    """Export into a staging directory, run the parity gate on it, record the figures in its manifest and only
    then move it to ``output``; a failing bundle is deleted with the staging directory."""
    import dataclasses

    from medsr.bundle import load_bundle, write_manifest
    from medsr.errors import BundleError
    from medsr.eval.harness import validate_bundle
    from medsr.export.onnx import write_bundle
    from medsr.io.atomic import atomic_dir

    torch_reference()
    with atomic_dir(output, overwrite=overwrite) as staging:
        write_bundle(vae, unet, preset, staging, provenance)
        run = validate_bundle(staging)
        if not run.passed:
            raise BundleError(f"{output}: not written: the exported bundle fails parity: {run.failure()}")
        manifest = load_bundle(staging).manifest
        validation = {**manifest.validation, "parity": run.to_dict()}
        write_manifest(staging, dataclasses.replace(manifest, validation=validation))
    click.echo(f"parity: every stage >= {run.threshold_db:g} dB (final {run.report.final.psnr_db:.1f} dB)")
    return output


def main() -> None:
    run_command(export)
