"""The files ``medsr-eval fidelity`` writes into its output directory, each atomically:

- ``per_image.csv``: one row per (configuration, image id) with every metric column (empty where a configuration
  has no such metric, e.g. ``ae_psnr`` of a baseline; ``nan``/``inf`` written as such).
- ``fidelity_<config>.json``: one summary per configuration in the schema of :mod:`medsr.eval.compare`, ready for
  ``medsr-eval compare``; undefined values (NaN) are null.
- ``summary.md``: the mean of each headline metric per configuration.
- ``bands.png``: mean wavelet-band PSNR per configuration; ``panels/<id>.png``: LR / SR / HR / error panels of the
  model's first configuration for a few images.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np

from medsr.errors import OutputError
from medsr.eval.fidelity import DATA_RANGE, FidelityResult, ImageOutputs
from medsr.eval.figures import save_band_chart, save_image_panel
from medsr.eval.metrics import wavelet_band_names, wavelet_key
from medsr.io.atomic import write_text_atomic

CSV_NAME = "per_image.csv"
SUMMARY_NAME = "summary.md"
BANDS_NAME = "bands.png"
PANELS_DIR = "panels"
HEADLINE = (
    ("psnr", "PSNR dB", ".2f"),
    ("ssim", "SSIM", ".4f"),
    ("ms_ssim", "MS-SSIM", ".4f"),
    (wavelet_key("cD1"), "cD1 PSNR dB", ".2f"),
    ("ae_psnr", "AE ceiling dB", ".2f"),
    ("hallucination_rate", "hallucination", ".4f"),
    ("loss_rate", "loss", ".4f"),
    ("consistency_residual", "residual", ".2e"),
)


def summary_name(config: str) -> str:
    """File name of a configuration's summary: ``fidelity_<config>.json``, other characters than letters, digits
    and ``._+-`` replaced by ``_``."""
    return "fidelity_" + re.sub(r"[^A-Za-z0-9._+-]", "_", config) + ".json"


def panel_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", image_id) + ".png"


def output_paths(out_dir: Path, configs: list[str], panel_ids: list[str]) -> list[Path]:
    """Every file a run will write (checked before the run starts)."""
    names = [CSV_NAME, SUMMARY_NAME, BANDS_NAME] + [summary_name(c) for c in configs]
    return [out_dir / n for n in names] + [out_dir / PANELS_DIR / panel_name(i) for i in panel_ids]


def prepare_output_dir(out_dir: Path, configs: list[str], panel_ids: list[str], overwrite: bool) -> None:
    """Create ``out_dir`` (and its parents) and refuse files that exist, unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    existing = [p for p in output_paths(out_dir, configs, panel_ids) if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]}: output exists ({len(existing)} in {out_dir}); pass --overwrite to replace")
    try:
        (out_dir / PANELS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output directory: {exc.strerror or exc}") from exc


def finite_mean(values) -> float | None:
    """Mean of the finite values, None when there is none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def config_means(result: FidelityResult, config: str) -> dict[str, float | None]:
    rows = result.rows[config].values()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {column: finite_mean(row.get(column) for row in rows) for column in columns}


def _json_value(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def config_summary(result: FidelityResult, config: str, dataset: str, context: dict) -> dict:
    """The compare-schema summary of one configuration (``context`` goes into its ``summary`` for people)."""
    images = {i: {k: _json_value(v) for k, v in row.items()} for i, row in result.rows[config].items()}
    summary = {"n_images": len(images), "means": config_means(result, config), **context}
    if config in result.settings.model_configs:
        summary["consistency"] = result.settings.consistency[result.settings.model_configs.index(config)]
        summary["sr_seconds_per_slice"] = float(np.mean(result.sr_seconds))
    return {"config": config, "dataset": dataset, "images": images, "summary": summary}


def csv_text(result: FidelityResult) -> str:
    """The per-image table (see the module docstring)."""
    columns = list(dict.fromkeys(k for rows in result.rows.values() for row in rows.values() for k in row))
    where = {s.id: s for s in result.slices}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["config", "id", "source", "file", "axis", "index", *columns])
    for config, rows in result.rows.items():
        for image_id, row in rows.items():
            item = where[image_id]
            values = ["" if row.get(c) is None else repr(float(row[c])) for c in columns]
            writer.writerow([config, image_id, item.source, item.path.name, item.axis, item.index, *values])
    return buffer.getvalue()


def markdown_summary(result: FidelityResult, dataset: str) -> str:
    """One row per configuration: the means of :data:`HEADLINE` over the images (finite values only)."""
    lines = [
        f"# Fidelity on {dataset} ({len(result.slices)} images)",
        "",
        "| config | " + " | ".join(label for _, label, _ in HEADLINE) + " |",
        "|---" * (len(HEADLINE) + 1) + "|",
    ]
    for config in result.settings.configs:
        means = config_means(result, config)
        cells = ["n/a" if means.get(k) is None else format(means[k], spec) for k, _, spec in HEADLINE]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    seconds = float(np.mean(result.sr_seconds))
    return "\n".join(lines + ["", f"Model: {seconds:.3f} s per slice (encode, sampling, decode).", ""])


def write_report(
    out_dir: Path, result: FidelityResult, dataset: str, context: dict, panels: list[ImageOutputs]
) -> list[Path]:
    """Write every file of the module docstring into ``out_dir`` (prepared by :func:`prepare_output_dir`)."""
    written = []
    for config in result.settings.configs:
        path = out_dir / summary_name(config)
        text = json.dumps(config_summary(result, config, dataset, context), indent=1) + "\n"
        write_text_atomic(path, text)
        written.append(path)
    for name, text in ((CSV_NAME, csv_text(result)), (SUMMARY_NAME, markdown_summary(result, dataset))):
        write_text_atomic(out_dir / name, text)
        written.append(out_dir / name)
    bands = {c: {b: config_means(result, c).get(wavelet_key(b)) for b in wavelet_band_names()} for c in result.rows}
    bands = {c: {b: math.nan if v is None else v for b, v in values.items()} for c, values in bands.items()}
    written.append(save_band_chart(out_dir / BANDS_NAME, bands, title=f"Wavelet band PSNR on {dataset}"))
    model = result.settings.model_configs[0]
    for item in panels:
        path = out_dir / PANELS_DIR / panel_name(item.slice.id)
        title = f"{item.slice.id}: {model}"
        written.append(
            save_image_panel(path, item.lr, item.outputs[model], item.hr, data_range=DATA_RANGE, title=title)
        )
    return written
