"""medsr.eval.stats against scipy.stats and hand-built examples."""

import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from medsr.errors import InputError
from medsr.eval import stats


def _paired(n=40, shift=0.3, seed=1):
    rng = np.random.default_rng(seed)
    a = rng.normal(25.0, 1.0, n)
    return a, a - shift + rng.normal(0.0, 0.5, n)


def test_bootstrap_is_seeded_and_reproducible():
    a, b = _paired()
    first = stats.bootstrap_mean_difference(a, b, n_boot=2000, rng=7)
    assert first == stats.bootstrap_mean_difference(a, b, n_boot=2000, rng=np.random.default_rng(7))
    assert first != stats.bootstrap_mean_difference(a, b, n_boot=2000, rng=8)
    assert first.mean_diff == pytest.approx(np.mean(a - b), rel=1e-14)
    assert first.ci_low < first.mean_diff < first.ci_high
    assert (first.n, first.n_boot, first.confidence) == (40, 2000, 0.95)


def test_bootstrap_matches_scipy_percentile_interval():
    a, b = _paired()
    ours = stats.bootstrap_mean_difference(a, b, n_boot=20_000, rng=0)
    ref = scipy_stats.bootstrap(
        (a - b,), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(1)
    ).confidence_interval
    standard_error = np.std(a - b, ddof=1) / np.sqrt(a.size)
    # two independent Monte Carlo estimates of the same quantiles: agree to a small fraction of the SE
    assert ours.ci_low == pytest.approx(ref.low, abs=0.05 * standard_error)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.05 * standard_error)


def test_bootstrap_chunking_does_not_change_the_draws(monkeypatch):
    a, b = _paired(n=30)
    whole = stats.bootstrap_mean_difference(a, b, n_boot=1000, rng=3)
    monkeypatch.setattr(stats, "_BOOT_CHUNK", 30 * 7)  # 7 replicates per chunk
    assert stats.bootstrap_mean_difference(a, b, n_boot=1000, rng=3) == whole


def test_bootstrap_ci_covers_true_difference():
    # 200 synthetic studies with true mean difference 0.5: the 95 % percentile interval (n = 30) should cover it
    # about 93-95 % of the time; a broken interval (e.g. SE instead of SD scale, or unpaired) falls far outside
    rng = np.random.default_rng(11)
    covered = 0
    for _ in range(200):
        b = rng.normal(20.0, 2.0, 30)
        a = b + 0.5 + rng.normal(0.0, 1.0, 30)
        ci = stats.bootstrap_mean_difference(a, b, n_boot=1000, rng=rng)
        covered += ci.ci_low <= 0.5 <= ci.ci_high
    assert 0.88 <= covered / 200 <= 0.99


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_boot": 10}, "n_boot"),  # too few replicates
        ({"confidence": 1.0}, "confidence"),  # not in (0, 1)
    ],
)
def test_bootstrap_rejects_bad_options(kwargs, match):
    a, b = _paired()
    with pytest.raises(InputError, match=match):
        stats.bootstrap_mean_difference(a, b, **kwargs)


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ([1.0, math.nan, 3.0], [1.0, 2.0, 3.0], r"positions \[1\]"),
        ([1.0], [2.0], "at least 2"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
    ],
)
def test_paired_differences_rejects_bad_samples(a, b, match):
    with pytest.raises(InputError, match=match):
        stats.paired_differences(a, b)


def test_wilcoxon_exact_hand_example():
    # 5 positive, distinct differences: T+ = 15 is the most extreme of 2^5 equally likely sign patterns
    a, b = np.arange(1.0, 6.0) + 10, np.full(5, 10.0)
    assert stats.wilcoxon_signed_rank(a, b).p_value == pytest.approx(2 / 32)
    greater = stats.wilcoxon_signed_rank(a, b, alternative="greater")
    assert greater == (15.0, pytest.approx(1 / 32))
    assert stats.wilcoxon_signed_rank(a, b, alternative="less").p_value == pytest.approx(1.0)


def test_wilcoxon_matches_scipy_and_direction():
    a, b = _paired(n=60, shift=0.2)
    ours = stats.wilcoxon_signed_rank(a, b)
    ref = scipy_stats.wilcoxon(a, b)
    assert ours == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert stats.wilcoxon_signed_rank(a, b, alternative="greater").p_value < 0.01  # a is higher
    assert stats.wilcoxon_signed_rank(a, b, alternative="less").p_value > 0.99


