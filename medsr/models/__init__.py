"""Model bundles shipped inside the package: ``default/`` is the bundle medsr-infer uses without --model,
``through-plane/`` the one it uses with --through-plane."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE = Path(__file__).parent / "default"
THROUGH_PLANE_BUNDLE = Path(__file__).parent / "through-plane"
