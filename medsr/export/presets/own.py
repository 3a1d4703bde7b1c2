"""medsr's own presets: ``tiny``, ``tiny-attention`` and ``tiny-through-plane`` for tests (export and run in seconds
on a CPU) and ``default``, the bundled default model (docs/default_model.md)."""

from __future__ import annotations

from dataclasses import replace

from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.bundle.manifest import THROUGH_PLANE
from medsr.export.presets.base import Preset


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

    f=1: the "latent" is 4 learned channels per pixel, so the autoencoder is not the limit (a 1M-parameter f=4
    VAE measured only 24.1 dB, docs/sources.md, "Degradations and fair baselines"; at f=2 and f=4 the same
    recipe's denoiser fell 10 and 7 dB below its autoencoder, docs/default_model.md). The denoiser is conditioned
    on the latent of the zero-filled LR (the k-space pseudo-inverse, computed by the engine at the HR size) and
    predicts x0 as that latent plus a correction, so it only learns what zero-filling lacks. No self-attention
    anywhere (quadratic in H*W). An x0 model sampled by DDIM in 1 trailing step is in effect a regressor; k-space
    data consistency is applied after decoding.
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


def _tiny_through_plane() -> Preset:
    """``tiny`` as a through-plane model for tests: 1 x 4 on planes containing the slice axis (the second plane
    axis), Gaussian thick slices of FWHM 4 HR voxels (contiguous), exact projection as data consistency."""
    return replace(
        _tiny(),
        name="tiny-through-plane",
        description="Tiny through-plane model for tests: 1x4 along the slice axis, Gaussian slices, tiny's networks.",
        degradation={"name": "thick_slices", "scale": 4, "profile": "gaussian", "fwhm": 4.0},
        consistency="project",
        plane=THROUGH_PLANE,
    )


def _through_plane() -> Preset:
    """The bundled through-plane model (docs/through_plane_model.md): thick-slice MRI made isotropic, x2 to x6.

    One network for every factor: it sees the cubic B-spline upsampling of the thick slices along the slice axis
    (computed by the engine at the HR size, so the factor only changes its input's blur) and predicts x0 as that
    latent plus a correction. f=1 VAE of 8 channels; a 4-level UNet (16, 32, 64, 128): 8x downsampling gives the
    receptive field the slice axis needs at x6 while keeping the cost per pixel small (both orientations of every
    plane of a volume are run). Gaussian slices of FWHM = the slice spacing (contiguous) in training; exact
    projection onto the measured slices after decoding. 1 trailing DDIM step: in effect a regressor.
    """
    latent = 4
    return Preset(
        name="through-plane",
        description="Through-plane model: thick-slice MRI x2-x6 along the slice axis, f=1 VAE (8), UNet (16..128).",
        scale=4,
        image_channels=1,
        vae=_grayscale_vae((8,), latent, norm_num_groups=4),
        unet=_attention_free_unet((16, 32, 64, 128), latent, norm_num_groups=8),
        scheduler=_x0_ddim(default_steps=1),
        degradation={"name": "thick_slices", "scale": 4, "profile": "gaussian", "fwhm": 4.0},
        consistency="project",
        conditioning=Conditioning(UPSAMPLED, "bspline", residual=True),
        plane=THROUGH_PLANE,
        scales=(2, 3, 4, 5, 6),
    )


def own_presets() -> tuple[Preset, ...]:
    """``tiny``, ``tiny-attention``, ``tiny-through-plane``, ``default`` and ``through-plane``."""
    return (_tiny(), _tiny_attention(), _tiny_through_plane(), _default(), _through_plane())
