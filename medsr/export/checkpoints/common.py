"""What every checkpoint loader shares: safe file reading, the load report, and key/shape checking.

Safety rule: a checkpoint is data, never code. ``.safetensors`` files are read with safetensors; pickle-based files
(``.ckpt``, ``.pt``, ``.bin``) only with ``torch.load(..., weights_only=True)``, whose unpickler accepts tensors and
plain containers and refuses every other global. A file that needs more fails with a CheckpointError saying how to
re-save it; medsr never falls back to full unpickling.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsr.errors import CheckpointError

# How many names an error message or a manifest lists before it only gives the count.
MAX_LISTED = 5
MAX_IGNORED_IN_MANIFEST = 32

StateDict = dict[str, torch.Tensor]


@dataclass
class LoadReport:
    """Provenance of one loaded weight file, for the bundle manifest.

    Attributes:
        file: the weight file's name (no directories), e.g. ``vae_4x_3c_2D.ckpt``.
        sha256: hex digest of that file's bytes.
        format: how the file was read: ``medvae-ckpt``, ``diffusers-folder``, ``compvis`` (CompVis LDM names,
            converted), ``diffusers`` (AutoencoderKL names), ``lightning-ckpt`` or ``unet-state-dict``.
        config: constructor keyword arguments of the loaded diffusers model.
        model_name: the named model the checkpoint was checked against (e.g. ``medvae_4_3_2d``), or None.
        prefix: key prefix stripped from the file's names (``first_stage_model.``, ``model.``), "" for none.
        ignored_keys: keys present in the file and deliberately not loaded (stage-2 head, Lightning buffers, ...).
        lora_merged: number of LoRA pairs merged into their convolutions.
        assumed: configuration fields the weights cannot tell, with the value used.
        notes: anything else worth recording (EMA weights present and not used, ...).
    """

    file: str
    sha256: str
    format: str
    config: dict
    model_name: str | None = None
    prefix: str = ""
    ignored_keys: list[str] = field(default_factory=list)
    lora_merged: int = 0
    assumed: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists; at most MAX_IGNORED_IN_MANIFEST ignored names, plus their count)."""
        out = _jsonable(asdict(self))
        out["ignored_key_count"] = len(self.ignored_keys)
        out["ignored_keys"] = out["ignored_keys"][:MAX_IGNORED_IN_MANIFEST]
        return out


def _jsonable(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively (json would do it too; this keeps dicts comparable)."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in a weight file, read without running any of its code.

    ``.safetensors`` -> the dict of tensors. Anything else -> ``torch.load(weights_only=True)``'s result (a state
    dict, or a dict holding one, e.g. Lightning's ``{"state_dict": ..., "epoch": ...}``).

    Raises:
        CheckpointError: missing file, unreadable file, or a pickle that needs globals beyond tensors and plain
            containers (a custom class, a numpy object, ...): its message names the refused global.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused is None:
            raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc
        raise CheckpointError(
            f"{path.name}: refusing to unpickle: the file needs the Python object {refused.group(1)}, beyond "
            "tensors and plain containers. medsr loads checkpoints with torch.load(weights_only=True) only and "
            "never runs code from a weight file; if you trust the file, re-save its state dict "
            "(torch.save(state_dict, ...) or safetensors) and load that."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc


def _first_line(exc: Exception) -> str:
    """The first non-empty line of an exception's message (torch's are long)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _read_safetensors(path: Path) -> StateDict:
    """The tensors of a ``.safetensors`` file; a CheckpointError when the header or data is corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({exc})") from exc


def unwrap_state_dict(obj: Any, source: str) -> StateDict:
    """The state dict inside a loaded checkpoint: ``obj["state_dict"]`` when present, else ``obj`` itself.

    Every value must be a tensor; a CheckpointError names the first ``state_dict`` entry that is not, or lists the
    top-level entries when no state dict can be found.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{source}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        shown = listing([str(key) for key in obj]) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{source}: no state dict found (expected a dict of tensors or a 'state_dict' entry "
                              f"holding one; top level: {shown})")
    return dict(obj)


def listing(names: list[str], limit: int = MAX_LISTED) -> str:
    """``"3: a, b, c"`` or ``"120: a, b, c, d, e, ..."``: a count and the first few names, for error messages."""
    shown = ", ".join(names[:limit])
    return f"{len(names)}: {shown}" + (", ..." if len(names) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Size],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    describe: Callable[[str], str] = str,
) -> None:
    """Raise a CheckpointError unless ``state_dict`` has exactly the keys and shapes of ``expected``.

    Args:
        expected: the model's parameter shapes, ``{name: shape}`` (from ``model.state_dict()``; meta tensors do).
        state_dict: the converted weights to load.
        source: the file name, for the message.
        describe: turns a model key into the text a user recognises (e.g. adds its name in the file).
    The message lists the first few missing, unexpected and wrong-shaped keys with the count of each.
    """
    missing = [describe(key) for key in expected if key not in state_dict]
    unexpected = [describe(key) for key in state_dict if key not in expected]
    wrong = [
        f"{describe(key)} expected {tuple(shape)} found {tuple(state_dict[key].shape)}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(shape)
    ]
    problems = [
        f"{label} keys ({listing(names)})"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong))
        if names
    ]
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model: " + "; ".join(problems))


def model_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """``{name: shape}`` of a module's state dict (parameters and persistent buffers)."""
    return {key: value.shape for key, value in model.state_dict().items()}


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
              describe: Callable[[str], str] = str) -> torch.nn.Module:
    """Check ``state_dict`` against ``model`` (names and shapes), load it strictly, and return the eval-mode model.

    Floating tensors are cast to the model's dtype by ``load_state_dict`` (fp16 checkpoints load into fp32).
    """
    check_state_dict(model_shapes(model), state_dict, source, describe)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def split_prefix(state_dict: StateDict, prefix: str) -> tuple[StateDict, list[str]]:
    """(entries under ``prefix`` with it removed, names of the other entries): keeps one sub-module's weights."""
    kept = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    others = [key for key in state_dict if not key.startswith(prefix)]
    return kept, others
