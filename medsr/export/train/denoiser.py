"""``medsr-train denoiser``: train the preset's conditioned UNet on latents of a frozen VAE.

The VAE encodes a fixed set of aligned HR/LR crops once (posterior means, scaled as the manifest says:
z = (mean - shift) * scale; the LR crop at its own size, as the engine encodes it) and the cache is stored in the
run directory, so resuming does not re-encode. Each step then draws a batch, noise and timesteps from the step's
seeded generators and builds x_t and the target with the engine's own tables (medsr.engine.schedulers.add_noise
and training_target), so training and sampling cannot disagree on the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsr.bundle.manifest import THROUGH_PLANE
from medsr.data.augment import with_contrast_copies
from medsr.data.pairs import Slice, random_crop_pairs
from medsr.degrade import degradation_from_dict
from medsr.engine.schedulers import SchedulerConfig, add_noise, training_target
from medsr.errors import InputError, ShapeError
from medsr.export.models import ConditionedDenoiser, VaeEncoderGraph, build_unet, build_vae
from medsr.export.objective import scheduler_metadata
from medsr.export.presets import Preset
from medsr.export.train.loop import LoopConfig, train
from medsr.export.train.weights import load_prefixed, save_prefixed
from medsr.io.atomic import atomic_path

LATENT_CACHE = "latents.safetensors"
WEIGHTS = "weights.safetensors"
LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class DenoiserConfig:
    """The denoiser objective.

    Attributes:
        pairs: number of cached HR/LR crop pairs (drawn once from the data with the loop's seed).
        crop: HR crop size in pixels, a multiple of the preset's ``crop_multiple()``.
        loss: ``"l1"`` (the paper's) or ``"l2"`` between the model output and the target.
        terminal_fraction: the fraction of each batch trained at the noisiest time (pure noise in, x0 from the
            LR latent alone), where a 1-step trailing sampler evaluates the model; the rest is uniform in time.
        contrast_copies: remapped copies of every training slice added before the crops are drawn, each through its
            own random intensity curve (medsr.data.augment): other contrasts than the training subject's.
        prediction_type, beta_schedule: override the preset's scheduler entries (None: keep the preset's). The
            weights record the scheduler trained with; medsr-export refuses them under a preset that disagrees,
            or exports them with it (``--objective-from-weights``).
    """

    pairs: int = 2048
    crop: int = 64
    loss: str = "l1"
    terminal_fraction: float = 0.0
    contrast_copies: int = 0
    prediction_type: str | None = None
    beta_schedule: str | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.terminal_fraction <= 1.0:
            raise InputError(f"terminal_fraction must be in [0, 1], got {self.terminal_fraction}")
        if self.contrast_copies < 0:
            raise InputError(f"contrast_copies must be >= 0, got {self.contrast_copies}")

    def scheduler(self, preset: Preset) -> SchedulerConfig:
        """The preset's SchedulerConfig with this objective's overrides."""
        entries = dict(preset.scheduler)
        if self.prediction_type is not None:
            entries["prediction_type"] = self.prediction_type
        if self.beta_schedule is not None:
            entries["beta_schedule"] = self.beta_schedule
        return SchedulerConfig.from_dict(entries)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, preset: Preset, chunk: int = 64) -> torch.Tensor:
    """Scaled posterior means (N, C_lat, H/f, W/f) of images (N, H, W) in [-1, 1], encoded ``chunk`` at a time."""
    encoder = VaeEncoderGraph(vae).eval()
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), chunk):
        batch = torch.from_numpy(images[start : start + chunk])[:, None].repeat(1, preset.image_channels, 1, 1)
        mean, _ = encoder(batch.to(device))
        out.append(((mean - preset.latent_shift_factor) * preset.latent_scaling_factor).float().cpu())
    return torch.cat(out)


def build_latent_cache(run_dir: Path, vae, preset: Preset, slices: list[Slice], objective: DenoiserConfig, seed: int):
    """(hr latents, conditioning latents), encoded once and stored in ``run_dir/latents.safetensors`` (reused if
    present). The conditioning latent is the LR crop's, or the HR-size crop of the whole LR slice's upsampling under
    the preset's ``upsampled_latent_concat`` conditioning (medsr.bundle.conditioning), as the engine encodes it.
    A through-plane preset's LR crops are its thick slices along the crops' second axis (1 x s).

    A preset trained for several factors (``Preset.scales``) gets ``pairs / len(scales)`` crops per factor, each
    of the smallest size >= ``crop`` that is a multiple of ``Preset.crop_multiple(s)``, and the cache holds one list
    entry per factor: :func:`crop_batch` cuts every training sample to ``crop`` from them.
    """
    from safetensors.torch import load_file, save_file

    path = run_dir / LATENT_CACHE
    scales = preset.trained_scales
    keys = [("hr", "lr")] if len(scales) == 1 else [(f"hr_x{s}", f"lr_x{s}") for s in scales]
    if path.is_file():
        cache = load_file(str(path))
        return _cache_entries(cache, keys)
    rng = np.random.default_rng([seed, 2**32 - 1])  # not a step's stream
    slices = with_contrast_copies(slices, objective.contrast_copies, np.random.default_rng([seed, 2**32 - 2]))
    conditioning = preset.conditioning
    if len(scales) > 1 and conditioning.upsampler is None:
        raise InputError(
            f"preset {preset.name}: training factors {scales} at once needs the upsampled_latent_concat conditioning "
            "(conditioning latents on the HR grid, the same size at every factor)"
        )
    through_plane = preset.plane == THROUGH_PLANE  # the preset's thick slices along the crops' second axis
    cache = {}
    for scale, (hr_key, lr_key) in zip(scales, keys):
        multiple = preset.crop_multiple(scale)
        crop = objective.crop if len(scales) == 1 else -(-objective.crop // multiple) * multiple
        if crop % multiple:
            raise ShapeError(f"denoiser crop {crop} must be a multiple of {multiple} (Preset.crop_multiple)")
        pairs = random_crop_pairs(
            slices,
            objective.pairs // len(scales),
            crop,
            scale,
            rng,
            upsampler=conditioning.upsampler,
            degradation=degradation_from_dict(preset.degradation_at(scale)) if through_plane else None,
        )
        condition = pairs.lr if conditioning.upsampler is None else pairs.upsampled
        cache[hr_key] = encode_latents(vae, pairs.hr, preset)
        cache[lr_key] = encode_latents(vae, condition, preset)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        save_file(cache, str(tmp))
    return _cache_entries(cache, keys)


def _cache_entries(cache: dict, keys: list[tuple[str, str]]):
    """(hr, lr) tensors of a single-factor cache, or (hr list, lr list) over the factors of a multi-factor one."""
    if len(keys) == 1:
        return cache["hr"], cache["lr"]
    return [cache[hr] for hr, _ in keys], [cache[lr] for _, lr in keys]


def crop_batch(
    hr: list[np.ndarray], lr: list[np.ndarray], size: int, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A batch of ``size`` x ``size`` latent windows (the crop / the VAE factor) of a multi-factor cache: each sample
    picks a factor uniformly, a pair of it, and a window at a random offset, the same for its HR and conditioning
    latents (both on the HR latent grid)."""
    factors = rng.integers(0, len(hr), size=batch)
    x0 = np.empty((batch, hr[0].shape[1], size, size), np.float32)
    z_lr = np.empty((batch, lr[0].shape[1], size, size), np.float32)
    for b, k in enumerate(factors):
        n = int(rng.integers(len(hr[k])))
        i = int(rng.integers(hr[k].shape[2] - size + 1))
        j = int(rng.integers(hr[k].shape[3] - size + 1))
        x0[b] = hr[k][n, :, i : i + size, j : j + size]
        z_lr[b] = lr[k][n, :, i : i + size, j : j + size]
    return x0, z_lr


def sample_timesteps(
    config: SchedulerConfig, batch: int, rng: np.random.Generator, terminal_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(t for add_noise / training_target, the timestep the model receives), uniform over the training range,
    the first round(terminal_fraction * batch) of them at the noisiest time instead.

    Discrete schedules: integers in [0, T) (noisiest: T - 1, or 0 with a reversed table). Flow, diffusers
    convention: sigma * T with sigma in (0, 1] (noisiest: T). Flow, the paper's convention: the data fraction t in
    [0, 1) (noisiest: 0), the model receiving int(t * (T - 1)).
    """
    T = config.num_train_timesteps
    terminal = round(terminal_fraction * batch)
    if config.algorithm != "flow_euler":
        t = rng.integers(0, T, size=batch)
        t[:terminal] = 0 if config.reversed_table else T - 1
        return t, t.astype(np.float32)
    if config.flow_convention == "latentsr":
        t = rng.random(batch)
        t[:terminal] = 0.0
        return t, np.floor(t * (T - 1)).astype(np.float32)
    sigma = 1.0 - rng.random(batch)
    sigma[:terminal] = 1.0
    return sigma * T, (sigma * T).astype(np.float32)


def denoiser_loss(model, x0, z_lr, config: SchedulerConfig, objective: DenoiserConfig, rng, device) -> torch.Tensor:
    """The loss of one batch: x0 (B, C, h, w) and z_lr latents as NumPy float32 arrays."""
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t, timestep = sample_timesteps(config, x0.shape[0], rng, objective.terminal_fraction)
    x_t = add_noise(x0, noise, t, config)
    target = torch.from_numpy(training_target(x0, noise, t, config)).to(device)
    output = model(
        torch.from_numpy(x_t).to(device), torch.from_numpy(z_lr).to(device), torch.from_numpy(timestep).to(device)
    )
    diff = output.float() - target
    return diff.abs().mean() if objective.loss == "l1" else diff.pow(2).mean()


def train_denoiser(
    run_dir: Path,
    preset: Preset,
    vae_weights: Path,
    slices: list[Slice],
    loop: LoopConfig,
    objective: DenoiserConfig,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    data_note: str = "",
) -> Path:
    """Train the denoiser on cached latents of the frozen VAE in ``vae_weights``; write ``run_dir/weights.safetensors``
    with ``vae.*`` (unchanged) and ``unet.*`` (EMA) keys, the training scheduler in its header
    (medsr.export.objective): the file ``medsr-export --weights`` takes."""
    scheduler = objective.scheduler(preset)
    vae_state = load_prefixed(vae_weights, "vae.")
    vae = build_vae(preset.vae)
    vae.load_state_dict(vae_state)
    vae.to(device).eval().requires_grad_(False)
    hr_latents, lr_latents = build_latent_cache(run_dir, vae, preset, slices, objective, loop.seed)
    torch.manual_seed(loop.seed)
    unet = build_unet(preset.unet)
    model = ConditionedDenoiser(unet, preset.conditioning).to(device).train()
    if isinstance(hr_latents, list):  # one entry per trained factor, windows cut per sample
        hr_np, lr_np = [t.numpy() for t in hr_latents], [t.numpy() for t in lr_latents]

        def draw(rng: np.random.Generator):
            return crop_batch(hr_np, lr_np, objective.crop // preset.vae_factor, loop.batch_size, rng)

    else:
        hr_np, lr_np = hr_latents.numpy(), lr_latents.numpy()

        def draw(rng: np.random.Generator):
            index = rng.integers(0, len(hr_np), size=loop.batch_size)
            return hr_np[index], lr_np[index]

    def loss_fn(step: int, rng: np.random.Generator, generator: torch.Generator):
        x0, z_lr = draw(rng)
        return denoiser_loss(model, x0, z_lr, scheduler, objective, rng, device), {}

    extra = {
        "task": "denoiser",
        "preset": preset.name,
        "objective": {
            "pairs": objective.pairs,
            "crop": objective.crop,
            "loss": objective.loss,
            "terminal_fraction": objective.terminal_fraction,
            "contrast_copies": objective.contrast_copies,
            "scheduler": scheduler.to_dict(),
        },
        "vae": str(vae_weights),
        "data": data_note,
    }
    weights = train(run_dir, model, loss_fn, loop, extra, resume=resume, progress=progress)
    unet_state = {key[len("unet.") :]: value for key, value in weights.items()}
    out = run_dir / WEIGHTS
    save_prefixed(out, {"vae.": vae_state, "unet.": unet_state}, metadata=scheduler_metadata(scheduler))
    return out
