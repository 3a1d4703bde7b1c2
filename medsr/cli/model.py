"""The model bundle a command runs: the one given with ``--model``, else one bundled with medsr."""

from __future__ import annotations

from pathlib import Path

import click

#: Help text of every ``--model`` option that falls back to the bundled default.
MODEL_HELP = "Model bundle directory (default: the bundled one)."
#: ``medsr-infer``'s, which falls back to the bundled model of the task asked for.
INFER_MODEL_HELP = "Model bundle directory (default: the bundled in-plane model, or with --through-plane the bundled through-plane one)."


def load_model(model: Path | None, through_plane: bool = False):
    """The validated bundle at ``model``, or when None the bundled default (medsr.models.DEFAULT_BUNDLE), or the
    bundled through-plane model (medsr.models.THROUGH_PLANE_BUNDLE) when ``through_plane``."""
    from medsr.bundle import load_bundle
    from medsr.errors import BundleError
    from medsr.models import DEFAULT_BUNDLE, THROUGH_PLANE_BUNDLE

    if model is None:
        model = THROUGH_PLANE_BUNDLE if through_plane else DEFAULT_BUNDLE
        if not (model / "medsr.json").is_file():
            kind = "through-plane model" if through_plane else "default model"
            raise BundleError(f"no {kind} is bundled with this installation; pass --model BUNDLE")
    return load_bundle(model)


def adapt_limit_options(command):
    """``--adapt-time`` and ``--adapt-steps``, the limits of ``--adapt`` (medsr-infer, medsr-eval through-plane)."""
    steps = click.option(
        "--adapt-steps", type=click.IntRange(min=1), help="With --adapt: fine-tune for at most this many steps."
    )
    time_limit = click.option(
        "--adapt-time",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="With --adapt: fine-tune for at most this long (default 150; no time limit with --adapt-steps alone).",
    )
    return time_limit(steps(command))


def adaptation(seed: int, seconds: float | None, steps: int | None):
    """(medsr.export.train.adapt, its AdaptConfig for ``--adapt``'s limits: the default time limit when neither is
    given): imported only here, so commands without --adapt never import PyTorch; a one-line BackendError without
    it."""
    from medsr.errors import BackendError

    try:
        from medsr.export.train import adapt
    except ImportError as exc:
        raise BackendError(f"--adapt needs PyTorch: pip install 'medsr[torch]' ({exc})") from exc
    limits = {} if seconds is None and steps is None else {"seconds": seconds, "steps": steps}
    return adapt, adapt.AdaptConfig(seed=seed, **limits)
