"""Wall time of one volume through the shipped default model with and without overlapping its host stages with the
engine (LatentSRPipeline.super_resolve_batches).

medsr.engine.volume.super_resolve_volume on one volume, run alternately with ``overlap=True`` and ``overlap=False``
(repeat 1: both, repeat 2: both in the other order, ...); the figures are the median wall time of each, the ratio
of the medians and the median of the per-repeat ratios (serial / overlapped). The serial runs also time the three
stages of every batch (host in: normalization, clipping, padding, conditioning; engine: encoder, denoising loop,
decoder; host out: data consistency, residuals, denormalization), so the best any overlap can reach,
sum(stages) / max(stages), is read beside the measured ratio. The two modes' volumes must be bit-identical.

    python benchmarks/volume_overlap.py --shape 64 64 24 --steps 1 --threads 2 --repeats 7 --tag volume-overlap-cpu
    python benchmarks/volume_overlap.py --engine ort --device cuda --steps 1 --repeats 7 --tag volume-overlap-gpu

``--input`` takes a NIfTI instead of the synthetic volume. Torch-free: any engine medsr-infer runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from medsr.bench.machine import cpu_model
from medsr.bundle import load_bundle
from medsr.engine.jobs import EngineOptions
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.volume import choose_slice_axis, prepare_input, super_resolve_volume, window_percentiles
from medsr.io.image import Volume
from medsr.models import DEFAULT_BUNDLE

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = {"host in": "_host_in", "engine": "_engine_stage", "host out": "_host_out"}


def _volume(args) -> Volume:
    if args.input is not None:
        from medsr.io.formats import load_image

        return load_image(args.input, None, None, False)
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    data = 1000 * np.exp(-4 * (grid**2).sum(0)) + rng.normal(0, 20, shape)
    return Volume(Path("synthetic.nii.gz"), data.astype(np.float32), np.diag([4.0, 4.0, 5.0, 1.0]), "nifti")


class StageClock:
    """Seconds spent in each stage of LatentSRPipeline (STAGES), summed while ``on``."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.on = False
        for stage, method in STAGES.items():
            real = getattr(LatentSRPipeline, method)
            setattr(LatentSRPipeline, method, self._timed(stage, real))

    def _timed(self, stage, real):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds[stage] += time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=None)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 24))
    parser.add_argument("--engine", default="ort")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tag", default="volume-overlap-cpu")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of TAG.json")
    args = parser.parse_args()

    bundle = load_bundle(DEFAULT_BUNDLE)
    pipeline = EngineOptions(args.engine, device=args.device, threads=args.threads).open(bundle)
    volume = _volume(args)
    axis = choose_slice_axis(volume.zooms, volume.data.shape)
    prepared = prepare_input(volume, window_percentiles(bundle))
    options = SamplingOptions(steps=args.steps, batch_size=args.batch_size)
    clock = StageClock()
    results = {}

    def once(overlap: bool) -> float:
        clock.on = not overlap
        start = time.perf_counter()
        results[overlap] = super_resolve_volume(prepared, volume.affine, pipeline, axis, options, overlap=overlap)
        seconds = time.perf_counter() - start
        clock.on = False
        return seconds

    load_before = os.getloadavg()
    once(True)  # warm-up: arenas, bindings, plans
    times = {"overlap": [], "serial": []}
    for repeat in range(args.repeats):
        for overlap in (True, False) if repeat % 2 == 0 else (False, True):
            times["overlap" if overlap else "serial"].append(once(overlap))
    identical = bool(np.array_equal(results[True].data, results[False].data))
    stages = {stage: seconds / args.repeats for stage, seconds in clock.seconds.items()}
    median = {mode: statistics.median(values) for mode, values in times.items()}
    record = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "command": "python benchmarks/volume_overlap.py "
        + ("--input " + str(args.input) if args.input else "--shape " + " ".join(map(str, args.shape)))
        + f" --engine {args.engine} --device {args.device}"
        + (f" --threads {args.threads}" if args.threads else "")
        + f" --steps {args.steps}"
        f" --batch-size {args.batch_size} --repeats {args.repeats} --tag {args.tag}",
        "model": f"{bundle.name} (x{bundle.scale})",
        "engine": f"{args.engine} fp32 {args.device}, threads {args.threads or 'all'}",
        "volume": {"shape": list(volume.data.shape), "axis": axis, "planes": int(volume.data.shape[axis])},
        "seconds": times,
        "median_seconds": median,
        "speedup": median["serial"] / median["overlap"],
        "paired_speedup_median": statistics.median(s / o for s, o in zip(times["serial"], times["overlap"])),
        "serial_stage_seconds_per_volume": stages,
        "best_possible_speedup": sum(stages.values()) / max(stages.values()),
        "outputs_identical": identical,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
