"""VAE checkpoints: MedVAE 2D ``.ckpt`` files (LoRA merged) and the Stable Diffusion VAE, as diffusers AutoencoderKL.

Both published VAEs are the CompVis LDM autoencoder (docs/sources.md, "MedVAE and SD-VAE checkpoints").
Loading goes:

    file --read_checkpoint--> state dict --merge_lora--> plain convs --convert_compvis_vae_state_dict-->
    AutoencoderKL names --detect_vae_config--> constructor kwargs --check names and shapes--> AutoencoderKL

The configuration comes from the weights' shapes, never from a file name, and is checked against the named model
when one is given, so a wrong file fails with the field that differs instead of a wall of shape errors.
"""

from __future__ import annotations

import inspect
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsr.errors import CheckpointError
from medsr.export.checkpoints.common import (
    LoadReport,
    StateDict,
    file_sha256,
    load_into,
    read_checkpoint,
    split_prefix,
    unwrap_state_dict,
)
from medsr.export.checkpoints.compvis import (
    compvis_to_diffusers_key,
    convert_compvis_vae_state_dict,
    decoder_levels,
    diffusers_to_compvis_key,
    is_compvis_vae,
    lora_rank,
    merge_lora,
    rename_legacy_attention,
)

# GroupNorm's group count leaves no trace in the weights; CompVis ``Normalize`` and diffusers both use 32.
DEFAULT_NORM_GROUPS = 32
# Latent scaling of the SD VAE (diffusers config of stabilityai/sd-vae-ft-ema and -ft-mse); the paper used raw
# latents, which medsr's presets express with their own latent_scaling_factor.
SD_VAE_SCALING_FACTOR = 0.18215


def _medvae(file: str, image_channels: int, latent_channels: int, channel_mult: tuple[int, ...],
            lora_rank: int) -> dict[str, Any]:
    """One MEDVAE_MODELS entry: ddconfig ch 128, 2 res blocks per level, mid-block attention (docs/sources.md,
    "MedVAE and SD-VAE checkpoints")."""
    levels = len(channel_mult)
    return {
        "file": file,
        "latent_factor": 2 ** (levels - 1),
        "lora_rank": lora_rank,
        "vae": {
            "in_channels": image_channels,
            "out_channels": image_channels,
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "block_out_channels": tuple(128 * mult for mult in channel_mult),
            "layers_per_block": 2,
            "latent_channels": latent_channels,
            "norm_num_groups": DEFAULT_NORM_GROUPS,
            "mid_block_add_attention": True,
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            # MedVAE publishes no latent scaling; 1.0 keeps diffusers' SD default (0.18215) from sneaking in.
            "scaling_factor": 1.0,
        },
    }


# The MedVAE 2D models (github.com/StanfordMIMI/MedVAE, model_weights/*.ckpt): name -> {"file": published file name,
# "latent_factor": f, "lora_rank": r (0 = no LoRA), "vae": AutoencoderKL kwargs}.
MEDVAE_MODELS: dict[str, dict[str, Any]] = {
    "medvae_4_1_2d": _medvae("vae_4x_1c_2D.ckpt", 1, 1, (1, 2, 4), lora_rank=0),
    "medvae_4_3_2d": _medvae("vae_4x_3c_2D.ckpt", 3, 3, (1, 2, 4), lora_rank=4),
    "medvae_8_1_2d": _medvae("vae_8x_1c_2D.ckpt", 1, 1, (1, 2, 4, 4), lora_rank=0),
    "medvae_8_4_2d": _medvae("vae_8x_4c_2D.ckpt", 3, 4, (1, 2, 4, 4), lora_rank=4),
}

# stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (CompVis kl-f8): AutoencoderKL kwargs, for ``load_sd_vae(expected=)``.
SD_VAE_CONFIG: dict[str, Any] = {
    **{key: value for key, value in MEDVAE_MODELS["medvae_8_4_2d"]["vae"].items() if key != "scaling_factor"},
    "scaling_factor": SD_VAE_SCALING_FACTOR,
}

# Fields that fix the network (everything else in the kwargs, e.g. scaling_factor, only annotates it).
ARCHITECTURE_FIELDS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "down_block_types", "up_block_types", "mid_block_add_attention", "norm_num_groups",
    "use_quant_conv", "use_post_quant_conv",
)

