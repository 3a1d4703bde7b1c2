"""``medsr-infer``: super-resolve a NIfTI volume with a model bundle, torch-free unless ``--engine torch``."""

from __future__ import annotations

from pathlib import Path

import click

from medsr.cli.common import medsr_errors, run_command
from medsr.engine.pipeline import CONSISTENCY_MODES
from medsr.engine.schedulers.config import ALGORITHMS


def default_output(input_path: Path, scale: int) -> Path:
    """``<stem>_sr<scale>x.nii.gz`` in the current directory (never next to the input, which may be read-only)."""
    name = input_path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else input_path.stem
    return Path(f"{stem}_sr{scale}x.nii.gz")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Output NIfTI file.")
@click.option("--model", type=click.Path(path_type=Path), help="Model bundle directory (default: the bundled one).")
@click.option("--engine", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sampler", type=click.Choice(ALGORITHMS), help="Sampler (default: the bundle's).")
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (default: the bundle's).")
@click.option(
    "--consistency",
    type=click.Choice(CONSISTENCY_MODES),
    help="Data consistency with the LR input after decoding (default: the bundle's).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Slices per batch.")
@click.option("--axis", type=click.IntRange(0, 2), help="Slice axis (default: the axis of largest spacing).")
@click.option("--frame", type=click.IntRange(min=0), help="Only this frame of a 4D volume (default: every frame).")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: the available cores).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@medsr_errors
def infer(
    input_path, output, model, engine, device, sampler, steps, consistency, seed, batch_size, axis, frame, threads,
    overwrite,
):
    """Super-resolve INPUT (.nii or .nii.gz) in-plane by the model's scale factor."""
    import dataclasses
    import time

    import numpy as np

    from tqdm import tqdm

    import medsr
    from medsr.engine.bundle import load_bundle
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
    from medsr.engine.schedulers import SchedulerConfig
    from medsr.engine.sessions import open_sessions
    from medsr.errors import BundleError, InputError
    from medsr.infer import choose_slice_axis, super_resolve_volume
    from medsr.io.atomic import check_output_path
    from medsr.io.nifti import is_nifti, load_nifti, save_nifti
    from medsr.models import DEFAULT_BUNDLE

    started = time.perf_counter()
    if not is_nifti(input_path):
        raise InputError(f"{input_path}: expected a .nii or .nii.gz file")
    if model is None:
        if not (DEFAULT_BUNDLE / "medsr.json").is_file():
            raise BundleError("no default model is bundled with this installation; pass --model BUNDLE")
        model = DEFAULT_BUNDLE
    bundle = load_bundle(model)
    output = output or default_output(input_path, bundle.scale)
    check_output_path(output, overwrite)
    volume = load_nifti(input_path)
    data = volume.data
    if frame is not None:
        if data.ndim != 4 or frame >= data.shape[3]:
            raise InputError(f"{input_path}: --frame {frame} but the image has shape {data.shape}")
        data = data[..., frame]
    axis = choose_slice_axis(volume.zooms) if axis is None else axis
    sessions = open_sessions(bundle, engine, device=device, threads=threads)
    scheduler_config = SchedulerConfig.from_dict(bundle.scheduler)
    if sampler:
        scheduler_config = dataclasses.replace(scheduler_config, algorithm=sampler)  # validates the combination
    pipeline = LatentSRPipeline(bundle, sessions, scheduler_config)
    options = SamplingOptions(steps=steps, seed=seed, batch_size=batch_size, consistency=consistency)
    total = data.shape[axis] * (data.shape[3] if data.ndim == 4 else 1)
    with tqdm(total=total, unit="slice", desc="super-resolving", disable=None) as bar:
        result = super_resolve_volume(data, volume.affine, pipeline, axis, options, progress=bar.update)
    description = f"medsr {medsr.__version__} x{bundle.scale} {bundle.name}"
    save_nifti(output, result.data, result.affine, volume, description=description, overwrite=overwrite)
    seconds = time.perf_counter() - started
    providers = ",".join(next(iter(sessions.values())).providers)
    click.echo(
        f"wrote {output}: {result.slices} slices along axis {axis}, {data.shape[:3]} -> {result.data.shape[:3]}, "
        f"{seconds:.1f} s ({seconds / max(result.slices, 1):.2f} s/slice), engine {engine} [{providers}], "
        f"{100 * result.clipped_fraction:.2f}% of input voxels clipped to the intensity window, "
        f"consistency residual median {np.median(result.residuals):.2e}"
    )


def main() -> None:
    run_command(infer)
