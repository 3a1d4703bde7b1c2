"""A benchmark report written as JSON (every raw run) and as a markdown table (medians, ratios, ceilings)."""

from __future__ import annotations

import json
from pathlib import Path

from medsr.bench.run import summarize

_STAGE_COLUMNS = ("load", "encode", "decode", "consistency", "save")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "exact"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """The report as markdown: machine, ceilings, then one row per model x batch x engine (seconds per slice)."""
    machine, config = report["machine"], report["config"]
    ceilings = report["gemm_gflops"]
    lines = [
        f"# medsr-bench: {', '.join(config['presets'])}",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores available, {machine['memory_gib']} GiB, "
        f"bf16 units: {', '.join(machine['bf16_units']) or 'none'}"
        + (f"; GPU {machine['gpu']}" if "gpu" in machine else ""),
        f"- load average (1, 5, 15 min) at start {machine['load_average']}, at end {machine['load_average_after']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in machine['versions'].items())}",
        "- measured GEMM ceilings (GFLOP/s, best of before/after): "
        + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()),
        (
            f"- work: {config['slices']} slices of {config['lr_size']}x{config['lr_size']} LR on "
            f"{config['device']}, {config['steps']} denoiser steps, consistency {config['consistency']}, "
            f"{config['threads']} threads, {config['repeats']} interleaved repeats (medians; speedup = median of "
            "the per-repeat ratios torch / engine, as run)"
        ),
        (
            "- as run: the volume as medsr-infer runs it (the denoising loop on the engine's device where it binds "
            "buffers, host stages overlapped with an engine off the CPU); staged: the same run with every stage "
            "timed in sequence and the loop through the host, which the stage columns break down"
        ),
        f"- wall time of the whole benchmark: {report['wall_seconds']:.0f} s",
        "",
    ]
    for model in report["models"]:
        flops = model["flops_per_slice"]
        lines += [
            (
                f"## {model['preset']}: x{model['scale']} to {model['hr_size']}x{model['hr_size']} (random weights; "
                f"VAE {_count(model['parameters']['vae'])}, UNet {_count(model['parameters']['unet'])} parameters)"
            ),
            "",
            "GFLOP per slice: "
            + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items())
            + f". NumPy scheduler step alone: {1e3 * model['scheduler_step_seconds']:.3f} ms per batch.",
            "Engine open (s): " + ", ".join(f"{k} {v:.1f}" for k, v in model["open_seconds"].items()) + ".",
            *(
                f"`{label}` ran {choice['engine']}: {choice['reason']}."
                for label, choice in model.get("engine_choices", {}).items()
            ),
            "",
            "| batch | engine | as run s/slice | speedup vs torch | staged s/slice | denoiser step s/slice | "
            "sampler s/slice | "
            + " | ".join(f"{name} s/slice" for name in _STAGE_COLUMNS)
            + " | denoiser GFLOP/s | % fp32 peak | % bf16 peak | decoder GFLOP/s | parity vs torch dB | load |",
            "|" + "---|" * (13 + len(_STAGE_COLUMNS)),
        ]
        for row in summarize(report):
            if row["model"] != model["preset"]:
                continue
            stages = row["stages_s_per_slice"]
            fractions = row["denoiser_peak_fraction"]
            lines.append(
                f"| {row['batch']} | {row['engine']} | {_fmt(row['as_run_s_per_slice'])}"
                f"{'' if row['as_run_identical'] else ' (differs!)'} | {_fmt(row['speedup_vs_torch'], 2)} | "
                f"{_fmt(row['end_to_end_s_per_slice'])} | {_fmt(row['step_s_per_slice'], 4)} | "
                f"{_fmt(stages['sampler'], 4)} | "
                + " | ".join(_fmt(stages[name]) for name in _STAGE_COLUMNS)
                + f" | {row['gflops']['denoiser']:.0f} | {100 * fractions['fp32']:.0f} | "
                f"{_fmt(100 * fractions['bf16'], 0) if 'bf16' in fractions else '-'} | "
                f"{row['gflops']['vae_decoder']:.0f} | {_fmt(row['parity_db'], 1)} | "
                f"{'/'.join(f'{x:.1f}' for x in row['load_1min'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    """``<out_dir>/<tag>.json`` (raw runs + summary rows) and ``<out_dir>/<tag>.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{tag}.json", out_dir / f"{tag}.md"
    json_path.write_text(json.dumps({**report, "summary": summarize(report)}, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report) + "\n", encoding="utf-8")
    return json_path, md_path


def _count(parameters: int) -> str:
    """A parameter count for a heading: 2.5M, 35k."""
    return f"{parameters / 1e6:.1f}M" if parameters >= 1e6 else f"{parameters / 1e3:.0f}k"
