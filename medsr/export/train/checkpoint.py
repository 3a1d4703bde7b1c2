"""Training checkpoints: weights (safetensors), optimizer state (torch.save, read back with weights_only=True) and
a small JSON state, written to a temporary directory and renamed into place so a checkpoint is complete or absent.

Layout of ``<run>/checkpoint/``::

    model.safetensors   the trained module's state dict
    ema.safetensors     the exponential moving average of its parameters (absent when EMA is off)
    optimizer.pt        AdamW state
    state.json          {"step": int, "config": {...}, ...}: what resuming checks and continues from
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medsr.errors import CheckpointError
from medsr.io.atomic import atomic_dir

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(run_dir: Path, model: torch.nn.Module, ema: dict | None, optimizer, state: dict) -> Path:
    """Write ``run_dir/checkpoint`` atomically (stage, then rename over the previous one). Returns its path."""
    from safetensors.torch import save_file

    final = run_dir / CHECKPOINT_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final, overwrite=True) as staging:
        save_file(_contiguous(model.state_dict()), str(staging / "model.safetensors"))
        if ema is not None:
            save_file(_contiguous(ema), str(staging / "ema.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    return final


def load_checkpoint(run_dir: Path, model: torch.nn.Module, ema: dict | None, optimizer) -> dict:
    """Load ``run_dir/checkpoint`` into ``model``, ``ema`` (in place) and ``optimizer``; return its state dict."""
    from safetensors.torch import load_file

    path = run_dir / CHECKPOINT_DIR
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from (state.json missing)")
    try:
        state = json.loads((path / "state.json").read_text())
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if ema is not None:
            loaded = load_file(str(path / "ema.safetensors"))
            if set(loaded) != set(ema):
                raise CheckpointError(f"{path}/ema.safetensors: parameter names do not match the model")
            for name, value in loaded.items():
                ema[name].copy_(value)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: {exc}") from exc
    return state


def _contiguous(state: dict) -> dict:
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}