# Keys a VAE checkpoint may hold that SR does not use, with the reason recorded in the report's notes.
IGNORED_PREFIXES = {
    "channel_ds.": "MedVAE stage-2 head (channel_ds, channel_proj; SR decodes the stage-1 latent)",
    "channel_proj.": "MedVAE stage-2 head (channel_ds, channel_proj; SR decodes the stage-1 latent)",
    "loss.": "CompVis training loss (LPIPS, discriminator)",
    "model_ema.": "CompVis EMA entries (the raw weights were used)",
}

# ---------------------------------------------------------------------------------------------------------------
# Configuration detection


def detect_vae_config(state_dict: Mapping[str, torch.Tensor], norm_num_groups: int = DEFAULT_NORM_GROUPS) -> dict:
    """AutoencoderKL constructor kwargs read off the shapes of a diffusers-named VAE state dict.

    in_channels = encoder.conv_in (C, in, 3, 3); out_channels = decoder.conv_out (out, C, 3, 3); latent_channels
    = decoder.conv_in (C, latent, 3, 3); block_out_channels = output width of each encoder level's first resnet;
    layers_per_block = resnets of encoder level 0; mid_block_add_attention = whether the mid block has attention;
    use_(post_)quant_conv = whether those 1x1 convs exist. ``norm_num_groups`` cannot be seen in the weights: it is
    taken as given (32 for every published CompVis/SD/MedVAE model) and checked to divide every width.

    Raises:
        CheckpointError: a key the detection needs is missing, or the levels are not numbered 0..L-1.
    """
    levels = _level_indices(state_dict, r"encoder\.down_blocks\.(\d+)\.")
    block_out = tuple(_shape(state_dict, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", "block_out_channels")[0]
                      for i in levels)
    config = {
        "in_channels": _shape(state_dict, "encoder.conv_in.weight", "in_channels")[1],
        "out_channels": _shape(state_dict, "decoder.conv_out.weight", "out_channels")[0],
        "down_block_types": ("DownEncoderBlock2D",) * len(levels),
        "up_block_types": ("UpDecoderBlock2D",) * len(levels),
        "block_out_channels": block_out,
        "layers_per_block": len(_level_indices(state_dict, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "latent_channels": _shape(state_dict, "decoder.conv_in.weight", "latent_channels")[1],
        "norm_num_groups": norm_num_groups,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state_dict,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
    }
    indivisible = [width for width in block_out if width % norm_num_groups]
    if indivisible:
        raise CheckpointError(f"block widths {indivisible} are not divisible by norm_num_groups={norm_num_groups}")
    return config


def _level_indices(state_dict: Mapping[str, Any], pattern: str) -> range:
    """The indices captured by ``pattern`` across the keys, checked to be exactly 0..n-1 with n >= 1."""
    found = sorted({int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))})
    if not found or found != list(range(len(found))):
        raise CheckpointError(f"keys matching {pattern!r} are numbered {found}, expected 0..n-1 with n >= 1")
    return range(len(found))


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, purpose: str) -> torch.Size:
    """The shape of ``state_dict[key]``; a CheckpointError saying what it was needed for when it is absent."""
    if key not in state_dict:
        raise CheckpointError(f"key {key!r} is missing (needed to detect {purpose})")
    return state_dict[key].shape


