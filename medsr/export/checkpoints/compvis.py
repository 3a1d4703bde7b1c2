"""CompVis LDM autoencoder weights -> diffusers AutoencoderKL weights: LoRA merge and key renaming.

Pure functions on state dicts (they also work on meta tensors); the loaders in ``vae.py`` build on them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from medsr.errors import CheckpointError
from medsr.export.checkpoints.common import StateDict, listing

# ---------------------------------------------------------------------------------------------------------------
# LoRA


def merge_lora(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Fold MedVAE's LoRA pairs into their convolutions: exactly the same function, plain CompVis names.

    MedVAE wraps each conv X of a ResnetBlock/AttnBlock as ``X.conv`` (weight (O, I, k, k), bias (O,)),
    ``X.lora_down`` (r, I, k, k; same stride and padding as X.conv) and ``X.lora_up`` (O, r, 1, 1), and computes
    ``conv(x) + lora_up(lora_down(x))`` (scale 1, dropout off in eval). Both paths are linear in x with the same
    sampling grid, so ``W' = W + einsum('or,rikl->oikl', up[:, :, 0, 0], down)`` gives the same output; the
    product is formed in float64 and rounded once to W's dtype. ``X.conv.*`` become ``X.*``; other keys pass
    unchanged.

    Raises:
        CheckpointError: a LoRA pair without its conv, an orphan ``lora_up``, or shapes that do not compose (the
            message names the keys and shapes).
    """
    merged = dict(state_dict)
    for down_key in [key for key in state_dict if key.endswith(".lora_down.weight")]:
        base = down_key[: -len(".lora_down.weight")]
        weight_key, up_key = f"{base}.conv.weight", f"{base}.lora_up.weight"
        for needed in (weight_key, up_key):
            if needed not in state_dict:
                raise CheckpointError(f"LoRA pair {down_key!r} has no {needed!r}")
        merged[f"{base}.weight"] = _merged_weight(state_dict[weight_key], state_dict[up_key], state_dict[down_key],
                                                  base)
        for key in (down_key, up_key, weight_key):
            del merged[key]
        if f"{base}.conv.bias" in merged:
            merged[f"{base}.bias"] = merged.pop(f"{base}.conv.bias")
    orphans = [key for key in merged if key.endswith(".lora_up.weight")]
    if orphans:
        raise CheckpointError(f"lora_up weights without lora_down ({listing(orphans)})")
    return merged


def _merged_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, name: str) -> torch.Tensor:
    """``W + up[:, :, 0, 0] @ down`` over the rank axis: W (O, I, k, k), up (O, r, 1, 1), down (r, I, k, k)."""
    out_channels, rank = weight.shape[0], down.shape[0]
    if up.shape != (out_channels, rank, 1, 1) or down.shape[1:] != weight.shape[1:]:
        raise CheckpointError(
            f"LoRA of {name!r} does not compose: conv {tuple(weight.shape)}, lora_up {tuple(up.shape)} "
            f"(expected {(out_channels, rank, 1, 1)}), lora_down {tuple(down.shape)} (expected "
            f"{(rank, *weight.shape[1:])})"
        )
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0].double(), down.double())
    return (weight.double() + delta).to(weight.dtype)


