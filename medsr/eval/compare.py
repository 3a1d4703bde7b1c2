"""Paired comparison of fidelity summaries: the logic behind ``medsr-eval compare A.json B.json ...``.

A fidelity summary is the JSON file ``medsr-eval fidelity`` writes for one configuration on one dataset::

    {
      "config": "medvae-ddim",      # configuration name (autoencoder + denoiser + sampler)
      "dataset": "colin27-axial",   # image set; only summaries of the same dataset are paired
      "images": {                   # per-image metrics keyed by image id (any string, unique)
        "slice_010": {"psnr": 25.1, "ssim": 0.81, "ms_ssim": null, "wavelet_psnr_cD1": 18.2,
                      "ae_psnr": 27.0, "hallucination_rate": 0.012, "loss_rate": 0.010},
        ...
      },
      "summary": {...}              # free-form aggregates for people (optional); compare recomputes what it uses
    }

Metric names are the columns of :func:`medsr.eval.metrics.image_metrics`. A value is a number or null (undefined
for that image, e.g. MS-SSIM of an image under 161 px); Python's json ``Infinity`` (PSNR of an exact image) is read
too. Images are paired strictly by id, never by position (the paper's scripts paired sorted file lists and
mismatched ids >= 10). Differences are always first file minus second file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import numpy as np

from medsr.errors import InputError
from medsr.eval import stats
from medsr.eval.metrics import cohens_h, wavelet_key

DEFAULT_METRICS = ("psnr", "ssim", "ms_ssim", wavelet_key("cD1"))
"""Metrics given paired statistics by default; cD1 is the finest diagonal band, where the paper's gains sit."""
RATE_METRICS = ("hallucination_rate", "loss_rate")
"""Per-image pixel fractions compared by Cohen's h of their means."""
_PREVIEW = 10


@dataclass(frozen=True)
class FidelitySummary:
    """One parsed fidelity summary; ``images[id][metric]`` is a float or None (undefined)."""

    config: str
    dataset: str
    images: dict[str, dict[str, float | None]]
    summary: dict = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def label(self) -> str:
        """``config`` and where it came from, for messages."""
        return f"{self.config!r} ({self.source})"


