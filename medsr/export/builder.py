"""Build a preset's PyTorch models, randomly initialised or from a weights file, and say where weights came from."""

from __future__ import annotations

from pathlib import Path

import torch

from medsr.engine.bundle import sha256_file
from medsr.errors import CheckpointError, InputError
from medsr.export.models import build_unet, build_vae
from medsr.export.presets import Preset


def build_models(preset: Preset, weights: str | None = None, seed: int = 0):
    """(vae, unet, provenance) for ``preset``.

    ``weights``: a safetensors file whose keys are ``vae.<AutoencoderKL key>`` and ``unet.<UNet2DModel key>`` (what
    medsr-train writes). Without it the models are randomly initialised from ``seed`` and the provenance says so.
    """
    torch.manual_seed(seed)
    vae, unet = build_vae(preset.vae).eval(), build_unet(preset.unet).eval()
    if weights is None:
        return vae, unet, {"weights": {"source": "random-init", "seed": seed}}
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    state = _load_safetensors(path)
    for prefix, module in (("vae.", vae), ("unet.", unet)):
        part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        _load_exact(module, part, path, prefix)
    stray = sorted(key for key in state if not key.startswith(("vae.", "unet.")))
    if stray:
        raise CheckpointError(f"{path}: unexpected keys {stray[:5]} ({len(stray)} in all)")
    provenance = {"source": "file", "file": path.name, "sha256": sha256_file(path)}
    return vae, unet, {"weights": provenance}


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def _load_exact(module: torch.nn.Module, state: dict, path: Path, prefix: str) -> None:
    """Load ``state`` into ``module``, naming missing, unexpected and wrongly shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            problems.append(f"{label}: {', '.join(prefix + k for k in keys[:3])} ({len(keys)} in all)")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the preset: {'; '.join(problems)}")
    module.load_state_dict(state)
