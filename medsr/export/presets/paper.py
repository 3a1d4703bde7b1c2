"""The systems of arXiv 2604.12152 (github.com/sebasmos/latent-sr) as presets, with their published weights.

Both systems: x4, HR 256 x 256, grayscale replicated to the VAE's channels, [-1, 1] (the paper's 8-bit images span
the full range: min-max window), raw latents (no 0.18215 factor), the LR latent drawn with ``posterior.sample()``,
a UNet2DModel of base 128 with channel_mult (1, 2, 4, 4) (about 101M parameters) and self-attention only at latent
resolution 16 plus the mid block, x0 prediction with the paper's reversed cosine table and its own sampler from
0.5 N(0, I) over the code's default T = 1000 consecutive steps (docs/sources.md, "The method"). LR was made with PIL
LANCZOS; no data consistency. The MedVAE 8x4, 4x1 and 8x1 variants are the paper's capacity controls.
"""

from __future__ import annotations

from medsr.export.checkpoints import MEDVAE_MODELS, SD_VAE_CONFIG
from medsr.export.presets.base import Preset

HR_SIZE = 256
UNET_BASE, UNET_CHANNEL_MULT, UNET_ATTENTION_RESOLUTIONS = 128, (1, 2, 4, 4), (16,)

PAPER_SCHEDULER = {
    "algorithm": "latentsr",
    "num_train_timesteps": 1000,
    "beta_schedule": "cosine",
    "prediction_type": "sample",
    "reversed_table": True,
    "init_noise_sigma": 0.5,
    "default_steps": 1000,
}


def paper_unet(latent_channels: int, hr_latent_size: int) -> dict:
    """UNet2DModel kwargs of the paper: attention blocks where the latent resolution is in (16,), as its code picks
    them walking down from the HR latent size and back up."""
    levels = len(UNET_CHANNEL_MULT)
    resolutions = [max(hr_latent_size // 2**level, 1) for level in range(levels)]
    down = tuple("AttnDownBlock2D" if r in UNET_ATTENTION_RESOLUTIONS else "DownBlock2D" for r in resolutions)
    up = tuple("AttnUpBlock2D" if r in UNET_ATTENTION_RESOLUTIONS else "UpBlock2D" for r in reversed(resolutions))
    return {
        "in_channels": 2 * latent_channels,
        "out_channels": latent_channels,
        "block_out_channels": tuple(UNET_BASE * mult for mult in UNET_CHANNEL_MULT),
        "layers_per_block": 2,
        "down_block_types": down,
        "up_block_types": up,
    }


def _paper_preset(name: str, vae: dict, vae_checkpoint: str, description: str) -> Preset:
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return Preset(
        name=name,
        description=description,
        scale=4,
        image_channels=vae["in_channels"],
        vae=vae,
        unet=paper_unet(vae["latent_channels"], HR_SIZE // factor),
        scheduler=dict(PAPER_SCHEDULER),
        lr_latent="sample",
        intensity={"method": "percentile", "low": 0.0, "high": 100.0},
        degradation={"name": "lanczos", "scale": 4},
        vae_checkpoint=vae_checkpoint,
    )


def paper_presets() -> tuple[Preset, ...]:
    """``latentsr-medvae-4x3`` and ``latentsr-sdvae-ftema`` (the paper's two systems) and the MedVAE variants."""
    presets = [
        _paper_preset(
            "latentsr-sdvae-ftema",
            SD_VAE_CONFIG,
            "sd-vae",
            "arXiv 2604.12152 with stabilityai/sd-vae-ft-ema (f=8, 4 latents): x4, 256, x0, its own sampler.",
        )
    ]
    medvae_tags = (("medvae_4_3_2d", "4x3"), ("medvae_8_4_2d", "8x4"), ("medvae_4_1_2d", "4x1"), ("medvae_8_1_2d", "8x1"))
    for model, tag in medvae_tags:
        spec = MEDVAE_MODELS[model]
        description = (
            f"arXiv 2604.12152 with MedVAE {model} (f={spec['latent_factor']}, "
            f"{spec['vae']['latent_channels']} latents): x4, 256, x0, its own sampler."
        )
        presets.append(_paper_preset(f"latentsr-medvae-{tag}", spec["vae"], model, description))
    return tuple(presets)
