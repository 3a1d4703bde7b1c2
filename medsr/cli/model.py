"""The model bundle a command runs: the one given with ``--model``, else the default bundled with medsr."""

from __future__ import annotations

from pathlib import Path

#: Help text of every ``--model`` option that falls back to the bundled default.
MODEL_HELP = "Model bundle directory (default: the bundled one)."


def load_model(model: Path | None):
    """The validated bundle at ``model``, or the bundled default (medsr.models.DEFAULT_BUNDLE) when None."""
    from medsr.bundle import load_bundle
    from medsr.errors import BundleError
    from medsr.models import DEFAULT_BUNDLE

    if model is None:
        if not (DEFAULT_BUNDLE / "medsr.json").is_file():
            raise BundleError("no default model is bundled with this installation; pass --model BUNDLE")
        model = DEFAULT_BUNDLE
    return load_bundle(model)
