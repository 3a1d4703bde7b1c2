"""The weights file medsr-train writes and medsr-export reads: one safetensors file whose keys are
``vae.<AutoencoderKL key>`` and ``unet.<UNet2DModel key>`` (medsr.export.builder.build_models)."""

from __future__ import annotations

from pathlib import Path

import torch

from medsr.errors import CheckpointError
from medsr.io.atomic import atomic_path


def save_prefixed(
    path: Path, parts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> None:
    """Write ``{prefix: state dict}`` as one safetensors file with prefixed keys, through medsr.io.atomic: the file
    is complete under its name or not there (a previous one stays intact), and no temporary is left behind.

    ``metadata``: string entries of the safetensors header (medsr.export.objective records the training objective).
    """
    from safetensors.torch import save_file

    merged = {
        prefix + key: value.detach().contiguous().cpu()
        for prefix, state in parts.items()
        for key, value in state.items()
    }
    with atomic_path(path, overwrite=True) as tmp:
        save_file(merged, str(tmp), metadata=metadata)


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