def config_mismatches(found: Mapping[str, Any], expected: Mapping[str, Any],
                      fields: tuple[str, ...] = ARCHITECTURE_FIELDS) -> list[str]:
    """``"field: expected X, found Y"`` for each of ``fields`` on which two configs differ (lists = tuples)."""
    def norm(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    return [f"{name}: expected {norm(expected.get(name))}, found {norm(found.get(name))}"
            for name in fields if norm(found.get(name)) != norm(expected.get(name))]


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class ConvertedVAE:
    """A VAE state dict brought to AutoencoderKL names, with what was learnt on the way.

    Attributes:
        state_dict: diffusers-named weights, LoRA merged, ignored keys removed.
        config: detected AutoencoderKL kwargs (architecture fields only).
        format: ``compvis`` or ``diffusers``: the names the file used.
        ignored_keys: names dropped because SR does not use them (IGNORED_PREFIXES).
        lora_merged: LoRA pairs folded into convs; lora_rank: their rank (0 = none).
        original_names: diffusers name -> name in the file, for keys that were renamed.
    """

    state_dict: StateDict
    config: dict
    format: str
    ignored_keys: list[str] = field(default_factory=list)
    lora_merged: int = 0
    lora_rank: int = 0
    original_names: dict[str, str] = field(default_factory=dict)

    def describe(self, key: str) -> str:
        """A diffusers key with its CompVis name, e.g. ``decoder.up_blocks.2... (CompVis decoder.up.0...)``."""
        original = self.original_names.get(key)
        if original is None and self.format == "compvis":
            original = diffusers_to_compvis_key(key, len(self.config["block_out_channels"]))
        return f"{key} (CompVis {original})" if original and original != key else key

    def notes(self) -> list[str]:
        """One line per reason for ignoring keys, e.g. ``8 keys ignored: MedVAE stage-2 head (...)``."""
        reasons = Counter(next(reason for prefix, reason in IGNORED_PREFIXES.items() if key.startswith(prefix))
                          for key in self.ignored_keys)
        return [f"{count} keys ignored: {reason}" for reason, count in reasons.items()]


def convert_vae_state_dict(state_dict: Mapping[str, torch.Tensor],
                           norm_num_groups: int = DEFAULT_NORM_GROUPS) -> ConvertedVAE:
    """Any published VAE state dict (CompVis or diffusers names, with or without LoRA) -> ConvertedVAE.

    Drops IGNORED_PREFIXES, merges LoRA, renames CompVis keys (or legacy diffusers attention keys), and detects
    the configuration. Works on meta tensors, so full-size key lists can be checked without allocating weights.
    """
    kept = {key: value for key, value in state_dict.items() if not key.startswith(tuple(IGNORED_PREFIXES))}
    ignored = [key for key in state_dict if key not in kept]
    rank = lora_rank(kept)
    lora_count = sum(key.endswith(".lora_down.weight") for key in kept)
    merged = merge_lora(kept)
    if is_compvis_vae(merged):
        converted, fmt = convert_compvis_vae_state_dict(merged), "compvis"
        num_up = decoder_levels(merged)
        originals = {compvis_to_diffusers_key(key, num_up) or key: key for key in merged}
    else:
        converted, fmt, originals = rename_legacy_attention(merged), "diffusers", {}
    config = detect_vae_config(converted, norm_num_groups)
    return ConvertedVAE(converted, config, fmt, ignored, lora_count, rank, originals)


def load_medvae(path: str | Path, expected: str | None = None) -> tuple[Any, LoadReport]:
    """A MedVAE 2D checkpoint (``{"state_dict": ...}``, CompVis names, LoRA) as an eval-mode diffusers AutoencoderKL.

    Args:
        path: the ``.ckpt`` file (or a ``.safetensors`` re-save of its state dict).
        expected: a MEDVAE_MODELS name; the detected configuration (and LoRA rank) must then match it.
    Returns:
        (model, report): the AutoencoderKL (float32, ``scaling_factor`` 1.0) and its LoadReport; the stage-2
        head (channel_ds, channel_proj) is listed in ``report.ignored_keys``.
    Raises:
        CheckpointError: unknown ``expected`` name, unsafe or unreadable file, a configuration field that differs
            from ``expected`` (named, expected vs found), or missing / unexpected / wrong-shaped keys (listed).
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    if expected is not None and expected not in MEDVAE_MODELS:
        raise CheckpointError(f"unknown MedVAE model {expected!r}; known: {', '.join(MEDVAE_MODELS)}")
    converted = convert_vae_state_dict(unwrap_state_dict(read_checkpoint(path), path.name))
    if expected is not None:
        wanted = MEDVAE_MODELS[expected]
        problems = config_mismatches(converted.config, wanted["vae"])
        if converted.lora_rank != wanted["lora_rank"]:
            problems.append(f"lora_rank: expected {wanted['lora_rank']}, found {converted.lora_rank}")
        if problems:
            raise CheckpointError(f"{path.name} is not {expected}: " + "; ".join(problems))
    config = {**converted.config, "scaling_factor": 1.0}
    model = load_into(AutoencoderKL(**config), converted.state_dict, path.name, converted.describe)
    report = LoadReport(
        file=path.name, sha256=file_sha256(path), format="medvae-ckpt", config=config, model_name=expected,
        ignored_keys=converted.ignored_keys, lora_merged=converted.lora_merged,
        assumed={"norm_num_groups": DEFAULT_NORM_GROUPS}, notes=converted.notes(),
    )
    return model, report


def load_sd_vae(path: str | Path, expected: Mapping[str, Any] | None = None) -> tuple[Any, LoadReport]:
    """The Stable Diffusion VAE (sd-vae-ft-ema / ft-mse, or any AutoencoderKL) as an eval-mode AutoencoderKL.

    Args:
        path: a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``), or
            one ``.safetensors`` / ``.ckpt`` / ``.bin`` / ``.pt`` file holding CompVis names (bare or under
            ``first_stage_model.`` in a whole Stable Diffusion checkpoint) or diffusers AutoencoderKL names.
        expected: AutoencoderKL kwargs to check the architecture against (e.g. SD_VAE_CONFIG), or None.
    Returns:
        (model, report). A single file has no config: ``norm_num_groups`` 32 and ``scaling_factor`` 0.18215 are
        assumed and recorded in ``report.assumed``; a folder's config.json must agree with the weights.
    Raises:
        CheckpointError: as load_medvae, and a folder without config.json or weights.
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    converted, report, source = _sd_vae_folder(path) if path.is_dir() else _sd_vae_file(path)
    if expected is not None:
        problems = config_mismatches(report.config, expected)
        if problems:
            raise CheckpointError(f"{source} does not have the expected architecture: " + "; ".join(problems))
    model = load_into(AutoencoderKL(**report.config), converted.state_dict, source, converted.describe)
    return model, report