def test_wilcoxon_all_zero_differences_and_bad_alternative():
    x = np.array([1.0, 2.0, 3.0])
    assert stats.wilcoxon_signed_rank(x, x) == (0.0, 1.0)
    with pytest.raises(InputError, match="alternative"):
        stats.wilcoxon_signed_rank(x, x + 1, alternative="bigger")


def test_cohens_d_pooled_hand_and_ttest_ind():
    assert stats.cohens_d_pooled([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(-3.0)  # both SDs 1
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 1.0, 7), rng.normal(0.0, 2.0, 11)
    d = stats.cohens_d_pooled(a, b)
    t = scipy_stats.ttest_ind(a, b, equal_var=True).statistic  # t = d sqrt(n_a n_b / (n_a + n_b))
    assert d * math.sqrt(7 * 11 / 18) == pytest.approx(t, rel=1e-12)


def test_cohens_dz_hand_and_ttest_rel():
    assert stats.cohens_dz([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)  # diffs 1, 2, 3
    a, b = _paired(n=25)
    assert stats.cohens_dz(a, b) * math.sqrt(25) == pytest.approx(scipy_stats.ttest_rel(a, b).statistic, rel=1e-12)


def test_effect_sizes_with_zero_spread():
    assert stats.cohens_dz([2.0, 3.0], [1.0, 2.0]) == math.inf  # constant positive difference
    assert math.isnan(stats.cohens_dz([1.0, 2.0], [1.0, 2.0]))
    assert stats.cohens_d_pooled([1.0, 1.0], [2.0, 2.0]) == -math.inf


def test_screening_regression_matches_linregress():
    x = np.array([23.92, 31.39, 32.02, 27.85, 37.87, 36.93])  # the paper's autoencoder ceilings (dB)
    y = np.array([22.08, 23.40, 25.13, 24.00, 26.23, 28.73])  # and SR PSNRs
    fit = stats.screening_regression(x, y, n_boot=1000, rng=0)
    ref = scipy_stats.linregress(x, y)
    assert (fit.slope, fit.intercept) == (pytest.approx(ref.slope), pytest.approx(ref.intercept))
    assert fit.r_squared == pytest.approx(ref.rvalue**2)
    assert fit.p_value == pytest.approx(ref.pvalue)
    assert fit.n == 6 and fit.x_grid[0] == x.min() and fit.x_grid[-1] == x.max()
    line = fit.intercept + fit.slope * fit.x_grid
    assert np.all(fit.band_low <= line + 1e-9) and np.all(line <= fit.band_high + 1e-9)
    again = stats.screening_regression(x, y, n_boot=1000, rng=0)
    np.testing.assert_array_equal(again.band_low, fit.band_low)


def test_screening_band_collapses_on_exact_line_and_drops_degenerate_resamples():
    x = np.array([20.0, 25.0, 30.0])
    fit = stats.screening_regression(x, 0.5 * x + 10.0, n_boot=2000, rng=1)
    assert fit.r_squared == pytest.approx(1.0)
    np.testing.assert_allclose(fit.band_low, 0.5 * fit.x_grid + 10.0, atol=1e-9)
    np.testing.assert_allclose(fit.band_high, 0.5 * fit.x_grid + 10.0, atol=1e-9)
    # a resample of 3 points has one distinct x with probability 3/27: those replicates are dropped
    assert 2000 - 400 < fit.n_boot_used < 2000


def test_vectorized_ols_matches_linregress():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    slopes, intercepts = stats._ols(x, y)
    for row in range(5):
        ref = scipy_stats.linregress(x[row], y[row])
        assert (slopes[row], intercepts[row]) == (pytest.approx(ref.slope), pytest.approx(ref.intercept))


@pytest.mark.parametrize(
    "x, y, match",
    [
        ([1.0, 2.0], [1.0, 2.0], "at least 3"),  # too few configurations
        ([5.0, 5.0, 5.0], [1.0, 2.0, 3.0], "all equal"),  # no spread in x
        ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], "same length"),
    ],
)
def test_screening_regression_rejects(x, y, match):
    with pytest.raises(InputError, match=match):
        stats.screening_regression(x, y)
