"""The denoising loop of the bundled default model: the host loop against the device loops, side by side.

Every loop runs the same engine on the same LR latent, noise and seed, interleaved (each repeat runs them all, in
alternating order, so drifting load from the machine's other jobs hits them alike); ratios are medians of the
per-repeat ratios. The loops:

- ``host``: every step's sample and output cross to the host (the pipeline's loop through a wrapper without
  ``bind``);
- ``iobinding`` (ONNX Runtime) or ``device-steps`` (TensorRT): medsr.engine.device_loop, the latents kept in the
  engine's bound buffers and each step applied there (on the GPU one fused CuPy kernel per step);
- ``device-graph`` (TensorRT, static shapes): the same loop with its whole trajectory captured as one CUDA graph and
  replayed (each timed batch is a later batch of the same shape; the warm-up runs the first and captures).

Their final latents must be bit-identical.

    .venv/bin/python benchmarks/device_loop.py --steps 10 --repeats 7 --threads 1
    python benchmarks/device_loop.py --engine trt --device cuda --batch-size 4 --steps 10 --repeats 21 \
        --out benchmarks/results/device-loop-gpu-trt.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from medsr.bench.loop_variants import HostOnly, StepByStep
from medsr.bench.machine import cpu_model
from medsr.bundle import load_bundle
from medsr.engine.pipeline import LatentSRPipeline
from medsr.engine.sessions import open_sessions
from medsr.models import DEFAULT_BUNDLE


def loops_of(bundle, engine: str, device: str, threads: int | None) -> dict[str, LatentSRPipeline]:
    """{loop name: pipeline}; each TensorRT loop gets sessions of its own (the plans come from the cache)."""

    def sessions():
        return open_sessions(bundle, engine, device=device, threads=threads)

    if engine == "ort":
        shared = sessions()
        return {
            "host": LatentSRPipeline(bundle, {**shared, "denoiser": HostOnly(shared["denoiser"])}),
            "iobinding": LatentSRPipeline(bundle, shared),
        }
    host, steps, graph = sessions(), sessions(), sessions()
    return {
        "host": LatentSRPipeline(bundle, {**host, "denoiser": HostOnly(host["denoiser"])}),
        "device-steps": LatentSRPipeline(bundle, {**steps, "denoiser": StepByStep(steps["denoiser"])}),
        "device-graph": LatentSRPipeline(bundle, graph),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ort", "trt"), default="ort")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="LR side in pixels")
    parser.add_argument("--batch-size", type=int, default=1, help="slices denoised together")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "device-loop-cpu.json")
    args = parser.parse_args()

    bundle = load_bundle(DEFAULT_BUNDLE)
    loops = loops_of(bundle, args.engine, args.device, args.threads)
    lr = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, args.size, args.size)).astype(np.float32)
    image = np.repeat(bundle.conditioning.image(lr, bundle.scale)[:, None], bundle.image_channels, axis=1)
    z_lr = loops["host"].encode(image, [], "mean")
    latents, seconds = {}, {name: [] for name in loops}
    indices = list(range(args.batch_size))

    def once(name: str) -> float:
        pipeline = loops[name]
        rngs = [np.random.default_rng([0, i]) for i in indices]
        start = time.perf_counter()
        latents[name] = pipeline.denoise(z_lr, rngs, args.steps, indices)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up: arenas, bindings, TensorRT's first runs, then the whole-loop capture
        for name in loops:
            once(name)
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(loops)[::-1]
        for name in order:
            seconds[name].append(once(name))
    device_loops = [name for name in loops if name != "host"]
    ratios = {
        f"host/{name}": statistics.median(h / d for h, d in zip(seconds["host"], seconds[name]))
        for name in device_loops
    }
    if "device-graph" in loops:
        ratios["device-steps/device-graph"] = statistics.median(
            s / g for s, g in zip(seconds["device-steps"], seconds["device-graph"])
        )
    command = (
        f"benchmarks/device_loop.py --engine {args.engine} --device {args.device} --batch-size {args.batch_size} "
        f"--steps {args.steps} --repeats {args.repeats} --threads {args.threads}"
    )
    result = {
        "command": command,
        "machine": cpu_model(),
        "load_average": os.getloadavg(),
        "latent": list(latents["host"].shape),
        "steps": args.steps,
        "seconds": seconds,
        "median_s": {name: statistics.median(values) for name, values in seconds.items()},
        "speedup_median_of_ratios": ratios,
        "bit_identical": all(np.array_equal(latents["host"], latents[name]) for name in device_loops),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("median_s", "speedup_median_of_ratios", "bit_identical", "latent")}))


if __name__ == "__main__":
    main()