def _sd_vae_folder(folder: Path) -> tuple[ConvertedVAE, LoadReport, str]:
    """Read a diffusers AutoencoderKL folder: (weights, report, source name); config.json must fit the weights."""
    weights, folder_config = _diffusers_folder(folder)
    source = f"{folder.name}/{weights.name}"
    converted = convert_vae_state_dict(unwrap_state_dict(read_checkpoint(weights), source),
                                       folder_config.get("norm_num_groups", DEFAULT_NORM_GROUPS))
    config = {**converted.config, **folder_config}
    problems = config_mismatches(converted.config, config)
    if problems:
        raise CheckpointError(f"{folder.name}: config.json disagrees with the weights: " + "; ".join(problems))
    report = LoadReport(file=weights.name, sha256=file_sha256(weights), format="diffusers-folder", config=config,
                        ignored_keys=converted.ignored_keys, lora_merged=converted.lora_merged,
                        notes=converted.notes())
    return converted, report, source


def _sd_vae_file(path: Path) -> tuple[ConvertedVAE, LoadReport, str]:
    """Read a single-file SD VAE (CompVis or diffusers names): (weights, report, source name)."""
    state_dict, prefix, others = _strip_sd_prefix(unwrap_state_dict(read_checkpoint(path), path.name))
    converted = convert_vae_state_dict(state_dict)
    assumed = {"norm_num_groups": DEFAULT_NORM_GROUPS, "scaling_factor": SD_VAE_SCALING_FACTOR}
    report = LoadReport(
        file=path.name, sha256=file_sha256(path), format=converted.format,
        config={**converted.config, "scaling_factor": SD_VAE_SCALING_FACTOR}, prefix=prefix,
        ignored_keys=others + converted.ignored_keys, lora_merged=converted.lora_merged, assumed=assumed,
        notes=([f"{len(others)} keys outside {prefix}* ignored (the rest of the Stable Diffusion checkpoint)"]
               if others else []) + converted.notes(),
    )
    return converted, report, path.name


def _diffusers_folder(folder: Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, AutoencoderKL kwargs from config.json) of a diffusers model folder; safetensors preferred."""
    from diffusers import AutoencoderKL

    config_path = folder / "config.json"
    candidates = [folder / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
    weights = next((candidate for candidate in candidates if candidate.is_file()), None)
    if not config_path.is_file() or weights is None:
        found = sorted(entry.name for entry in folder.iterdir())
        raise CheckpointError(f"{folder.name}: a diffusers model folder needs config.json and "
                              f"diffusion_pytorch_model.safetensors (or .bin); found {found}")
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{folder.name}/config.json is not valid JSON ({exc})") from exc
    accepted = inspect.signature(AutoencoderKL.__init__).parameters
    return weights, {key: value for key, value in raw.items() if key in accepted and key != "self"}


# A whole Stable Diffusion checkpoint keeps its VAE under this attribute of the LatentDiffusion module.
_SD_VAE_PREFIX = "first_stage_model."


def _strip_sd_prefix(state_dict: StateDict) -> tuple[StateDict, str, list[str]]:
    """(VAE weights, prefix stripped, other keys): keeps ``first_stage_model.*`` of a whole SD checkpoint."""
    if any(key.startswith(_SD_VAE_PREFIX) for key in state_dict):
        kept, others = split_prefix(state_dict, _SD_VAE_PREFIX)
        return kept, _SD_VAE_PREFIX, others
    return state_dict, "", []