def lora_rank(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The LoRA rank r of a MedVAE state dict (0 when it has no LoRA pairs)."""
    ranks = {value.shape[0] for key, value in state_dict.items() if key.endswith(".lora_down.weight")}
    if len(ranks) > 1:
        raise CheckpointError(f"LoRA pairs of mixed ranks {sorted(ranks)}")
    return ranks.pop() if ranks else 0


# ---------------------------------------------------------------------------------------------------------------
# CompVis <-> diffusers names

# Placeholders of the rename templates: e = encoder/decoder, i/j = level/block index, r = a resnet layer,
# p = parameter, u = a decoder level (bottom-up in CompVis, top-down in diffusers: u <-> L-1-u).
_FIELDS = {"e": "encoder|decoder", "i": r"\d+", "j": r"\d+", "u": r"\d+", "r": "norm1|conv1|norm2|conv2",
           "p": "weight|bias"}
_ATTENTION = "{e}.mid_block.attentions.0"
# (CompVis name, diffusers AutoencoderKL name); docs/sources.md, "MedVAE and SD-VAE checkpoints".
_RENAMES = (
    ("{e}.conv_in.{p}", "{e}.conv_in.{p}"),
    ("{e}.conv_out.{p}", "{e}.conv_out.{p}"),
    ("{e}.norm_out.{p}", "{e}.conv_norm_out.{p}"),
    ("encoder.down.{i}.block.{j}.{r}.{p}", "encoder.down_blocks.{i}.resnets.{j}.{r}.{p}"),
    ("encoder.down.{i}.block.{j}.nin_shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}"),
    ("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}"),
    ("decoder.up.{u}.block.{j}.{r}.{p}", "decoder.up_blocks.{u}.resnets.{j}.{r}.{p}"),
    ("decoder.up.{u}.block.{j}.nin_shortcut.{p}", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.{p}"),
    ("decoder.up.{u}.upsample.conv.{p}", "decoder.up_blocks.{u}.upsamplers.0.conv.{p}"),
    ("{e}.mid.block_1.{r}.{p}", "{e}.mid_block.resnets.0.{r}.{p}"),
    ("{e}.mid.block_2.{r}.{p}", "{e}.mid_block.resnets.1.{r}.{p}"),
    ("{e}.mid.attn_1.norm.{p}", _ATTENTION + ".group_norm.{p}"),
    ("{e}.mid.attn_1.q.{p}", _ATTENTION + ".to_q.{p}"),
    ("{e}.mid.attn_1.k.{p}", _ATTENTION + ".to_k.{p}"),
    ("{e}.mid.attn_1.v.{p}", _ATTENTION + ".to_v.{p}"),
    ("{e}.mid.attn_1.proj_out.{p}", _ATTENTION + ".to_out.0.{p}"),
    ("quant_conv.{p}", "quant_conv.{p}"),
    ("post_quant_conv.{p}", "post_quant_conv.{p}"),
)
# diffusers < 0.14 attention names, still found in older model folders.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
_ATTENTION_WEIGHT = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_COMPVIS_KEY = re.compile(r"^(encoder\.(down|mid)\.|decoder\.(up|mid)\.)")


def _template_regex(template: str) -> re.Pattern:
    """A template such as ``encoder.down.{i}.block.{j}.{r}.{p}`` as a regex with one named group per field."""
    parts = re.split(r"\{(\w)\}", template)
    return re.compile("".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
                              for n, part in enumerate(parts)))


_TO_DIFFUSERS = tuple((_template_regex(compvis), diffusers) for compvis, diffusers in _RENAMES)
_TO_COMPVIS = tuple((_template_regex(diffusers), compvis) for compvis, diffusers in _RENAMES)


def _rename(key: str, rules: tuple, num_up: int) -> str | None:
    """``key`` renamed by the first matching rule (decoder levels mirrored over ``num_up``), or None."""
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            fields = match.groupdict()
            if "u" in fields:
                fields["u"] = str(num_up - 1 - int(fields["u"]))
            return target.format(**fields)
    return None


def compvis_to_diffusers_key(key: str, num_up: int) -> str | None:
    """The AutoencoderKL name of a CompVis VAE key (``num_up`` = decoder levels), or None if it has none."""
    return _rename(key, _TO_DIFFUSERS, num_up)


def diffusers_to_compvis_key(key: str, num_up: int) -> str | None:
    """The CompVis name of an AutoencoderKL key (``num_up`` = decoder levels), or None if it has none."""
    return _rename(key, _TO_COMPVIS, num_up)


def is_compvis_vae(state_dict: Mapping[str, Any]) -> bool:
    """True when a VAE state dict uses CompVis LDM names (``encoder.down.0...``) rather than diffusers names."""
    return any(_COMPVIS_KEY.match(key) for key in state_dict)


def convert_compvis_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """CompVis LDM autoencoder weights (LoRA already merged) renamed to diffusers AutoencoderKL names.

    Decoder levels are mirrored (``decoder.up.i`` -> ``decoder.up_blocks.{L-1-i}``) and the mid-block attention's
    1x1 convs (O, I, 1, 1) become Linear weights (O, I). Keys without a CompVis rule pass through unchanged, so
    the final name check reports them as unexpected under their own name.
    """
    num_up = decoder_levels(state_dict)
    converted = {}
    for key, value in state_dict.items():
        new_key = compvis_to_diffusers_key(key, num_up) or key
        converted[new_key] = _squeeze_attention(new_key, value)
    return converted


def decoder_levels(state_dict: Mapping[str, Any]) -> int:
    """Number L of decoder levels of a CompVis state dict: distinct i in ``decoder.up.{i}.*``."""
    return len({match.group(1) for key in state_dict if (match := re.match(r"decoder\.up\.(\d+)\.", key))})


def _squeeze_attention(key: str, value: torch.Tensor) -> torch.Tensor:
    """An attention projection stored as a 1x1 conv (O, I, 1, 1) -> Linear (O, I); anything else unchanged."""
    if _ATTENTION_WEIGHT.search(key) and value.ndim == 4 and value.shape[2:] == (1, 1):
        return value[:, :, 0, 0]
    return value


def rename_legacy_attention(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Old diffusers attention names (query, key, value, proj_attn) -> to_q, to_k, to_v, to_out.0; 1x1 squeezed."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION_KEY.match(key)
        if match:
            key = f"{match.group(1)}.{_LEGACY_ATTENTION[match.group(2)]}.{key[match.end():]}"
        renamed[key] = _squeeze_attention(key, value)
    return renamed
