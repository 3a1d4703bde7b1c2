"""Opening an exported model bundle and checking it against its manifest (docs/bundle.md).

A bundle is a directory holding ``medsr.json`` (the manifest, medsr.bundle.manifest) and the three ONNX graphs of
medsr.bundle.graphs. Nothing is trusted unchecked: the whole manifest is parsed and validated before anything else
(an unknown format version, a missing, unknown or out-of-range field is refused naming the file and the field), then
every graph must exist and match its sha256; each mismatch is a BundleError that names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medsr.bundle.conditioning import Conditioning
from medsr.bundle.manifest import GraphEntry, Manifest
from medsr.errors import BundleError

MANIFEST_NAME = "medsr.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its directory and its typed manifest. The properties are the fields the engine reads
    everywhere (sizes and the conditioning convention); everything else is ``bundle.manifest.<section>.<field>``."""

    root: Path
    manifest: Manifest

    @property
    def graphs(self) -> Mapping[str, GraphEntry]:
        """The manifest's graph entries by name, each with the ``path`` of its file."""
        return self.manifest.graphs

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def scale(self) -> int:
        return self.manifest.task.scale

    @property
    def scales(self) -> tuple[int, ...]:
        """Every factor the model serves (manifest ``task.scales``; ``(scale,)`` unless through-plane)."""
        return self.manifest.task.scales

    def with_scale(self, scale: int) -> Bundle:
        """This bundle at ``scale``, one of :attr:`scales`: the same root and graphs, a manifest whose task has that
        scale and the degradation at it (medsr.bundle.manifest.Task.with_scale); BundleError naming the bundle for
        another factor."""
        if scale == self.scale:
            return self
        try:
            task = self.manifest.task.with_scale(scale)
        except BundleError as exc:
            raise BundleError(f"{self.root}: model {self.name!r}: {exc}") from None
        return dataclasses.replace(self, manifest=dataclasses.replace(self.manifest, task=task))

    @property
    def plane(self) -> str:
        """``"in-plane"`` or ``"through-plane"`` (manifest ``task.plane``)."""
        return self.manifest.task.plane

    @property
    def factors(self) -> tuple[int, int]:
        """Upsampling factor of each plane axis (H, W): (s, s) in-plane, (1, s) through-plane."""
        return self.manifest.task.factors

    @property
    def image_channels(self) -> int:
        return self.manifest.task.image_channels

    @property
    def lr_multiple(self) -> int:
        """LR height and width are padded to a multiple of this before encoding."""
        return self.manifest.task.lr_multiple

    @property
    def vae_factor(self) -> int:
        return self.manifest.vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.manifest.vae.latent_channels

    @property
    def conditioning(self) -> Conditioning:
        """How the denoiser sees the LR slice (medsr.bundle.conditioning)."""
        return self.manifest.denoiser.conditioning

    def graph_path(self, name: str) -> Path:
        return self.graphs[name].path


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse and validate the manifest file ``path`` (see medsr.bundle.manifest)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from exc
    return Manifest.from_dict(data, path)


def load_bundle(path: str | os.PathLike, verify_hashes: bool = True) -> Bundle:
    """Read ``path/medsr.json``, validate every field, and check the graph files against it.

    Raises:
        BundleError: missing directory or manifest, unreadable JSON, any bad manifest field (naming the file and the
            field), a graph file that is missing or whose sha256 differs from the manifest.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: model bundle directory not found")
    if not manifest_path.is_file():
        raise BundleError(f"{root}: not a medsr bundle ({MANIFEST_NAME} not found)")
    manifest = read_manifest(manifest_path)
    for name, entry in manifest.graphs.items():
        if not entry.path.is_file():
            raise BundleError(f"{root}: graph {name} is missing ({entry.file} not found)")
        if verify_hashes:
            actual = sha256_file(entry.path)
            if actual != entry.sha256:
                raise BundleError(
                    f"{entry.path}: sha256 mismatch: manifest says {entry.sha256[:16]}..., file is {actual[:16]}... "
                    "(the graph was modified or corrupted after export)"
                )
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``root/medsr.json`` (indented, in the manifest's key order)."""
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
