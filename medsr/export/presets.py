"""Named model configurations: the architecture, latent convention, schedule and task of a model family.

A preset is everything needed to build the PyTorch networks and to write a bundle manifest except the weights.
``tiny`` exists for tests (exports and runs in seconds on a CPU); the paper's systems and the bundled default model
are added by the issues that bring their weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from medsr.bundle.conditioning import PAPER, UPSAMPLED, Conditioning
from medsr.errors import InputError


@dataclass(frozen=True)
class Preset:
    """One model family.

    Attributes:
        name: preset name, as ``medsr-export --preset NAME`` takes it.
        description: one line for ``--help`` and the manifest.
        scale: in-plane super-resolution factor s (LR pixel i <-> HR pixel centre s*i + (s-1)/2).
        image_channels: channels the VAE takes; grayscale images are replicated to this many and averaged back.
        vae: diffusers AutoencoderKL keyword arguments.
        unet: diffusers UNet2DModel keyword arguments (in_channels = 2 * latent channels: noisy HR latent + LR latent).
        scheduler: medsr.engine.schedulers.SchedulerConfig fields (prediction type, schedule, sampler, steps).
        latent_scaling_factor, latent_shift_factor: z = (posterior latent - shift) * scale, as diffusers does.
        lr_latent: "mean" (deterministic) or "sample" (the paper's ``posterior.sample()``, seeded).
        intensity: normalization of input intensities to [-1, 1] (robust percentiles of the volume).
        degradation: the operator that made LR from HR in training (medsr.degrade), or None when unknown.
        consistency: the engine's default data-consistency mode ("none", "kspace", "backproject").
        conditioning: how the denoiser sees the LR slice (medsr.bundle.conditioning; default the paper's).
        vae_checkpoint: which published VAE ``--vae-weights`` holds: a medsr.export.checkpoints.MEDVAE_MODELS name,
            "sd-vae", or None (medsr's own safetensors via ``--weights``).
    """

    name: str
    description: str
    scale: int
    image_channels: int
    vae: dict
    unet: dict
    scheduler: dict
    latent_scaling_factor: float = 1.0
    latent_shift_factor: float = 0.0
    lr_latent: str = "mean"
    intensity: dict = field(default_factory=lambda: {"method": "percentile", "low": 0.5, "high": 99.5})
    degradation: dict | None = None
    consistency: str = "none"
    conditioning: Conditioning = PAPER
    vae_checkpoint: str | None = None

    @property
    def vae_factor(self) -> int:
        """Spatial downsampling factor f of the VAE (2 per level after the first)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae["latent_channels"]

    @property
    def lr_multiple(self) -> int:
        """LR sizes must be multiples of this: the LR latent is LR/f and the HR latent s*LR/f must pass the UNet's
        2**(levels-1) downsampling, so m = f * d / gcd(s, d) with d = 2**(UNet levels - 1)."""
        d = 2 ** (len(self.unet["block_out_channels"]) - 1)
        return self.vae_factor * d // math.gcd(self.scale, d)


def _grayscale_vae(block_out_channels: tuple[int, ...], latent_channels: int, norm_num_groups: int) -> dict:
    """AutoencoderKL kwargs of medsr's small grayscale VAEs: one ResNet layer per level, no mid-block attention."""
    levels = len(block_out_channels)
    return {
        "in_channels": 1,
        "out_channels": 1,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": block_out_channels,
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "mid_block_add_attention": False,
    }


def _attention_free_unet(
    block_out_channels: tuple[int, ...], latent_channels: int, norm_num_groups: int, **extra
) -> dict:
    """UNet2DModel kwargs without self-attention (linear cost in H*W) on [noisy latent, LR latent]."""
    levels = len(block_out_channels)
    return {
        "in_channels": 2 * latent_channels,
        "out_channels": latent_channels,
        "block_out_channels": block_out_channels,
        "down_block_types": ("DownBlock2D",) * levels,
        "up_block_types": ("UpBlock2D",) * levels,
        "add_attention": False,
        "layers_per_block": 1,
        "norm_num_groups": norm_num_groups,
        **extra,
    }


def _x0_ddim(default_steps: int) -> dict:
    """x0 prediction on the capped cosine table, sampled by DDIM with trailing spacing."""
    return {
        "algorithm": "ddim",
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "sample",
        "timestep_spacing": "trailing",
        "default_steps": default_steps,
    }


def _tiny() -> Preset:
    latent = 4
    return Preset(
        name="tiny",
        description="Tiny model for tests: f=4 VAE (8,16,16), 2-level UNet (16,32), no attention, x4, grayscale.",
        scale=4,
        image_channels=1,
        vae=_grayscale_vae((8, 16, 16), latent, norm_num_groups=8),
        unet=_attention_free_unet((16, 32), latent, norm_num_groups=8, attention_head_dim=8),
        scheduler=_x0_ddim(default_steps=4),
    )


def _tiny_attention() -> Preset:
    """``tiny`` with self-attention in the VAE mid block and the UNet's second level: exercises attention export.
    Attention is quadratic in latent H*W, so this one is for export checks on small inputs only."""
    tiny = _tiny()
    vae = {**tiny.vae, "mid_block_add_attention": True}
    unet = {
        **tiny.unet,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "add_attention": True,
    }
    description = "Tiny model with attention (VAE mid block, UNet level 2 and mid block), for export tests."
    return replace(tiny, name="tiny-attention", description=description, vae=vae, unet=unet)


def _default() -> Preset:
    """The bundled default model (docs/default_model.md): x4 grayscale MRI, k-space LR, trained on CPU.

    f=1: the "latent" is 4 learned channels per pixel, so the autoencoder is not the limit (REFERENCE.md section 7
    measured a 1M-parameter f=4 VAE at only 24.1 dB; at f=2 and f=4 the same recipe's denoiser fell 10 and 7 dB
    below its autoencoder, docs/default_model.md). The denoiser is conditioned on the latent of the zero-filled LR
    (the k-space pseudo-inverse, computed by the engine at the HR size) and predicts x0 as that latent plus a
    correction, so it only learns what zero-filling lacks. No self-attention anywhere (quadratic in H*W). An x0
    model sampled by DDIM in 1 trailing step is in effect a regressor; k-space data consistency is applied after
    decoding.
    """
    latent = 4
    return Preset(
        name="default",
        description="Default model: x4 MRI (k-space LR), f=1 VAE (16), 4 latents, UNet (32,64,128), x0 over zero-fill.",
        scale=4,
        image_channels=1,
        vae=_grayscale_vae((16,), latent, norm_num_groups=8),
        unet=_attention_free_unet((32, 64, 128), latent, norm_num_groups=16),
        scheduler=_x0_ddim(default_steps=1),
        degradation={"name": "kspace", "scale": 4},
        consistency="kspace",
        conditioning=Conditioning(UPSAMPLED, "zerofill", residual=True),
    )


def _all_presets() -> tuple[Preset, ...]:
    from medsr.export.paper_presets import paper_presets  # imports the checkpoint loaders, which need Preset

    return (_tiny(), _tiny_attention(), _default(), *paper_presets())


PRESETS: dict[str, Preset] = {preset.name: preset for preset in _all_presets()}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an InputError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
