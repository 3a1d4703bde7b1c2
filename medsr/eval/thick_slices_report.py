"""The files ``medsr-eval through-plane`` writes into its output directory, each atomically, none replaced without
``--overwrite`` (every path is checked before the run starts):

- ``through_plane.json``: the settings, what ran (model, ECLARE or why not), and per (volume, factor) every method's
  metrics (:func:`medsr.eval.thick_slices.volume_metrics`), seconds per volume and continuity profiles; NaN is null.
- ``through_plane.md``: the table of the headline metrics (foreground PSNR and SSIM over the volume and per
  orientation, continuity, seconds).
- ``panels/<volume>_x<s>.png``: the central axial, sagittal and coronal planes of the truth, the thick slices
  (nearest, on the HR grid) and each method; ``continuity/<volume>_x<s>.png``: the consecutive-plane differences
  along the slice axis of each method against the truth.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from medsr.errors import OutputError
from medsr.eval.figures import _new_figure, _save_png
from medsr.eval.thick_slices import ORIENTATIONS, TRUTH, FactorRun, orientation_axes
from medsr.io.atomic import write_text_atomic

JSON_NAME = "through_plane.json"
MARKDOWN_NAME = "through_plane.md"
PANELS_DIR = "panels"
CONTINUITY_DIR = "continuity"


def _stem(volume: str, factor: int) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", volume) + f"_x{factor}.png"


def output_paths(out_dir: Path, volumes: list[str], factors: list[int], figures: bool = True) -> list[Path]:
    """Every file a run will write."""
    paths = [out_dir / JSON_NAME, out_dir / MARKDOWN_NAME]
    if figures:
        for volume in volumes:
            for factor in factors:
                paths += [
                    out_dir / PANELS_DIR / _stem(volume, factor),
                    out_dir / CONTINUITY_DIR / _stem(volume, factor),
                ]
    return paths


def prepare_output_dir(out_dir: Path, volumes: list[str], factors: list[int], overwrite: bool, figures: bool) -> None:
    """Create ``out_dir`` and its figure folders; refuse existing outputs unless ``overwrite`` (one line)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    existing = [p for p in output_paths(out_dir, volumes, factors, figures) if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]}: output exists ({len(existing)} in {out_dir}); pass --overwrite to replace")
    try:
        for folder in (PANELS_DIR, CONTINUITY_DIR) if figures else ():
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create the output directory: {exc.strerror or exc}") from exc


