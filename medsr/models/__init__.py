"""Model bundles shipped inside the package. ``default/`` is the bundle medsr-infer uses without --model."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).parent / "default"
