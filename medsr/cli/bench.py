"""``medsr-bench``: time engines stage by stage against the eager PyTorch reference; write JSON and markdown."""

from __future__ import annotations

from pathlib import Path

import click

from medsr.cli.common import medsr_errors, run_command


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--preset",
    "presets",
    multiple=True,
    default=("default",),
    show_default=True,
    help="Model preset to benchmark with random weights (repeatable).",
)
@click.option(
    "--engine",
    "engines",
    multiple=True,
    default=("torch", "ort"),
    show_default=True,
    help="engine[:precision], e.g. auto (what --engine auto picks), torch, ort, torch:bf16, openvino:bf16, "
    "trt:fp16 (repeatable; "
    "include torch for the speedup column).",
)
@click.option(
    "--batch-size",
    "batch_sizes",
    multiple=True,
    type=click.IntRange(min=1),
    default=(1, 4),
    show_default=True,
    help="Slices per batch (repeatable).",
)
@click.option("--slices", type=click.IntRange(min=1), default=4, show_default=True, help="Slices in the test volume.")
@click.option("--lr-size", type=click.IntRange(min=8), default=64, show_default=True, help="LR slice size (pixels).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Denoiser steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Interleaved repeats.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads of every engine (default: the cores).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the random-weight bundles are exported and reused (default: a temp folder).",
)
@click.option(
    "-o",
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benchmarks/results"),
    show_default=True,
    help="Folder of the JSON and markdown results.",
)
@click.option("--tag", default="bench", show_default=True, help="File name stem of the results.")
@medsr_errors
def bench(presets, engines, batch_sizes, slices, lr_size, steps, repeats, threads, device, work_dir, out_dir, tag):
    """Benchmark engines on random-weight models: per stage, end to end, GFLOP/s and parity against torch."""
    from medsr.bench.report import write_report
    from medsr.bench.run import BenchConfig, run_benchmark

    config = BenchConfig(
        presets=tuple(presets),
        engines=tuple(engines),
        batch_sizes=tuple(batch_sizes),
        slices=slices,
        lr_size=lr_size,
        steps=steps,
        repeats=repeats,
        threads=threads,
        device=device,
        **({"work_dir": work_dir} if work_dir else {}),
    )
    report = run_benchmark(config, log=lambda line: click.echo(line, err=True))
    json_path, md_path = write_report(report, out_dir, tag)
    click.echo(f"wrote {json_path} and {md_path}")


def main() -> None:
    run_command(bench)
