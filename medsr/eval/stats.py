"""Paired statistics between two configurations measured on the same images, and the screening regression.

Inputs ``a`` and ``b`` are 1-D arrays of one metric (e.g. PSNR in dB) over the same images in the same order
(:mod:`medsr.eval.compare` pairs them by image id). Differences are always ``a - b``. The tests follow the paper
(arXiv 2604.12152; docs/sources.md, "The method"): paired Wilcoxon signed-rank, Cohen's d with the pooled SD,
plus the paired d_z, and a bootstrap CI of the mean difference. Unlike the paper's script, which resampled ``a``
and ``b`` independently, the bootstrap here resamples image pairs, as the design is paired.

Randomness comes from an explicit ``np.random.Generator`` (or an int seed for one), so results are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from medsr.errors import InputError

ALTERNATIVES = ("two-sided", "greater", "less")
_BOOT_CHUNK = 2**22
"""Most resampled values held at once by the bootstrap (32 MiB of float64), whatever n_boot x n is."""


def _sample(name: str, x, min_n: int = 2) -> np.ndarray:
    """Return ``x`` as a finite float64 1-D array of at least ``min_n`` values, or raise naming ``name``."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D (one value per image), got shape {arr.shape}")
    if arr.size < min_n:
        raise InputError(f"{name} needs at least {min_n} values, got {arr.size}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise InputError(f"{name} has non-finite values at positions {bad[:10].tolist()}")
    return arr


def paired_differences(a, b) -> np.ndarray:
    """``a - b`` for two equally long finite 1-D samples of at least 2 pairs."""
    a, b = _sample("a", a), _sample("b", b)
    if a.shape != b.shape:
        raise InputError(f"paired samples must have the same length, got {a.size} and {b.size}")
    return a - b


def _rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _alpha(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise InputError(f"confidence must be in (0, 1), got {confidence!r}")
    return 1.0 - confidence


def _check_n_boot(n_boot: int) -> None:
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 100):
        raise InputError(f"n_boot must be an int >= 100, got {n_boot!r}")


@dataclass(frozen=True)
class MeanDifference:
    """Mean of ``a - b`` with its percentile-bootstrap confidence interval."""

    mean_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    n_boot: int


def bootstrap_mean_difference(
    a, b, *, n_boot: int = 10_000, confidence: float = 0.95, rng: np.random.Generator | int = 0
) -> MeanDifference:
    """Mean paired difference ``mean(a - b)`` and its percentile bootstrap CI over resampled image pairs.

    Each of ``n_boot`` replicates draws n pairs with replacement and takes the mean difference; the interval is the
    ((1 - confidence) / 2, (1 + confidence) / 2) quantiles of the replicates.

    Args:
        a, b: (n,) paired values of one metric, n >= 2.
        n_boot: number of bootstrap replicates (>= 100).
        confidence: coverage of the interval.
        rng: a Generator, or an int seed for a fresh one.
    """
    diff = paired_differences(a, b)
    alpha = _alpha(confidence)
    _check_n_boot(n_boot)
    gen = _rng(rng)
    n = diff.size
    rows = max(1, _BOOT_CHUNK // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        means[start:stop] = diff[gen.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return MeanDifference(float(diff.mean()), float(low), float(high), confidence, n, n_boot)


class WilcoxonResult(NamedTuple):
    """The signed-rank statistic and its p-value."""

    statistic: float
    p_value: float


def wilcoxon_signed_rank(a, b, *, alternative: str = "two-sided") -> WilcoxonResult:
    """Paired Wilcoxon signed-rank test of ``a - b`` by ``scipy.stats.wilcoxon`` (zero differences dropped).

    Args:
        a, b: (n,) paired values.
        alternative: ``"two-sided"``; ``"greater"`` (a tends to exceed b); ``"less"`` (a tends to fall below b).

    Returns:
        scipy's statistic (the sum of ranks of the positive differences for one-sided tests, the smaller rank sum
        for two-sided) and p-value; (0.0, 1.0) when every difference is zero, where scipy warns and has no test.
    """
    if alternative not in ALTERNATIVES:
        raise InputError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    diff = paired_differences(a, b)
    if not np.any(diff):
        return WilcoxonResult(0.0, 1.0)
    from scipy.stats import wilcoxon

    result = wilcoxon(diff, alternative=alternative)
    return WilcoxonResult(float(result.statistic), float(result.pvalue))


def _standardized(mean: float, sd: float) -> float:
    """mean / sd, with sd = 0 giving +-inf for a nonzero mean and NaN for a zero one."""
    if sd > 0:
        return mean / sd
    return math.copysign(math.inf, mean) if mean != 0 else math.nan


def cohens_d_pooled(a, b) -> float:
    """Cohen's d with the pooled SD, as the paper reports: (mean a - mean b) / s_p.

    s_p = sqrt(((n_a - 1) var_a + (n_b - 1) var_b) / (n_a + n_b - 2)), sample variances (ddof = 1). It ignores the
    pairing; for paired data see :func:`cohens_dz`.
    """
    a, b = _sample("a", a), _sample("b", b)
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    return _standardized(float(a.mean() - b.mean()), math.sqrt(pooled))


def cohens_dz(a, b) -> float:
    """Paired effect size d_z = mean(a - b) / sd(a - b) (ddof = 1); d_z sqrt(n) is the paired t statistic."""
    diff = paired_differences(a, b)
    return _standardized(float(diff.mean()), float(diff.std(ddof=1)))


@dataclass(frozen=True)
class ScreeningFit:
    """Least-squares line SR PSNR = slope * AE PSNR + intercept with a bootstrap band of the fitted line.

    ``band_low``/``band_high`` are pointwise quantiles of the refitted lines over ``x_grid`` (n_grid,) arrays;
    ``n_boot_used`` counts the replicates kept (a resample with a single distinct x has no line and is dropped).
    """

    slope: float
    intercept: float
    r_squared: float
    p_value: float
    n: int
    x_grid: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray
    confidence: float
    n_boot_used: int


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise least-squares slope and intercept of (B, n) samples; slope is NaN for a row of constant x."""
    x_mean, y_mean = x.mean(axis=1), y.mean(axis=1)
    dx = x - x_mean[:, None]
    sxx = np.sum(dx * dx, axis=1)
    sxy = np.sum(dx * (y - y_mean[:, None]), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(sxx > 0, sxy / sxx, np.nan)
    return slope, y_mean - slope * x_mean


def screening_regression(
    ae_psnr,
    sr_psnr,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | int = 0,
    n_grid: int = 50,
) -> ScreeningFit:
    """Regress SR PSNR on autoencoder-ceiling PSNR across configurations and datasets (the paper's R^2 = 0.67).

    The point fit is ``scipy.stats.linregress``; the band resamples the (x, y) points with replacement, refits, and
    takes the pointwise ((1 - confidence) / 2, (1 + confidence) / 2) quantiles of the lines over ``x_grid``, n_grid
    points spanning the observed x.

    Args:
        ae_psnr: (n,) mean autoencoder-ceiling PSNR (dB) of each configuration, n >= 3, not all equal.
        sr_psnr: (n,) mean SR PSNR (dB) of the same configurations.
    """
    x, y = _sample("ae_psnr", ae_psnr, min_n=3), _sample("sr_psnr", sr_psnr, min_n=3)
    if x.shape != y.shape:
        raise InputError(f"ae_psnr and sr_psnr must have the same length, got {x.size} and {y.size}")
    if np.ptp(x) == 0:
        raise InputError(f"ae_psnr values are all equal ({x[0]}): no line can be fitted")
    alpha = _alpha(confidence)
    _check_n_boot(n_boot)
    if not (isinstance(n_grid, (int, np.integer)) and n_grid >= 2):
        raise InputError(f"n_grid must be an int >= 2, got {n_grid!r}")
    from scipy.stats import linregress

    fit = linregress(x, y)
    idx = _rng(rng).integers(0, x.size, size=(n_boot, x.size))
    slopes, intercepts = _ols(x[idx], y[idx])
    keep = np.isfinite(slopes)
    grid = np.linspace(x.min(), x.max(), n_grid)
    lines = intercepts[keep, None] + slopes[keep, None] * grid[None, :]
    low, high = np.quantile(lines, [alpha / 2, 1 - alpha / 2], axis=0)
    return ScreeningFit(
        float(fit.slope),
        float(fit.intercept),
        float(fit.rvalue**2),
        float(fit.pvalue),
        x.size,
        grid,
        low,
        high,
        confidence,
        int(keep.sum()),
    )
