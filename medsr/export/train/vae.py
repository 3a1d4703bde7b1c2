"""``medsr-train vae``: train (or fine-tune) the preset's KL autoencoder on HR crops.

Loss = L1(decode(sample of q(z|x)), x) + kl_weight * KL(q(z|x) || N(0, I)) (mean over pixels, resp. latent
elements), as the LDM autoencoders minus the adversarial and perceptual terms (no offline LPIPS weights here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsr.data.pairs import Slice, random_crops
from medsr.errors import ShapeError
from medsr.export.models import build_vae
from medsr.export.presets import Preset
from medsr.export.train.loop import LoopConfig, train
from medsr.export.train.weights import load_prefixed, save_prefixed

VAE_WEIGHTS = "vae.safetensors"


@dataclass(frozen=True)
class VaeConfig:
    """The VAE objective: HR ``crop`` size (pixels, a multiple of the VAE factor) and the KL weight."""

    crop: int = 64
    kl_weight: float = 1e-6


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """(loss, {"l1", "kl"}) for ``images`` (B, C, H, W) in [-1, 1]; the posterior sample uses ``generator``."""
    posterior = vae.encode(images).latent_dist
    latent = posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype
    ).to(posterior.mean.device)
    recon = vae.decode(latent).sample
    l1 = (recon.float() - images.float()).abs().mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).float().mean()
    return l1 + kl_weight * kl, {"l1": float(l1.detach()), "kl": float(kl.detach())}


def train_vae(
    run_dir: Path,
    preset: Preset,
    slices: list[Slice],
    loop: LoopConfig,
    objective: VaeConfig,
    device: torch.device,
    init: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    data_note: str = "",
) -> Path:
    """Train the preset's VAE on random crops of ``slices``; write ``run_dir/vae.safetensors`` (keys ``vae.*``).

    ``init``: a safetensors file with ``vae.*`` keys to fine-tune from (else random init from ``loop.seed``).
    """
    if objective.crop % preset.vae_factor:
        raise ShapeError(f"VAE crop {objective.crop} must be a multiple of the VAE factor {preset.vae_factor}")
    torch.manual_seed(loop.seed)
    vae = build_vae(preset.vae)
    if init is not None:
        vae.load_state_dict(load_prefixed(init, "vae."))
    vae.to(device).train()
    channels = preset.image_channels

    def loss_fn(step: int, rng: np.random.Generator, generator: torch.Generator):
        crops = random_crops(slices, loop.batch_size, objective.crop, rng)
        images = torch.from_numpy(crops)[:, None].repeat(1, channels, 1, 1).to(device)
        return vae_loss(vae, images, objective.kl_weight, generator)

    extra = {
        "task": "vae",
        "preset": preset.name,
        "objective": {"crop": objective.crop, "kl_weight": objective.kl_weight},
        "init": None if init is None else str(init),
        "data": data_note,
    }
    weights = train(run_dir, vae, loss_fn, loop, extra, resume=resume, progress=progress)
    out = run_dir / VAE_WEIGHTS
    save_prefixed(out, {"vae.": weights})
    return out
