"""The batch of ``medsr-infer`` and its terminal lines: run every job, report and skip failures, skip outputs that
already exist (so a rerun resumes), and keep a summary JSON current in the output directory.

The job itself (read and check an input, decide its output, run the volume engine, write the result with its
provenance) and the batch's bookkeeping live in medsr.engine.jobs, below the command line, where the Ray workers of
medsr.serve.ray_batch run the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medsr.engine.jobs import (
    ADAPTED,
    InferSettings,
    JobPipeline,
    new_summary,
    plan_batch,
    run_batch_jobs,
    write_summary,
)
from medsr.engine.pipeline import LatentSRPipeline


def describe(record: dict) -> str:
    """One line about a finished job, for the terminal."""
    shape_in = "x".join(map(str, record["input_shape"]))
    shape_out = "x".join(map(str, record["output_shape"]))
    text = (
        f"wrote {record['output']}: {record['slices']} slice{'s' if record['slices'] != 1 else ''} along axis "
        f"{record['axis']}, {shape_in} -> {shape_out} "
        f"({record['format']}, {record['dtype']}), {record['seconds']:.1f} s, "
        f"{100 * record['clipped_input_fraction']:.2f}% of input voxels clipped to the intensity window"
    )
    if record["clipped_output_fraction"]:
        text += f", {100 * record['clipped_output_fraction']:.2f}% of output voxels clipped to {record['dtype']}"
    text += f", consistency residual median {record['residual_median']:.2e}"
    if "through_plane" in record:
        text += f"; {record['through_plane']}"
    if ADAPTED in record:
        adapted = record[ADAPTED]
        text += (
            f"; model adapted to {adapted['input']}: {adapted['steps']} steps in {adapted['seconds']:.1f} s, loss on "
            f"its own planes {adapted['loss_before']:.4g} -> {adapted['loss_after']:.4g}"
        )
    return text + "".join(f"; note: {note}" for note in record["notes"])


def run_batch(
    jobs: list,
    outdir: Path,
    bundle,
    open_pipeline: Callable[[], LatentSRPipeline],
    settings: InferSettings,
    echo: Callable[[str], None],
    per_job: JobPipeline | None = None,
) -> dict:
    """Run every job into ``outdir``; report and skip failures; skip outputs that exist (unless overwriting).

    ``open_pipeline()`` is called when the first job passes its checks (and should cache its pipeline).
    ``outdir/medsr_summary.json`` is rewritten (atomically) after every job, so an interrupted batch leaves a
    summary of what was finished. With ``settings.overlap`` the next input is read and the previous output written
    while the engine runs (medsr.engine.jobs.run_batch_jobs); ``per_job`` gives each job its own pipeline (e.g.
    ``--adapt``'s). Returns the summary.
    """
    summary = new_summary(bundle)
    records = []

    def finished(record: dict) -> None:
        records.append(record)
        echo(batch_line(record))
        write_summary(outdir, summary, records)

    run_batch_jobs(plan_batch(jobs, outdir, bundle, settings), bundle, open_pipeline, settings, finished, per_job)
    write_summary(outdir, summary, records, finished=True)
    return summary


def batch_line(record: dict) -> str:
    """One line about a job of a batch, for the terminal."""
    if record["status"] == "done":
        return describe(record)
    if record["status"] == "skipped":
        return f"skipped {record['input']}: {record['output']} exists"
    return f"FAILED {record['error']}"
