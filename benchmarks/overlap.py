"""Wall time of a local medsr-infer batch with and without overlapping the host stages with the engine.

The batch path of medsr-infer (medsr.cli.jobs.run_batch -> medsr.engine.jobs.run_batch_jobs) on a batch of small
NIfTI volumes, run alternately with ``InferSettings(overlap=True)`` and ``overlap=False`` (repeat 1: both, repeat 2:
both, ...), into fresh output folders; the figures are the median wall time of each, their ratio, and the median
of the per-repeat ratios (serial / overlapped, the two runs of a repeat being next to each other). The serial runs
also time each stage (read + prepare, engine, write) so the best possible overlap, max(stage) / sum(stages), can be
read beside the measured one. Outputs are checked byte-identical between the two modes.

    python benchmarks/overlap.py --volumes 8 --shape 48 48 6 --steps 1 --threads 1 --repeats 5 --tag overlap-cpu

Needs the torch extra (a random-weight ``tiny`` or ``default`` bundle is exported once into --work).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _bundle(preset_name: str, work: Path) -> Path:
    from medsr.export.builder import build_models
    from medsr.export.onnx import export_bundle
    from medsr.export.presets import get_preset

    path = work / f"bundle-{preset_name}"
    if not (path / "medsr.json").is_file():
        vae, unet, provenance = build_models(get_preset(preset_name), seed=0)
        export_bundle(vae, unet, get_preset(preset_name), path, provenance, overwrite=True)
    return path


def _inputs(root: Path, count: int, shape: tuple[int, int, int]) -> Path:
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    for index in range(count):
        data = 1000 * np.exp(-4 * (grid**2).sum(0)) + rng.normal(0, 20, shape)
        nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), root / f"vol{index:02d}.nii.gz")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 6))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medsr-overlap-bench")
    parser.add_argument("--tag", default="overlap-cpu")
    args = parser.parse_args()

    import medsr.engine.jobs as jobs_module
    from medsr.bench.machine import cpu_model
    from medsr.bundle import load_bundle
    from medsr.cli.jobs import run_batch
    from medsr.engine.jobs import EngineOptions, InferSettings
    from medsr.engine.pipeline import SamplingOptions
    from medsr.io.inputs import expand_inputs

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(_bundle(args.preset, args.work))
    pipeline = EngineOptions("ort", threads=args.threads).open(bundle)
    source = _inputs(args.work / "inputs", args.volumes, tuple(args.shape))
    options = SamplingOptions(steps=args.steps, batch_size=args.batch_size)
    jobs_module._now = lambda: "2026-12-01T00:00:00"  # the files are compared byte for byte

    stage_seconds = {"read": 0.0, "engine": 0.0, "write": 0.0}
    real = {name: getattr(jobs_module, name) for name in ("prepare_job", "compute_prepared", "write_computed")}

    def timed(stage, function):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                stage_seconds[stage] += time.perf_counter() - start

        return wrapper

    def run(overlap: bool, out: Path, time_stages: bool = False) -> float:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if time_stages:
            jobs_module.prepare_job = timed("read", real["prepare_job"])
            jobs_module.compute_prepared = timed("engine", real["compute_prepared"])
            jobs_module.write_computed = timed("write", real["write_computed"])
        jobs, _ = expand_inputs([str(source)], output=out)
        settings = InferSettings(options=options, overlap=overlap)
        start = time.perf_counter()
        summary = run_batch(jobs, out, bundle, lambda: pipeline, settings, lambda line: None)
        seconds = time.perf_counter() - start
        for name, function in real.items():
            setattr(jobs_module, name, function)
        assert summary["counts"]["done"] == args.volumes, summary["counts"]
        return seconds

    def digests(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.nii.gz"))}

    load_before = os.getloadavg()
    run(True, args.work / "warmup")  # sessions warm, files cached
    times = {"overlap": [], "serial": []}
    for _ in range(args.repeats):
        times["overlap"].append(run(True, args.work / "out-overlap"))
        times["serial"].append(run(False, args.work / "out-serial", time_stages=True))
    identical = digests(args.work / "out-overlap") == digests(args.work / "out-serial")
    load_after = os.getloadavg()
    stages = {k: v / args.repeats for k, v in stage_seconds.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    record = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "note": "shared machine, other jobs running",
        },
        "command": "python benchmarks/overlap.py "
        + " ".join(
            [
                f"--preset {args.preset}",
                f"--volumes {args.volumes}",
                "--shape " + " ".join(map(str, args.shape)),
                f"--steps {args.steps}",
                f"--batch-size {args.batch_size}",
                f"--threads {args.threads}",
                f"--repeats {args.repeats}",
                f"--tag {args.tag}",
            ]
        ),
        "engine": f"ort fp32 cpu, {args.threads} thread(s)",
        "seconds": times,
        "median_seconds": median,
        "speedup": median["serial"] / median["overlap"],
        "paired_speedup_median": statistics.median(s / o for s, o in zip(times["serial"], times["overlap"])),
        "serial_stage_seconds_per_batch": stages,
        "best_possible_speedup": sum(stages.values()) / max(stages.values()),
        "outputs_identical": identical,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