def _name(data: Mapping, key: str, source: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise InputError(f"{source}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _record(image_id: str, record, source: str) -> dict[str, float | None]:
    if not isinstance(record, Mapping):
        raise InputError(f"{source}: image {image_id!r} must map metric names to values, got {record!r}")
    out = {}
    for metric, value in record.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{source}: image {image_id!r} metric {metric!r} must be a number or null, got {value!r}")
        out[str(metric)] = None if value is None else float(value)
    return out


def parse_summary(data: Mapping, source: str = "<memory>") -> FidelitySummary:
    """Validate a decoded fidelity summary (see the module docstring) and return it; ``source`` names it in errors."""
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: a fidelity summary must be a JSON object, got {type(data).__name__}")
    images = data.get("images")
    if not isinstance(images, Mapping) or not images:
        raise InputError(f"{source}: 'images' must be a non-empty object keyed by image id, got {images!r:.80}")
    summary = data.get("summary", {})
    if not isinstance(summary, Mapping):
        raise InputError(f"{source}: 'summary' must be an object, got {summary!r:.80}")
    return FidelitySummary(
        config=_name(data, "config", source),
        dataset=_name(data, "dataset", source),
        images={str(i): _record(str(i), rec, source) for i, rec in images.items()},
        summary=dict(summary),
        source=source,
    )


def load_summary(path) -> FidelitySummary:
    """Read and validate a fidelity summary JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read fidelity summary {path}: {exc}") from exc
    return parse_summary(data, source=str(path))


def _preview(ids) -> str:
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:_PREVIEW])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > _PREVIEW else "")


class Pairing(NamedTuple):
    """Image ids common to two summaries (sorted) and those only one of them has."""

    ids: list[str]
    only_a: list[str]
    only_b: list[str]


def pair_ids(a: FidelitySummary, b: FidelitySummary, *, intersect: bool = False) -> Pairing:
    """Pair two summaries by image id.

    Raises:
        InputError: naming the ids found in one summary only, unless ``intersect`` (then they are dropped and
            listed in the result); or when no id is shared at all.
    """
    only_a, only_b = sorted(set(a.images) - set(b.images)), sorted(set(b.images) - set(a.images))
    common = sorted(set(a.images) & set(b.images))
    if (only_a or only_b) and not intersect:
        raise InputError(
            f"{a.label} and {b.label} cover different images: only in {a.config!r}: [{_preview(only_a)}]; "
            f"only in {b.config!r}: [{_preview(only_b)}]; use the intersection option (--intersect) to compare "
            f"the {len(common)} shared images"
        )
    if not common:
        raise InputError(f"{a.label} and {b.label} share no image id")
    return Pairing(common, only_a, only_b)


def _values(s: FidelitySummary, ids: Sequence[str], metric: str) -> np.ndarray | None:
    """(len(ids),) float values of ``metric`` (NaN where null); None when no image of ``s`` has the metric."""
    lacking = [i for i in ids if metric not in s.images[i]]
    if len(lacking) == len(ids):
        return None
    if lacking:
        raise InputError(f"{s.label}: images [{_preview(lacking)}] lack metric {metric!r} that other images have")
    return np.array([math.nan if s.images[i][metric] is None else s.images[i][metric] for i in ids])


def _paired_metric(va: np.ndarray, vb: np.ndarray, alternative: str, n_boot: int, confidence: float, seed: int) -> dict:
    """Paired statistics of one metric over the pairs where both values are finite (needs >= 2)."""
    finite = np.isfinite(va) & np.isfinite(vb)
    a, b = va[finite], vb[finite]
    diff = stats.bootstrap_mean_difference(a, b, n_boot=n_boot, confidence=confidence, rng=seed)
    test = stats.wilcoxon_signed_rank(a, b, alternative=alternative)
    return {
        "n": int(finite.sum()),
        "n_excluded": int((~finite).sum()),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_diff": diff.mean_diff,
        "ci_low": diff.ci_low,
        "ci_high": diff.ci_high,
        "wilcoxon_statistic": test.statistic,
        "p_value": test.p_value,
        "cohens_d": stats.cohens_d_pooled(a, b),
        "cohens_dz": stats.cohens_dz(a, b),
    }


def _rate(va: np.ndarray, vb: np.ndarray) -> dict:
    finite = np.isfinite(va) & np.isfinite(vb)
    mean_a, mean_b = float(va[finite].mean()), float(vb[finite].mean())
    return {"n": int(finite.sum()), "mean_a": mean_a, "mean_b": mean_b, "cohens_h": cohens_h(mean_a, mean_b)}


def compare_pair(
    a: FidelitySummary,
    b: FidelitySummary,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    intersect: bool = False,
    alternative: str = "two-sided",
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired statistics of ``a`` against ``b`` over the images they share, by id.

    For each metric of ``metrics`` both summaries have: n, means, mean difference a - b with its bootstrap CI,
    Wilcoxon signed-rank (``alternative`` as in :func:`medsr.eval.stats.wilcoxon_signed_rank`), Cohen's d (pooled)
    and d_z, over the pairs where both values are finite. Metrics neither has, or with < 2 finite pairs, are listed
    under ``skipped`` with the reason. Hallucination and loss rates, where both summaries have them, get Cohen's h
    of their means over the shared images (``rates``). Each metric's bootstrap uses a fresh Generator seeded with
    ``seed``, so results do not depend on the other files compared.
    """
    pairing = pair_ids(a, b, intersect=intersect)
    report = {
        "dataset": a.dataset,
        "a": a.config,
        "b": b.config,
        "n_paired": len(pairing.ids),
        "n_dropped_a": len(pairing.only_a),
        "n_dropped_b": len(pairing.only_b),
        "metrics": {},
        "rates": {},
        "skipped": {},
    }
    for metric in list(metrics) + list(RATE_METRICS):
        va, vb = _values(a, pairing.ids, metric), _values(b, pairing.ids, metric)
        if va is None or vb is None:
            if metric not in RATE_METRICS:
                report["skipped"][metric] = f"not in {a.config!r}" if va is None else f"not in {b.config!r}"
            continue
        n_finite = int(np.sum(np.isfinite(va) & np.isfinite(vb)))
        if n_finite < 2:
            report["skipped"][metric] = f"{n_finite} image(s) with finite values in both"
        elif metric in RATE_METRICS:
            report["rates"][metric] = _rate(va, vb)
        else:
            report["metrics"][metric] = _paired_metric(va, vb, alternative, n_boot, confidence, seed)
    return report


def _mean_finite(s: FidelitySummary, metric: str) -> float | None:
    values = _values(s, list(s.images), metric)
    if values is None or not np.any(np.isfinite(values)):
        return None
    return float(np.mean(values[np.isfinite(values)]))


def screening(
    summaries: Sequence[FidelitySummary], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Screening regression of mean SR PSNR on mean autoencoder-ceiling PSNR, one point per summary.

    Summaries without ``ae_psnr`` (baselines) give no point. Returns ``{"points": [...], "fit": None, "note": why}``
    with fewer than 3 points, else ``fit`` holds the fields of :class:`medsr.eval.stats.ScreeningFit` (arrays as lists).
    """
    points = []
    for s in summaries:
        x, y = _mean_finite(s, "ae_psnr"), _mean_finite(s, "psnr")
        if x is not None and y is not None:
            points.append({"config": s.config, "dataset": s.dataset, "ae_psnr": x, "sr_psnr": y})
    if len(points) < 3:
        return {"points": points, "fit": None, "note": f"needs >= 3 summaries with ae_psnr, got {len(points)}"}
    fit = stats.screening_regression(
        [p["ae_psnr"] for p in points],
        [p["sr_psnr"] for p in points],
        n_boot=n_boot,
        confidence=confidence,
        rng=seed,
    )
    fields = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(fit).items()}
    return {"points": points, "fit": fields, "note": None}


def compare_summaries(summaries: Sequence[FidelitySummary], **options) -> dict:
    """Compare every two summaries of the same dataset (in the order given) and run the screening regression.

    Args:
        summaries: two or more summaries with distinct (config, dataset).
        **options: ``metrics``, ``intersect``, ``alternative``, ``n_boot``, ``confidence``, ``seed`` of
            :func:`compare_pair` (``confidence`` and ``seed`` also drive the regression's band).

    Returns:
        ``{"configs": [...], "pairs": [compare_pair reports], "screening": screening report}``.
    """
    if len(summaries) < 2:
        raise InputError(f"compare needs at least 2 fidelity summaries, got {len(summaries)}")
    seen = {}
    for s in summaries:
        key = (s.config, s.dataset)
        if key in seen:
            raise InputError(f"{s.label} and {seen[key].label} are both config {s.config!r} on {s.dataset!r}")
        seen[key] = s
    pairs = [compare_pair(a, b, **options) for a, b in combinations(summaries, 2) if a.dataset == b.dataset]
    band_options = {k: options[k] for k in ("confidence", "seed") if k in options}
    return {
        "configs": [
            {"config": s.config, "dataset": s.dataset, "n_images": len(s.images), "source": s.source} for s in summaries
        ],
        "pairs": pairs,
        "screening": screening(summaries, **band_options),
    }


def compare_files(paths: Sequence, **options) -> dict:
    """:func:`compare_summaries` of the fidelity summary JSON files at ``paths``."""
    return compare_summaries([load_summary(p) for p in paths], **options)


def _fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _pair_markdown(pair: dict) -> list[str]:
    dropped = pair["n_dropped_a"] + pair["n_dropped_b"]
    lines = [
        f"## {pair['dataset']}: {pair['a']} vs {pair['b']}",
        "",
        f"{pair['n_paired']} images paired by id" + (f" ({dropped} unpaired ids dropped)" if dropped else "") + ".",
        "",
        f"| metric | n | {pair['a']} | {pair['b']} | difference | 95% CI | Wilcoxon p | d (pooled) | d_z |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in pair["metrics"].items():
        lines.append(
            f"| {name} | {m['n']} | {_fmt(m['mean_a'])} | {_fmt(m['mean_b'])} | {_fmt(m['mean_diff'], '+.3f')} | "
            f"[{_fmt(m['ci_low'], '+.3f')}, {_fmt(m['ci_high'], '+.3f')}] | {_fmt(m['p_value'], '.2e')} | "
            f"{_fmt(m['cohens_d'], '.2f')} | {_fmt(m['cohens_dz'], '.2f')} |"
        )
    if pair["rates"]:
        lines += ["", f"| rate | n | {pair['a']} | {pair['b']} | Cohen's h |", "|---|---|---|---|---|"]
        for name, r in pair["rates"].items():
            lines.append(
                f"| {name} | {r['n']} | {_fmt(r['mean_a'], '.4f')} | {_fmt(r['mean_b'], '.4f')} | "
                f"{_fmt(r['cohens_h'], '+.3f')} |"
            )
    for name, why in pair["skipped"].items():
        lines += ["", f"Skipped {name}: {why}."]
    return lines + [""]


def _screening_markdown(screen: dict) -> list[str]:
    lines = ["## Screening regression: SR PSNR on autoencoder-ceiling PSNR", ""]
    fit = screen["fit"]
    if fit is None:
        return lines + [f"Not fitted: {screen['note']}.", ""]
    lines += [
        (
            f"SR PSNR = {_fmt(fit['slope'])} x AE PSNR {'-' if fit['intercept'] < 0 else '+'} "
            f"{_fmt(abs(fit['intercept']))} dB; R^2 = {_fmt(fit['r_squared'])} (n = {fit['n']}, "
            f"p = {_fmt(fit['p_value'], '.2e')})."
        ),
        "",
        "| config | dataset | AE PSNR (dB) | SR PSNR (dB) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {p['config']} | {p['dataset']} | {_fmt(p['ae_psnr'], '.2f')} | {_fmt(p['sr_psnr'], '.2f')} |"
        for p in screen["points"]
    ]
    return lines + [""]


def render_markdown(report: dict) -> str:
    """A markdown rendering of a :func:`compare_summaries` report: one table per pair, then the regression."""
    lines = ["# Paired comparison", ""]
    for pair in report["pairs"]:
        lines += _pair_markdown(pair)
    if not report["pairs"]:
        lines += ["No two summaries share a dataset: nothing to pair.", ""]
    return "\n".join(lines + _screening_markdown(report["screening"]))
