"""The paper's published denoiser checkpoints: PyTorch Lightning ``.ckpt`` files around a diffusers UNet2DModel.

latent-sr's LightningModule keeps the UNet in an attribute (``self.model``), so the checkpoint's
``state_dict`` holds ``model.conv_in.weight``, ... next to the module's own buffers (``alphas``) and, when trained
with EMA, LitEma shadow weights (``model_ema.*``, dots removed from their names). The loader finds the prefix,
strips it, reads the UNet2DModel architecture off the shapes, and records what the shapes cannot tell.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medsr.errors import CheckpointError
from medsr.export.checkpoints.common import (
    LoadReport,
    file_sha256,
    listing,
    load_into,
    read_checkpoint,
    split_prefix,
    unwrap_state_dict,
)

# UNet2DModel arguments that leave no trace in the weights, with the diffusers defaults that latent-sr used (its
# UNet2DModel(...) call sets none of them). Overridable through ``load_latentsr_unet(assume=...)``.
UNET_ASSUMED_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "dropout": 0.0,
}

_LITEMA_PREFIX = "model_ema."


def find_unet_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The prefix under which a state dict holds one UNet2DModel (``"model."``, ``"unet."``, or ``""``).

    A prefix P qualifies when both ``P + "conv_in.weight"`` and ``P + "time_embedding.linear_1.weight"`` exist.

    Raises:
        CheckpointError: no UNet found (the top-level names are listed), or several (pass ``prefix=``).
    """
    candidates = sorted(key[: -len("conv_in.weight")] for key in state_dict
                        if key.endswith("conv_in.weight")
                        and key[: -len("conv_in.weight")] + "time_embedding.linear_1.weight" in state_dict)
    if not candidates:
        tops = sorted({key.split(".")[0] for key in state_dict})
        raise CheckpointError("no diffusers UNet2DModel weights found (no '<prefix>conv_in.weight' with "
                              f"'<prefix>time_embedding.linear_1.weight'); top-level names: {listing(tops)}")
    if len(candidates) > 1:
        raise CheckpointError(f"several UNets in one checkpoint (prefixes {candidates}); pass prefix=")
    return candidates[0]


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) at the start of the keys."""
    return sorted({int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))})


def _count(state_dict: Mapping[str, Any], pattern: str, what: str) -> int:
    """How many consecutive indices 0..n-1 ``pattern`` finds; a CheckpointError when none or with gaps."""
    found = _indices(state_dict, pattern)
    if not found or found != list(range(len(found))):
        raise CheckpointError(f"cannot infer {what}: keys matching {pattern!r} are numbered {found}")
    return len(found)


def _width(state_dict: Mapping[str, torch.Tensor], key: str, axis: int = 0) -> int:
    """``state_dict[key].shape[axis]``; a CheckpointError naming the key when it is absent."""
    if key not in state_dict:
        raise CheckpointError(f"key {key!r} is missing (needed to infer the UNet architecture)")
    return state_dict[key].shape[axis]


def _block_types(state_dict: Mapping[str, Any], group: str, count: int, plain: str, attention: str) -> tuple:
    """Per block of ``group`` (down_blocks / up_blocks): the attention type when it has attention weights."""
    return tuple(attention if f"{group}.{i}.attentions.0.to_q.weight" in state_dict else plain
                 for i in range(count))


def _time_embedding(state_dict: Mapping[str, torch.Tensor], first_width: int) -> dict[str, Any]:
    """time_embedding_type (positional / fourier / learned), time_embedding_dim and num_train_timesteps.

    positional: no ``time_proj`` weights; fourier: ``time_proj.weight`` (C0,), random frequencies feeding a 2*C0
    input; learned: ``time_proj.weight`` (T, C0), an embedding table over T training timesteps.
    """
    config: dict[str, Any] = {"time_embedding_type": "positional"}
    projection = state_dict.get("time_proj.weight")
    if projection is not None and projection.ndim == 1:
        config["time_embedding_type"] = "fourier"
    elif projection is not None:
        config["time_embedding_type"] = "learned"
        config["num_train_timesteps"] = projection.shape[0]
    embed_dim = _width(state_dict, "time_embedding.linear_1.weight")
    if embed_dim != 4 * first_width:
        config["time_embedding_dim"] = embed_dim
    return config


def detect_unet_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """UNet2DModel kwargs that the shapes of an unprefixed state dict determine.

    in/out channels from conv_in (C0, in, 3, 3) / conv_out (out, C0, 3, 3); block_out_channels from each down
    block's first resnet; layers_per_block = resnets of down block 0; Attn*Block2D wherever a block has attention
    weights; the mid block and its attention by presence; resnet_time_scale_shift "scale_shift" when
    time_emb_proj doubles the width; the time embedding as in ``_time_embedding``. What the shapes cannot tell is
    in UNET_ASSUMED_DEFAULTS.
    """
    levels = _count(state_dict, r"down_blocks\.(\d+)\.", "the number of down blocks")
    widths = tuple(_width(state_dict, f"down_blocks.{i}.resnets.0.conv1.weight") for i in range(levels))
    config: dict[str, Any] = {
        "in_channels": _width(state_dict, "conv_in.weight", axis=1),
        "out_channels": _width(state_dict, "conv_out.weight"),
        "block_out_channels": widths,
        "layers_per_block": _count(state_dict, r"down_blocks\.0\.resnets\.(\d+)\.", "layers_per_block"),
        "down_block_types": _block_types(state_dict, "down_blocks", levels, "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": _block_types(state_dict, "up_blocks", _count(state_dict, r"up_blocks\.(\d+)\.",
                                                                       "the number of up blocks"),
                                       "UpBlock2D", "AttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2D" if "mid_block.resnets.0.conv1.weight" in state_dict else None,
        "add_attention": "mid_block.attentions.0.to_q.weight" in state_dict,
        "resnet_time_scale_shift": "default",
        **_time_embedding(state_dict, widths[0]),
    }
    if _width(state_dict, "down_blocks.0.resnets.0.time_emb_proj.weight") == 2 * widths[0]:
        config["resnet_time_scale_shift"] = "scale_shift"
    return config


def load_latentsr_unet(
    path: str | Path, prefix: str | None = None, assume: Mapping[str, Any] | None = None
) -> tuple[Any, LoadReport]:
    """A latent-sr denoiser checkpoint as an eval-mode diffusers UNet2DModel, with the architecture inferred.

    Args:
        path: a Lightning ``.ckpt`` (``{"state_dict": {"model.conv_in.weight": ...}, ...}``), a bare UNet state
            dict, or a ``.safetensors`` file of either naming.
        prefix: the LightningModule attribute prefix to strip (``"model."``); found automatically when None.
        assume: values for fields the weights cannot tell (keys of UNET_ASSUMED_DEFAULTS); the Lightning
            ``hyper_parameters["hr_size"]``, when present, gives ``sample_size``.
    Returns:
        (model, report); ``report.assumed`` lists every field taken from a default, ``report.ignored_keys`` the
        entries outside the prefix (``alphas``, ``model_ema.*``).
    Raises:
        CheckpointError: unsafe or unreadable file, no or several UNets, an unknown ``assume`` field, or weights
            that do not fit the inferred architecture (names listed).
    """
    path = Path(path)
    unknown = sorted(set(assume or {}) - set(UNET_ASSUMED_DEFAULTS))
    if unknown:
        raise CheckpointError(f"assume= got unknown fields {unknown}; allowed: {sorted(UNET_ASSUMED_DEFAULTS)}")
    checkpoint = read_checkpoint(path)
    full = unwrap_state_dict(checkpoint, path.name)
    prefix = find_unet_prefix(full) if prefix is None else prefix
    state_dict, ignored = split_prefix(full, prefix)
    known = {**_hyper_parameter_sizes(checkpoint), **(assume or {})}
    config = {**detect_unet_config(state_dict), **UNET_ASSUMED_DEFAULTS, **known}
    model = load_into(_build_unet(config, path.name), state_dict, path.name, lambda key: prefix + key)
    report = LoadReport(
        file=path.name, sha256=file_sha256(path), format="lightning-ckpt" if prefix else "unet-state-dict",
        config=config, prefix=prefix, ignored_keys=ignored,
        assumed={key: value for key, value in UNET_ASSUMED_DEFAULTS.items() if key not in known},
        notes=_ema_note(ignored),
    )
    return model, report


def _build_unet(config: dict[str, Any], source: str) -> Any:
    """UNet2DModel(**config); a CheckpointError when diffusers rejects it (e.g. widths not divisible by groups)."""
    from diffusers import UNet2DModel

    try:
        return UNet2DModel(**config)
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: the inferred UNet2DModel cannot be built ({exc}); the fields the "
                              f"weights cannot tell may need assume= (defaults: {UNET_ASSUMED_DEFAULTS})") from exc


def _hyper_parameter_sizes(checkpoint: Any) -> dict[str, Any]:
    """``{"sample_size": hr_size}`` from latent-sr's saved Lightning hyper-parameters, when the file has them."""
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, Mapping) else None
    if isinstance(hparams, Mapping) and isinstance(hparams.get("hr_size"), int):
        return {"sample_size": hparams["hr_size"]}
    return {}


def _ema_note(ignored: list[str]) -> list[str]:
    """A note when the file also holds LitEma shadow weights, which this loader does not use."""
    count = sum(key.startswith(_LITEMA_PREFIX) for key in ignored)
    return [f"{count} EMA entries ({_LITEMA_PREFIX}*) present and not loaded; the raw weights were used"] if count else []