def _clean(value):
    """JSON-ready: arrays to lists, NumPy scalars to Python ones, NaN and inf (not JSON) to null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(float(v)) for v in value.ravel()]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_record(run: FactorRun) -> dict:
    """One (volume, factor) of the JSON report."""
    metrics = {}
    for method, row in run.metrics.items():
        metrics[method] = {k: v for k, v in row.items() if k != "continuity_profile"}
    return {
        "volume": run.volume,
        "factor": run.factor,
        "fwhm": run.fwhm,
        "shape": list(run.shape),
        "lr_shape": list(run.lr.shape),
        "data_range": run.data_range,
        "foreground_fraction": float(run.mask.mean()),
        "seconds_per_volume": dict(run.seconds),
        "metrics": metrics,
        "continuity_profiles": {
            TRUTH: run.truth_profile,
            **{m: row["continuity_profile"] for m, row in run.metrics.items()},
        },
    }


def report_dict(runs: list[FactorRun], settings: dict, context: dict) -> dict:
    return _clean({"settings": settings, **context, "runs": [run_record(r) for r in runs]})


def _cell(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def markdown_table(runs: list[FactorRun]) -> str:
    """The headline table: one row per (volume, factor, method)."""
    header = (
        "| volume | factor | method | PSNR fg | SSIM fg | PSNR | "
        + " | ".join(f"PSNR fg {o}" for o in ORIENTATIONS)
        + " | "
        + " | ".join(f"SSIM fg {o}" for o in ORIENTATIONS)
        + " | continuity error | continuity ratio | s / volume |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for run in runs:
        for method, row in run.metrics.items():
            vol, ori = row["volume"], row["orientations"]
            cells = [
                run.volume,
                f"x{run.factor}",
                method,
                _cell(vol["psnr_fg"], ".2f"),
                _cell(vol["ssim_fg"], ".4f"),
                _cell(vol["psnr"], ".2f"),
                *(_cell(ori[o]["psnr_fg"], ".2f") for o in ORIENTATIONS),
                *(_cell(ori[o]["ssim_fg"], ".4f") for o in ORIENTATIONS),
                _cell(row["continuity_error"], ".2e"),
                _cell(row["continuity_ratio"], ".3f"),
                _cell(run.seconds.get(method), ".3f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(runs: list[FactorRun], settings: dict, notes: list[str]) -> str:
    profile = settings["profile"]
    fwhm = "the factor" if settings["fwhm"] is None else f"{settings['fwhm']:g} HR voxels"
    lines = [
        "# Through-plane fidelity on simulated thick slices",
        "",
        (
            f"{profile} slice profile, FWHM {fwhm}, slice axis {settings['axis']}; PSNR in dB with the peak the span "
            "of the truth's 0.5-99.5 percentile window; fg = over the foreground mask; per orientation: mean over "
            "the planes with foreground."
        ),
        "",
        markdown_table(runs),
        "",
    ]
    return "\n".join(lines + [f"- {note}" for note in notes] + [""])


def _display(plane: np.ndarray) -> np.ndarray:
    return np.asarray(plane, np.float64).T  # (X, Y) of medsr.io -> rows Y, columns X, drawn with origin lower


def save_orientation_panel(path: Path, run: FactorRun, axis: int, affine=None) -> Path:
    """Central axial, sagittal and coronal planes of the truth, the thick slices (nearest on the HR grid) and each
    method, one row each; PSNR fg over the volume in the row titles."""
    orientations = orientation_axes(np.eye(4) if affine is None else affine)
    lr_nearest = np.repeat(run.lr, run.factor, axis=axis)
    rows = [(TRUTH, run.truth), (f"thick slices x{run.factor}", lr_nearest), *run.outputs.items()]
    low, high = np.percentile(run.truth, (0.5, 99.5))
    fig = _new_figure(3.2 * len(ORIENTATIONS), 2.6 * len(rows))
    axes = fig.subplots(len(rows), len(ORIENTATIONS), squeeze=False)
    for r, (name, volume) in enumerate(rows):
        title = name
        if name in run.metrics:
            title += f" ({run.metrics[name]['volume']['psnr_fg']:.2f} dB fg)"
        for c, orientation in enumerate(ORIENTATIONS):
            along = orientations[orientation]
            plane = np.take(volume, volume.shape[along] // 2, axis=along)
            ax = axes[r, c]
            ax.imshow(_display(plane), cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(f"{title}: {orientation}" if c == 0 else orientation, fontsize=8)
    fig.suptitle(f"{run.volume}, x{run.factor}, slice axis {axis}")
    return _save_png(fig, path)


def save_continuity_plot(path: Path, run: FactorRun, axis: int) -> Path:
    """Mean |plane i+1 - plane i| within the mask along the slice axis, each method against the truth."""
    fig = _new_figure(7.0, 4.0)
    ax = fig.subplots()
    x = np.arange(len(run.truth_profile)) + 0.5
    ax.plot(x, run.truth_profile, color="black", linewidth=2, label=TRUTH)
    for method, row in run.metrics.items():
        ax.plot(x, row["continuity_profile"], label=f"{method} (error {row['continuity_error']:.2e})", linewidth=1)
    for i in range(1, run.lr.shape[axis]):
        ax.axvline(run.factor * i - 0.5, color="grey", alpha=0.15, linewidth=0.8)
    ax.set_xlabel(f"plane boundary along axis {axis} (grey: between measured slices)")
    ax.set_ylabel("mean |plane i+1 - plane i| (fg)")
    ax.set_title(f"Through-plane continuity, {run.volume} x{run.factor}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save_png(fig, path)


def write_report(
    out_dir: Path,
    runs: list[FactorRun],
    settings: dict,
    context: dict,
    notes: list[str],
    affines: dict[str, np.ndarray],
    figures: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write every file of the module docstring (the directory prepared by :func:`prepare_output_dir`)."""
    written = []
    if figures:
        for run in runs:
            stem = _stem(run.volume, run.factor)
            written.append(
                save_orientation_panel(out_dir / PANELS_DIR / stem, run, settings["axis"], affines[run.volume])
            )
            written.append(save_continuity_plot(out_dir / CONTINUITY_DIR / stem, run, settings["axis"]))
    text = json.dumps(report_dict(runs, settings, {**context, "notes": notes}), indent=1) + "\n"
    write_text_atomic(out_dir / JSON_NAME, text, overwrite=overwrite)
    write_text_atomic(out_dir / MARKDOWN_NAME, markdown_report(runs, settings, notes), overwrite=overwrite)
    return written + [out_dir / JSON_NAME, out_dir / MARKDOWN_NAME]
