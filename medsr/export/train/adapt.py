"""``medsr-infer --through-plane --adapt``: fine-tune a through-plane bundle's denoiser on the volume at hand.

Self-supervision from the input alone: the measured in-plane planes (perpendicular to the slice axis, at in-plane
resolution) are HR, and their thick slices along one in-plane axis are LR, simulated with the acquisition's factor
s and slice profile (``thick_slices`` with FWHM = slice thickness / in-plane spacing: the acquisition's FWHM in
in-plane voxels). The crops are made in the geometry the model was trained with (medsr.data.pairs: the thick slices
along the crops' second axis, each plane under a random flip/rotation, so both in-plane axes serve) from planes
normalized with the window the engine fits on the volume (medsr.engine.volume.prepare_input), and encoded once by
the bundle's frozen VAE (medsr.export.train.denoiser.build_latent_cache).

The denoiser starts from the bundle's PyTorch reference weights (``torch/``) and trains on the bundle's own
objective (the manifest's scheduler; the loss and terminal fraction its recipe recorded) with AdamW and a cosine
learning-rate decay over the budget, for at most a number of steps or seconds. The crops are drawn from ``seed`` and step k's batch,
noise and timesteps from ``step_rng(seed, k)`` (medsr.export.train.loop), so a seed fixes the adapted weights for a
given step count. The adapted networks are exported as a validated bundle (medsr.export.onnx.export_bundle) for the
torch-free engine; its ``provenance.recipe_config.adapted`` says what it was adapted to and how.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsr.bundle import MANIFEST_NAME, Bundle, load_bundle, sha256_file
from medsr.bundle.manifest import thaw
from medsr.data.pairs import FOREGROUND_FRACTION, FOREGROUND_LEVEL, Slice
from medsr.degrade import ThickSlicePlanes
from medsr.engine.jobs import ADAPTED
from medsr.engine.volume import NetworkInput, ThroughPlanePlan
from medsr.errors import BundleError, InputError, MedsrError
from medsr.export.models import ConditionedDenoiser
from medsr.export.objective import preset_objective
from medsr.export.onnx import export_bundle
from medsr.export.presets import Preset
from medsr.export.reference import load_reference_models
from medsr.export.train.denoiser import DenoiserConfig, build_latent_cache, denoiser_loss
from medsr.export.train.loop import pick_device, step_rng

#: The ``provenance.recipe`` of an adapted bundle.
ADAPT_RECIPE = "medsr-infer --adapt"
#: The random stream of the loss before/after adaptation (fixed noise and timesteps, so the two compare), apart from
#: the crops' (build_latent_cache) and every step's (step_rng).
EVAL_STREAM = 2**32 - 3


@dataclass(frozen=True)
class AdaptConfig:
    """How long and how a bundle is adapted.

    Attributes:
        steps: at most this many optimizer steps (None: no step limit).
        seconds: steps start until this many seconds of fine-tuning have passed (None: no time limit); the crops'
            encoding before and the export after are not counted. At least one of the two limits is required.
        seed: the seed of the crops and of every step.
        lr: the peak AdamW learning rate, decayed by a cosine over the step or time budget (docs/through_plane.md
            has the measurement that chose it and the batch and pair counts).
        weight_decay: AdamW decoupled weight decay.
        grad_clip: max global gradient L2 norm; 0 disables clipping.
        batch_size: crops per step.
        pairs: HR/LR crop pairs drawn from the volume's planes and encoded once.
        crop: the largest HR crop side (pixels); the crop is the largest multiple of ``lr_multiple * s`` up to it
            that the planes hold (at least one such multiple).
        eval_pairs: the first this many pairs measure the loss before and after adaptation.
    """

    steps: int | None = None
    seconds: float | None = 150.0
    seed: int = 0
    lr: float = 6e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 16
    pairs: int = 1024
    crop: int = 64
    eval_pairs: int = 64

    def __post_init__(self):
        if self.steps is None and self.seconds is None:
            raise InputError("adaptation needs a step limit or a time limit")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"adaptation steps must be >= 1, got {self.steps}")
        if self.seconds is not None and not self.seconds > 0:
            raise InputError(f"adaptation seconds must be > 0, got {self.seconds}")


@dataclass(frozen=True)
class AdaptedModel:
    """The adapted networks (eval mode, CPU), the preset they export under, the objective they were trained on,
    and ``record``: what they were adapted to and how (JSON-able; the bundle's ``provenance.recipe_config.adapted``)."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    preset: Preset
    objective: DenoiserConfig
    record: dict


def bundle_preset(bundle: Bundle, scale: int) -> Preset:
    """The preset ``bundle`` exports under at factor ``scale``, rebuilt from its manifest and its PyTorch reference
    configs: that factor alone (of those the bundle serves, ``task.scales``), with the bundle's degradation at it
    (``Bundle.with_scale``)."""
    manifest = bundle.with_scale(scale).manifest
    reference = manifest.torch_reference
    if reference is None:
        raise BundleError(
            f"{bundle.root}: --adapt fine-tunes the bundle's PyTorch reference weights (torch/), and this bundle was "
            "exported without them"
        )
    task, intensity = manifest.task, manifest.task.intensity
    return Preset(
        name=manifest.name,
        description=manifest.description,
        scale=task.scale,
        image_channels=task.image_channels,
        vae=thaw(reference.vae.config),
        unet=thaw(reference.unet.config),
        scheduler=manifest.scheduler.to_dict(),
        latent_scaling_factor=manifest.vae.scaling_factor,
        latent_shift_factor=manifest.vae.shift_factor,
        lr_latent=manifest.vae.lr_latent,
        intensity={"method": intensity.method, "low": intensity.low, "high": intensity.high},
        degradation=task.degradation.to_dict(),
        consistency=task.consistency,
        conditioning=manifest.denoiser.conditioning,
        plane=task.plane,
    )


def bundle_objective(bundle: Bundle, pairs: int, crop: int) -> DenoiserConfig:
    """The denoiser objective ``bundle`` was trained with: the loss and terminal fraction of its recipe
    (``provenance.recipe_config.denoiser``, what medsr-train recipes and adapted bundles record), else
    DenoiserConfig's defaults; no contrast copies (the volume's own contrast is the one to fit). A bundle sampled in
    one trailing step is adapted at the noisiest time only (terminal fraction 1), the one time it is run at."""
    recipe = bundle.manifest.provenance.recipe_config or {}
    recorded = recipe.get("denoiser") or {}
    defaults = DenoiserConfig()
    terminal = recorded.get("terminal_fraction", defaults.terminal_fraction)
    if bundle.manifest.scheduler.default_steps == 1 and bundle.manifest.scheduler.timestep_spacing == "trailing":
        terminal = 1.0  # the 1-step sampler evaluates the model at the noisiest time only: adapt it there
    return DenoiserConfig(pairs=pairs, crop=crop, loss=recorded.get("loss", defaults.loss), terminal_fraction=terminal)


def adaptation_degradation(plan: ThroughPlanePlan) -> ThickSlicePlanes:
    """The thick slices simulated on the in-plane planes: factor ``plan.scale``, the plan's profile, FWHM = slice
    thickness / in-plane spacing (the acquisition's FWHM in in-plane voxels), along the planes' second axis."""
    return ThickSlicePlanes(plan.scale, profile=plan.profile, fwhm=plan.thickness / plan.in_plane)


def volume_planes(prepared: NetworkInput, axis: int) -> list[Slice]:
    """The measured planes perpendicular to the slice ``axis`` of every frame of ``prepared`` (n, H, W),
    normalized with its window and clipped to [-1, 1] as training slices are (medsr.data.pairs.source_slices): the
    foreground ones (medsr.data.pairs.FOREGROUND_LEVEL / FOREGROUND_FRACTION), or every plane when none is."""
    frames = prepared.data.shape[3] if prepared.data.ndim == 4 else 1
    # The modality only picks a default degradation, and the thick slices are always given.
    planes = [
        Slice(prepared.path.name, "mri", axis, index, plane)
        for frame in range(frames)
        for index, plane in enumerate(prepared.planes(axis, frame)[0])
    ]
    foreground = [s for s in planes if np.mean(s.image > FOREGROUND_LEVEL) >= FOREGROUND_FRACTION]
    return foreground or planes


def adaptation_crop(preset: Preset, planes: list[Slice], largest: int, path: Path) -> int:
    """The HR crop side: the largest multiple of ``Preset.crop_multiple()`` (what the latent cache takes) up to
    ``largest`` that the planes hold, at least one multiple; an InputError naming ``path`` when they are smaller."""
    multiple = preset.crop_multiple()
    side = min(planes[0].image.shape) // preset.scale * preset.scale
    crop = max(multiple, min(largest, side) // multiple * multiple)
    if side < crop:
        height, width = planes[0].image.shape
        raise InputError(
            f"{path}: in-plane planes of {height}x{width} pixels are smaller than the {crop}x{crop} crops --adapt "
            f"trains this model on (a multiple of {multiple} at x{preset.scale})"
        )
    return crop


def adapt_model(
    bundle: Bundle,
    prepared: NetworkInput,
    plan: ThroughPlanePlan,
    config: AdaptConfig,
    work_dir: Path,
    device: torch.device,
    disable: bool | None = False,
) -> AdaptedModel:
    """Fine-tune ``bundle``'s denoiser on ``prepared``'s own in-plane planes (module docstring) under ``plan``;
    the latent cache goes to ``work_dir``; ``disable``: tqdm's, for the bar of the steps (None: on a terminal
    only). Returns the adapted networks and their record."""
    from tqdm import tqdm

    preset = bundle_preset(bundle, plan.scale)
    planes = volume_planes(prepared, plan.axis)
    crop = adaptation_crop(preset, planes, config.crop, prepared.path)
    objective = bundle_objective(bundle, config.pairs, crop)
    degradation = adaptation_degradation(plan)
    scheduler = bundle.manifest.scheduler
    vae, unet = load_reference_models(bundle)
    vae.to(device).eval().requires_grad_(False)
    cache_preset = dataclasses.replace(preset, degradation=degradation.to_dict())
    hr, lr = (t.numpy() for t in build_latent_cache(work_dir, vae, cache_preset, planes, objective, config.seed))
    model = ConditionedDenoiser(unet, preset.conditioning).to(device).train()
    loss_before = _mean_loss(model, hr, lr, objective, scheduler, config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    step, started = 0, time.perf_counter()
    with tqdm(total=config.steps, desc="adapting", unit="step", disable=disable) as bar:
        while (progress := _progress(config, step, time.perf_counter() - started)) < 1.0:
            for group in optimizer.param_groups:  # cosine decay over the step or time budget, whichever runs out first
                group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
            rng, _ = step_rng(config.seed, step)
            index = rng.integers(0, len(hr), size=config.batch_size)
            loss = denoiser_loss(model, hr[index], lr[index], scheduler, objective, rng, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise MedsrError(f"{prepared.path}: the adaptation loss became {value} at step {step}")
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
    seconds = time.perf_counter() - started
    loss_after = _mean_loss(model, hr, lr, objective, scheduler, config, device)
    record = {
        "input": prepared.path.name,
        "bundle": {
            "name": bundle.name,
            "path": str(bundle.root),
            "manifest_sha256": sha256_file(bundle.root / MANIFEST_NAME),
        },
        "steps": step,
        "seconds": round(seconds, 3),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "loss": objective.loss,
        "terminal_fraction": objective.terminal_fraction,
        "degradation": degradation.to_dict(),
        "slice_axis": plan.axis,
        "planes": len(planes),
        "pairs": objective.pairs,
        "crop": crop,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "step_limit": config.steps,
        "time_limit_s": config.seconds,
    }
    return AdaptedModel(vae.cpu().eval(), unet.cpu().eval(), preset, objective, record)


def _progress(config: AdaptConfig, step: int, elapsed: float) -> float:
    """How much of the adaptation budget is spent, in [0, 1]: the larger of the step and time fractions."""
    fractions = [step / config.steps if config.steps else 0.0, elapsed / config.seconds if config.seconds else 0.0]
    return min(1.0, max(fractions))


@torch.no_grad()
def _mean_loss(model, hr, lr, objective: DenoiserConfig, scheduler, config: AdaptConfig, device) -> float:
    """The objective's loss over the first ``config.eval_pairs`` cached pairs, in batches of ``config.batch_size``,
    with the fixed noise and timesteps of :data:`EVAL_STREAM`."""
    rng = np.random.default_rng([config.seed, EVAL_STREAM])
    count = min(config.eval_pairs, len(hr))
    total = 0.0
    for start in range(0, count, config.batch_size):
        stop = min(start + config.batch_size, count)
        loss = denoiser_loss(model, hr[start:stop], lr[start:stop], scheduler, objective, rng, device)
        total += float(loss) * (stop - start)
    return total / count


def export_adapted(adapted: AdaptedModel, bundle: Bundle, out_dir: Path, overwrite: bool = False) -> Path:
    """Export ``adapted`` as a validated bundle ``out_dir`` (assembled in a sibling directory, then renamed).

    Its provenance: the starting weights' record and objective (``bundle``'s), recipe :data:`ADAPT_RECIPE`, the
    input as its training data, and a ``recipe_config`` with the objective trained on (``denoiser``, so adapting it
    again keeps it) and the adaptation record (``adapted``).
    """
    base = bundle.manifest.provenance
    objective = adapted.objective
    provenance = {
        "weights": base.weights.to_dict(),
        "objective": thaw(base.objective) if base.objective is not None else preset_objective(adapted.preset),
        "recipe": ADAPT_RECIPE,
        "training_data": {"adapt": [adapted.record["input"]]},
        "recipe_config": {
            "denoiser": {"loss": objective.loss, "terminal_fraction": objective.terminal_fraction},
            ADAPTED: adapted.record,
        },
    }
    return export_bundle(adapted.vae, adapted.unet, adapted.preset, out_dir, provenance, overwrite=overwrite)


@contextmanager
def adapted_bundle(
    bundle: Bundle,
    prepared: NetworkInput,
    plan: ThroughPlanePlan,
    config: AdaptConfig,
    device: str = "cpu",
    threads: int | None = None,
    save: Path | None = None,
    overwrite: bool = False,
    disable: bool | None = False,
) -> Iterator[Bundle]:
    """``bundle`` adapted to ``prepared`` (:func:`adapt_model`), exported and loaded, for the ``with`` block: in a
    temporary directory removed afterwards, or in ``save`` (kept; replaced only with ``overwrite``). ``device``:
    where PyTorch trains (cpu or cuda); ``threads``: its CPU threads (None: torch's default); ``disable``: tqdm's, for
    the bar of the steps."""
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="medsr-adapt-") as work:
        work = Path(work)
        adapted = adapt_model(bundle, prepared, plan, config, work / "latents", pick_device(device), disable)
        yield load_bundle(export_adapted(adapted, bundle, save or work / "bundle", overwrite))
