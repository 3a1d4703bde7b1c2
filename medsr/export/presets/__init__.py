"""Named model configurations, as ``medsr-export --preset NAME`` takes them: medsr's own (``own``: the test models
and the bundled default) and the paper's systems (``paper``), all instances of ``base.Preset``.

The modules import one way: ``base`` <- ``own``, ``paper`` <- this registry, so any of them can be the first
module an interpreter imports.
"""

from __future__ import annotations

from medsr.errors import InputError
from medsr.export.presets.base import Preset
from medsr.export.presets.own import own_presets
from medsr.export.presets.paper import paper_presets

__all__ = ["PRESETS", "Preset", "get_preset"]

PRESETS: dict[str, Preset] = {preset.name: preset for preset in (*own_presets(), *paper_presets())}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an InputError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
