"""Typed manifests for tests that run the pipeline on fake graphs: the shipped default model's manifest with the
sections a test sets replaced (its graph entries, provenance and validation are kept, and never opened)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from medsr.bundle import MANIFEST_NAME, Bundle, Manifest
from medsr.bundle.manifest import Denoiser, Task, Vae
from medsr.bundle.scheduler import SchedulerConfig

DEFAULT_MANIFEST = Path(__file__).parents[1] / "medsr" / "models" / "default" / MANIFEST_NAME


def shipped_manifest_dict() -> dict:
    """The JSON object of the shipped default model's medsr.json."""
    return json.loads(DEFAULT_MANIFEST.read_text(encoding="utf-8"))


def fake_bundle(task: Task, vae: Vae, denoiser: Denoiser, scheduler: SchedulerConfig, root: Path = Path(".")) -> Bundle:
    """A Bundle whose manifest has these sections (the rest from the shipped default model)."""
    shipped = Manifest.from_dict(shipped_manifest_dict(), DEFAULT_MANIFEST)
    manifest = dataclasses.replace(shipped, name="fake", task=task, vae=vae, denoiser=denoiser, scheduler=scheduler)
    return Bundle(root=root, manifest=manifest)
