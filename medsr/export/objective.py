"""The training objective of a denoiser: recorded in its weights by medsr-train, checked by medsr-export.

A model sampled under another objective than it was trained for (an epsilon model read as x0, a linear table read
as a cosine one) gives noise without any error, so ``medsr-train denoiser`` writes the scheduler it trained with
(every SchedulerConfig field, as JSON) into the safetensors header of ``weights.safetensors`` under
``medsr.scheduler``, and export compares it with the preset's scheduler. Only the fields that fix what the network
learned are compared (``objective_fields``); the sampler's own choices (algorithm within one process, steps,
spacing, eta, clipping, initial noise) stay free at export.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from medsr.bundle.scheduler import SchedulerConfig
from medsr.errors import BundleError, CheckpointError, InputError
from medsr.export.presets import Preset

#: safetensors header key holding the training scheduler (JSON of SchedulerConfig.to_dict()).
SCHEDULER_KEY = "medsr.scheduler"


def objective_fields(config: SchedulerConfig) -> dict:
    """What training fixed: the process (``"flow"`` for flow_euler, else ``"diffusion"``), what the network
    outputs (prediction_type), T, and how x_t and the model's timestep are made from x0 and noise: the beta table
    and its orientation (reversed_table) for diffusion, the time convention for flow."""
    fields = {
        "process": "flow" if config.algorithm == "flow_euler" else "diffusion",
        "prediction_type": config.prediction_type,
        "num_train_timesteps": config.num_train_timesteps,
    }
    if fields["process"] == "flow":
        fields["flow_convention"] = config.flow_convention
        return fields
    fields["beta_schedule"] = config.beta_schedule
    if config.beta_schedule in ("linear", "scaled_linear"):
        fields["beta_start"], fields["beta_end"] = config.beta_start, config.beta_end
    fields["reversed_table"] = config.reversed_table
    return fields


def preset_objective(preset: Preset) -> dict:
    """The provenance entry ``objective`` of a bundle sampled under ``preset``'s own scheduler."""
    return {"source": "preset", "scheduler": objective_fields(SchedulerConfig.from_dict(preset.scheduler))}


def scheduler_metadata(config: SchedulerConfig) -> dict[str, str]:
    """The safetensors header entries that record ``config`` as the training scheduler."""
    return {SCHEDULER_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def read_trained_scheduler(path: Path) -> SchedulerConfig | None:
    """The scheduler recorded in the header of weights file ``path``; None for weights written before medsr
    recorded it (or by anything else)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="numpy") as file:
            text = (file.metadata() or {}).get(SCHEDULER_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc
    if text is None:
        return None
    try:
        return SchedulerConfig.from_dict(json.loads(text))
    except (ValueError, BundleError) as exc:
        raise CheckpointError(f"{path}: header entry {SCHEDULER_KEY} is not a scheduler configuration: {exc}") from exc


def check_objective(preset: Preset, path: Path) -> dict:
    """Refuse weights ``path`` trained under another objective than ``preset``'s scheduler; return the
    provenance entry ``objective``: {"source": "weights" | "preset", "scheduler": objective fields[, "note"]}.

    Weights without a record (older medsr) keep the preset's scheduler, with a warning and a note saying so.
    """
    exported = preset_objective(preset)["scheduler"]
    trained = read_trained_scheduler(path)
    if trained is None:
        note = (
            "the weights record no training objective (written before medsr recorded it); exported with "
            f"preset {preset.name}'s scheduler, which they must have been trained for"
        )
        warnings.warn(f"{path}: {note}", stacklevel=2)
        return {"source": "preset", "scheduler": exported, "note": note}
    recorded = objective_fields(trained)
    # Fields present on one side only follow from `process` or `beta_schedule`, which then differ and say it.
    differ = [key for key in sorted(set(recorded) & set(exported)) if recorded[key] != exported[key]]
    if differ:
        raise CheckpointError(
            f"{path}: the denoiser was trained for {_describe(recorded, differ)} but preset {preset.name} samples "
            f"{_describe(exported, differ)}; pass --objective-from-weights to export it as trained"
        )
    return {"source": "weights", "scheduler": recorded}


def with_trained_objective(preset: Preset, weights: str | None) -> Preset:
    """``preset`` with the scheduler recorded in the weights file: the objective the network was trained for, with
    the sampler settings training ran under (the preset's own at training time, plus its overrides).

    What ``medsr-export --objective-from-weights`` exports with: the bundle then says what the weights are, and
    its provenance says the scheduler came from them.
    """
    if not weights:
        raise InputError("--objective-from-weights reads the objective from --weights FILE; give one")
    path = Path(weights)
    trained = read_trained_scheduler(path)
    if trained is None:
        raise CheckpointError(
            f"{path}: records no training objective (weights from before medsr recorded it); export without "
            f"--objective-from-weights, under a preset whose scheduler the weights were trained for"
        )
    return dataclasses.replace(preset, scheduler=trained.to_dict())


def _describe(fields: dict, keys: list[str]) -> str:
    return ", ".join(f"{key}={fields[key]!r}" for key in keys)
