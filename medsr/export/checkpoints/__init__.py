"""Loaders for published weights: MedVAE ``.ckpt`` (LoRA merged), the SD VAE, and latent-sr UNet ``.ckpt`` files.

Every loader returns ``(model, LoadReport)``: an eval-mode diffusers model whose configuration was read off the
checkpoint's shapes, and the provenance (file name, sha256, detected configuration, ignored keys, merged LoRA
count, assumed fields) that the bundle manifest records. No loader unpickles code: safetensors, or
``torch.load(weights_only=True)``; anything else is a CheckpointError.

    >>> vae, report = load_medvae("vae_4x_3c_2D.ckpt", expected="medvae_4_3_2d")   # doctest: +SKIP
    >>> unet, report = load_latentsr_unet("epoch=99.ckpt")                           # doctest: +SKIP
"""

from medsr.export.checkpoints.common import LoadReport, check_state_dict, file_sha256, read_checkpoint
from medsr.export.checkpoints.compvis import (
    compvis_to_diffusers_key,
    convert_compvis_vae_state_dict,
    diffusers_to_compvis_key,
    merge_lora,
)
from medsr.export.checkpoints.unet import (
    UNET_ASSUMED_DEFAULTS,
    detect_unet_config,
    find_unet_prefix,
    load_latentsr_unet,
)
from medsr.export.checkpoints.vae import (
    MEDVAE_MODELS,
    SD_VAE_CONFIG,
    ConvertedVAE,
    convert_vae_state_dict,
    detect_vae_config,
    load_medvae,
    load_sd_vae,
)

__all__ = [
    "MEDVAE_MODELS",
    "SD_VAE_CONFIG",
    "UNET_ASSUMED_DEFAULTS",
    "ConvertedVAE",
    "LoadReport",
    "check_state_dict",
    "compvis_to_diffusers_key",
    "convert_compvis_vae_state_dict",
    "convert_vae_state_dict",
    "detect_unet_config",
    "detect_vae_config",
    "diffusers_to_compvis_key",
    "file_sha256",
    "find_unet_prefix",
    "load_latentsr_unet",
    "load_medvae",
    "load_sd_vae",
    "merge_lora",
    "read_checkpoint",
]
