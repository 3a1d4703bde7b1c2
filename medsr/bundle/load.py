"""Reading and validating an exported model bundle: the contract between export and engine (DESIGN.md).

A bundle is a directory holding ``medsr.json`` (the manifest) and the three ONNX graphs of medsr.bundle.graphs.
Nothing is trusted unchecked: an unknown format version, a missing field, a graph whose sha256 or I/O names differ
from the manifest is refused with a BundleError that names the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from medsr.bundle.conditioning import Conditioning
from medsr.bundle.graphs import GRAPHS
from medsr.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "medsr.json"
_REQUIRED_SECTIONS = ("format_version", "name", "task", "vae", "denoiser", "scheduler", "graphs", "provenance")
_TASK_FIELDS = ("scale", "image_channels", "lr_multiple", "intensity")
_VAE_FIELDS = ("downsample_factor", "latent_channels", "scaling_factor", "shift_factor", "lr_latent")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GraphEntry:
    """One graph as the manifest records it."""

    name: str
    path: Path
    sha256: str
    opset: int
    precision: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Bundle:
    """A validated bundle. ``manifest`` is the parsed medsr.json; the properties are its most used fields."""

    root: Path
    manifest: dict
    graphs: dict[str, GraphEntry]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def scale(self) -> int:
        return int(self.manifest["task"]["scale"])

    @property
    def image_channels(self) -> int:
        return int(self.manifest["task"]["image_channels"])

    @property
    def lr_multiple(self) -> int:
        """LR height and width are padded to a multiple of this before encoding."""
        return int(self.manifest["task"]["lr_multiple"])

    @property
    def vae_factor(self) -> int:
        return int(self.manifest["vae"]["downsample_factor"])

    @property
    def latent_channels(self) -> int:
        return int(self.manifest["vae"]["latent_channels"])

    @property
    def conditioning(self) -> Conditioning:
        """How the denoiser sees the LR slice (medsr.bundle.conditioning)."""
        return Conditioning.from_manifest(self.manifest["denoiser"])

    @property
    def scheduler(self) -> dict:
        """The SchedulerConfig fields (medsr.engine.schedulers) the model was trained for."""
        return dict(self.manifest["scheduler"])

    def graph_path(self, name: str) -> Path:
        return self.graphs[name].path


def _require(mapping: dict, fields: tuple[str, ...], where: str, manifest_path: Path) -> None:
    missing = [key for key in fields if key not in mapping]
    if missing:
        raise BundleError(f"{manifest_path}: missing field(s) {', '.join(missing)} in {where}")


def _graph_entry(root: Path, manifest_path: Path, name: str, record: dict, verify_hashes: bool) -> GraphEntry:
    _require(record, ("file", "sha256", "opset", "precision", "inputs", "outputs"), f"graphs.{name}", manifest_path)
    path = root / record["file"]
    if not path.is_file():
        raise BundleError(f"{root}: graph {name} is missing ({record['file']} not found)")
    spec = GRAPHS[name]
    inputs = tuple(item["name"] for item in record["inputs"])
    outputs = tuple(item["name"] for item in record["outputs"])
    if inputs != spec.inputs or outputs != spec.outputs:
        raise BundleError(
            f"{manifest_path}: graph {name} has inputs {inputs} and outputs {outputs}; "
            f"this medsr expects {spec.inputs} -> {spec.outputs}"
        )
    if verify_hashes:
        actual = sha256_file(path)
        if actual != record["sha256"]:
            raise BundleError(
                f"{path}: sha256 mismatch: manifest says {record['sha256'][:16]}..., file is {actual[:16]}... "
                "(the graph was modified or corrupted after export)"
            )
    return GraphEntry(name, path, record["sha256"], int(record["opset"]), record["precision"], inputs, outputs)


def load_bundle(path: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
    """Read ``path/medsr.json`` and check it against the format and the graph files.

    Raises:
        BundleError: missing directory or manifest, unreadable JSON, unknown format version, missing fields,
            unknown or missing graphs, I/O names that differ from medsr.bundle.graphs, sha256 mismatch.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: model bundle directory not found")
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not a medsr bundle ({MANIFEST_NAME} not found)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path}: manifest must be a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: unknown format_version {version!r}; this medsr reads version {FORMAT_VERSION}"
        )
    _require(manifest, _REQUIRED_SECTIONS, "the manifest", manifest_path)
    _require(manifest["task"], _TASK_FIELDS, "task", manifest_path)
    _require(manifest["vae"], _VAE_FIELDS, "vae", manifest_path)
    _require(manifest["denoiser"], ("prediction_type",), "denoiser", manifest_path)
    try:
        Conditioning.from_manifest(manifest["denoiser"])
    except BundleError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    unknown = sorted(set(manifest["graphs"]) - set(GRAPHS))
    missing = sorted(set(GRAPHS) - set(manifest["graphs"]))
    if unknown or missing:
        raise BundleError(f"{manifest_path}: graphs must be {sorted(GRAPHS)}; missing {missing}, unknown {unknown}")
    graphs = {
        name: _graph_entry(root, manifest_path, name, record, verify_hashes)
        for name, record in manifest["graphs"].items()
    }
    return Bundle(root=root, manifest=manifest, graphs=graphs)


def write_manifest(root: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest`` as ``root/medsr.json`` (indented, key order kept)."""
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path
