"""Contrast augmentation: random intensity remappings that show a denoiser trained on one T1 brain other contrasts.

The default model's only MRI training subject is a T1 scan, where cerebrospinal fluid is dark; on a T2* EPI it is
bright. A random piecewise-linear curve applied to the whole HR slice before it is degraded (so LR stays the exact
degradation of the new HR) keeps the anatomy's edges and reorders the tissues' brightness, which is what differs
between contrasts. The darkest intensities stay dark, since air is dark in every MRI contrast. docs/default_model.md
measures what it buys the default model on unseen subjects and what it costs on the training subject.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medsr.data.pairs import Slice

#: Knots of the remapping curve, evenly spaced over the [0, 1] intensity range; the first stays at 0.
CURVE_KNOTS = 6
#: Lowest value a knot after the first may take: tissue never falls to the level of air.
CURVE_FLOOR = 0.05


def random_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (H, W) in [-1, 1] through a random piecewise-linear curve: -1 stays -1, the other knots are uniform
    in [CURVE_FLOOR, 1], and the curve is rescaled so that its highest knot maps to 1. float32, in [-1, 1]."""
    knots = np.linspace(0.0, 1.0, CURVE_KNOTS)
    values = np.concatenate([[0.0], rng.uniform(CURVE_FLOOR, 1.0, CURVE_KNOTS - 1)])
    remapped = np.interp((np.asarray(image, np.float64) + 1.0) / 2.0, knots, values) / values.max()
    return (2.0 * remapped - 1.0).astype(np.float32)


def with_contrast_copies(slices: list[Slice], copies: int, rng: np.random.Generator) -> list[Slice]:
    """``slices`` followed by ``copies`` remapped copies of each (each copy with its own curve), in a fixed order."""
    out = list(slices)
    for _ in range(copies):
        out.extend(replace(item, image=random_contrast(item.image, rng)) for item in slices)
    return out
