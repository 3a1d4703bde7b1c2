"""The published MedVAE key lists (tests/data/*_state_dict_keys.txt): every key consumed, configurations as
published.

Full-size state dicts are built from meta tensors (names and shapes, no storage), so these tests allocate nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from compvis_reference import CompVisVAE
from diffusers import AutoencoderKL

from medsr.export.checkpoints import (
    MEDVAE_MODELS,
    check_state_dict,
    compvis_to_diffusers_key,
    convert_vae_state_dict,
    diffusers_to_compvis_key,
    merge_lora,
)

# Key and shape lists of the published MedVAE checkpoints (docs/sources.md, "MedVAE and SD-VAE checkpoints").
KEY_LISTS_DIR = Path(__file__).resolve().parent / "data"

# The table of MedVAE 2D models (docs/sources.md, "MedVAE and SD-VAE checkpoints"): (f, latent C, image C, block
# widths, LoRA rank).
PUBLISHED = {
    "medvae_4_1_2d": (4, 1, 1, (128, 256, 512), 0),
    "medvae_4_3_2d": (4, 3, 3, (128, 256, 512), 4),
    "medvae_8_1_2d": (8, 1, 1, (128, 256, 512, 512), 0),
    "medvae_8_4_2d": (8, 4, 3, (128, 256, 512, 512), 4),
}


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` from a ``name (d0, d1, ...)`` per line list; '#' lines are comments."""
    path = KEY_LISTS_DIR / f"{name}_state_dict_keys.txt"
    shapes = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            shapes[key] = tuple(int(size) for size in re.findall(r"\d+", shape))
    return shapes


def meta_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def reference_key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key list of a MedVAE model: the published file when there is one, else the CompVis oracle's (8_1)."""
    if name != "medvae_8_1_2d":
        return read_key_list(name)
    _, latent, image, widths, rank = PUBLISHED[name]
    with torch.device("meta"):
        model = CompVisVAE(ch_mult=tuple(w // 128 for w in widths), image_channels=image, z_channels=latent,
                           rank=rank)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("name", ["medvae_4_1_2d", "medvae_4_3_2d", "medvae_8_4_2d"])
def test_oracle_reproduces_published_key_list(name):
    """The CompVis oracle of the numerical tests has exactly the published names, shapes and order."""
    _, latent, image, widths, rank = PUBLISHED[name]
    with torch.device("meta"):
        model = CompVisVAE(ch_mult=tuple(w // 128 for w in widths), image_channels=image, z_channels=latent,
                           rank=rank)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(read_key_list(name).items())


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_published_key_is_consumed(name):
    """Conversion uses every key (LoRA merged, stage-2 head ignored) and fills the AutoencoderKL exactly."""
    shapes = reference_key_shapes(name)
    converted = convert_vae_state_dict(meta_state_dict(shapes))
    factor, latent, image, widths, rank = PUBLISHED[name]

    assert converted.ignored_keys == [key for key in shapes if key.startswith(("channel_ds.", "channel_proj."))]
    assert len(converted.ignored_keys) == 8
    assert converted.lora_rank == rank == MEDVAE_MODELS[name]["lora_rank"]
    assert converted.lora_merged == sum(key.endswith(".lora_down.weight") for key in shapes)
    config = converted.config
    assert (config["block_out_channels"], config["latent_channels"]) == (widths, latent)
    assert (config["in_channels"], config["out_channels"], config["layers_per_block"]) == (image, image, 2)
    assert config["mid_block_add_attention"] is True
    assert 2 ** (len(widths) - 1) == factor == MEDVAE_MODELS[name]["latent_factor"]
    assert {**config, "scaling_factor": 1.0} == MEDVAE_MODELS[name]["vae"]

    with torch.device("meta"):
        model = AutoencoderKL(**MEDVAE_MODELS[name]["vae"])
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, converted.state_dict, name)


@pytest.mark.parametrize("name", ["medvae_4_1_2d", "medvae_4_3_2d", "medvae_8_4_2d"])
def test_names_round_trip(name):
    """CompVis -> diffusers -> CompVis gives back every (LoRA-merged) stage-1 key, and the mapping is one-to-one."""
    merged = merge_lora(meta_state_dict(read_key_list(name)))
    stage1 = [key for key in merged if not key.startswith(("channel_ds.", "channel_proj."))]
    levels = len(PUBLISHED[name][3])
    diffusers_names = [compvis_to_diffusers_key(key, levels) for key in stage1]
    assert None not in diffusers_names and len(set(diffusers_names)) == len(stage1)
    assert [diffusers_to_compvis_key(key, levels) for key in diffusers_names] == stage1


def test_decoder_levels_are_mirrored():
    """docs/sources.md, "MedVAE and SD-VAE checkpoints": decoder.up.{i} -> decoder.up_blocks.{L-1-i}; encoder
    levels keep their index."""
    assert compvis_to_diffusers_key("decoder.up.0.block.2.nin_shortcut.weight", 4) == (
        "decoder.up_blocks.3.resnets.2.conv_shortcut.weight")
    assert compvis_to_diffusers_key("decoder.up.3.upsample.conv.bias", 4) == "decoder.up_blocks.0.upsamplers.0.conv.bias"
    assert compvis_to_diffusers_key("encoder.down.1.downsample.conv.weight", 4) == (
        "encoder.down_blocks.1.downsamplers.0.conv.weight")
    assert compvis_to_diffusers_key("encoder.mid.attn_1.proj_out.weight", 4) == (
        "encoder.mid_block.attentions.0.to_out.0.weight")
    assert compvis_to_diffusers_key("channel_proj.weight", 4) is None
