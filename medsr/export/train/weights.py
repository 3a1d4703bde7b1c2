"""The weights file medsr-train writes and medsr-export reads: one safetensors file whose keys are
``vae.<AutoencoderKL key>`` and ``unet.<UNet2DModel key>`` (medsr.export.builder.build_models)."""

from __future__ import annotations

from pathlib import Path

import torch

from medsr.errors import CheckpointError


def save_prefixed(path: Path, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write ``{prefix: state dict}`` as one safetensors file with prefixed keys, atomically."""
    from safetensors.torch import save_file

    merged = {
        prefix + key: value.detach().contiguous().cpu()
        for prefix, state in parts.items()
        for key, value in state.items()
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(merged, str(tmp))
    tmp.replace(path)


def load_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The entries of safetensors file ``path`` under ``prefix``, with the prefix removed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not part:
        raise CheckpointError(f"{path}: no weights under the prefix {prefix!r}")
    return part
