"""Build a preset's PyTorch models from weights (or randomly) and record where every weight came from."""

from __future__ import annotations

from pathlib import Path

import torch

from medsr.bundle import sha256_file
from medsr.errors import CheckpointError, InputError
from medsr.export.models import build_unet, build_vae
from medsr.export.objective import check_objective, preset_objective
from medsr.export.presets import Preset

#: UNet fields a published checkpoint must share with the preset (the rest cannot be read from weights).
UNET_ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                            "down_block_types", "up_block_types")


def build_models(
    preset: Preset,
    weights: str | None = None,
    vae_weights: str | None = None,
    unet_weights: str | None = None,
    seed: int = 0,
):
    """(vae, unet, provenance) for ``preset``; provenance holds ``weights`` (where each came from) and
    ``objective`` (medsr.export.objective: the training objective the bundle samples under, and its source).

    Args:
        weights: one safetensors file with ``vae.<AutoencoderKL key>`` and ``unet.<UNet2DModel key>`` (what
            medsr-train writes); refused when its recorded training objective differs from the preset's.
        vae_weights: the preset's published VAE checkpoint (``preset.vae_checkpoint``: a MedVAE .ckpt, or an
            SD-VAE folder or file), converted by medsr.export.checkpoints.
        unet_weights: a latent-sr denoiser checkpoint (PyTorch Lightning .ckpt or state dict).
        seed: seeds the random initialisation of whatever no file provides; the provenance says which part.
    """
    if weights and (vae_weights or unet_weights):
        raise InputError("give either --weights or --vae-weights/--unet-weights, not both")
    torch.manual_seed(seed)
    vae, unet = build_vae(preset.vae).eval(), build_unet(preset.unet).eval()
    if weights:
        path = Path(weights)
        objective = check_objective(preset, path)  # before loading: a refusal costs no weight reading
        record = {"source": "file", **_load_medsr_weights(path, vae, unet)}
        return vae, unet, {"weights": record, "objective": objective}
    # Published checkpoints and random weights carry no objective: the preset's scheduler is theirs by definition.
    objective = preset_objective(preset)
    random = {"source": "random-init", "seed": seed}
    vae_record = unet_record = random
    if vae_weights:
        vae, vae_record = _load_published_vae(preset, Path(vae_weights))
    if unet_weights:
        unet, unet_record = _load_published_unet(preset, Path(unet_weights))
    if not (vae_weights or unet_weights):
        return vae, unet, {"weights": random, "objective": objective}
    source = "checkpoints" if vae_weights and unet_weights else "checkpoints+random-init"
    return vae, unet, {"weights": {"source": source, "vae": vae_record, "unet": unet_record}, "objective": objective}


def _load_medsr_weights(path: Path, vae, unet) -> dict:
    state = _load_safetensors(path)
    for prefix, module in (("vae.", vae), ("unet.", unet)):
        part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        _load_exact(module, part, path, prefix)
    stray = sorted(key for key in state if not key.startswith(("vae.", "unet.")))
    if stray:
        raise CheckpointError(f"{path}: unexpected keys {stray[:5]} ({len(stray)} in all)")
    return {"file": path.name, "sha256": sha256_file(path)}


def _load_published_vae(preset: Preset, path: Path):
    from medsr.export.checkpoints import SD_VAE_CONFIG, load_medvae, load_sd_vae

    if not path.exists():
        raise InputError(f"{path}: VAE weights not found")
    if preset.vae_checkpoint is None:
        raise InputError(f"preset {preset.name} has no published VAE; pass medsr weights with --weights")
    if preset.vae_checkpoint == "sd-vae":
        vae, report = load_sd_vae(path, expected=SD_VAE_CONFIG)
    else:
        vae, report = load_medvae(path, expected=preset.vae_checkpoint)
    # The preset, not the file, decides the latent convention (the paper used raw latents).
    vae.register_to_config(scaling_factor=preset.latent_scaling_factor)
    return vae.eval(), report.to_dict()


def _load_published_unet(preset: Preset, path: Path):
    from medsr.export.checkpoints import load_latentsr_unet

    if not path.exists():
        raise InputError(f"{path}: UNet weights not found")
    unet, report = load_latentsr_unet(path)
    problems = [
        f"{field}: preset {preset.unet.get(field)}, checkpoint {report.config.get(field)}"
        for field in UNET_ARCHITECTURE_FIELDS
        if _as_tuple(report.config.get(field)) != _as_tuple(preset.unet.get(field))
    ]
    if problems:
        raise CheckpointError(f"{path}: the UNet does not match preset {preset.name}: {'; '.join(problems)}")
    return unet.eval(), report.to_dict()


def _as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


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
