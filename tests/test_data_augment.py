"""Contrast augmentation (medsr.data.augment): random intensity curves that keep air dark and reorder tissues."""

from __future__ import annotations

import numpy as np
import pytest

from medsr.data.augment import random_contrast, with_contrast_copies
from medsr.data.pairs import Slice

RAMP = np.linspace(-1.0, 1.0, 1001, dtype=np.float32)[None]  # every intensity, in order


def test_a_curve_keeps_air_dark_spans_the_range_and_is_reproducible():
    for seed in range(20):
        out = random_contrast(RAMP, np.random.default_rng(seed))
        assert out.dtype == np.float32 and out.shape == RAMP.shape
        assert out[0, 0] == -1.0 and out.max() == pytest.approx(1.0, abs=1e-6) and out.min() == -1.0
        # tissue (above the first knot) never falls back to the level of air
        assert out[0, RAMP[0] >= -0.6].min() > -1.0
        np.testing.assert_array_equal(out, random_contrast(RAMP, np.random.default_rng(seed)))


def test_curves_reorder_tissues_like_another_contrast():
    """A T1 -> T2-like change makes dark tissue bright and bright tissue dark: some curves must be non-monotonic."""
    rng = np.random.default_rng(0)
    orders_reversed = 0
    for _ in range(20):
        out = random_contrast(RAMP, rng)[0]
        grey, white = out[np.searchsorted(RAMP[0], 0.2)], out[np.searchsorted(RAMP[0], 0.8)]
        orders_reversed += grey > white
    assert 0 < orders_reversed < 20


def test_copies_follow_the_originals_each_with_its_own_curve():
    rng = np.random.default_rng(1)
    slices = [Slice("s", "mri", 2, i, rng.uniform(-1, 1, (8, 8)).astype(np.float32)) for i in range(3)]
    out = with_contrast_copies(slices, 2, np.random.default_rng(2))
    assert len(out) == 9 and out[:3] == slices
    assert [(s.source, s.index) for s in out[3:]] == [("s", i) for i in range(3)] * 2
    assert not np.array_equal(out[3].image, out[6].image)  # the same slice, two different curves
    assert with_contrast_copies(slices, 0, rng) == slices
