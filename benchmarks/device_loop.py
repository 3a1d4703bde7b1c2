"""The denoising loop of the bundled default model on ONNX Runtime CPU: host loop against the IOBinding loop.

Both loops run the same session on the same LR latent, noise and seed, interleaved (each repeat runs both, in
alternating order, so drifting load from the machine's other jobs hits both alike); the ratio is the median of the
per-repeat ratios. The host loop is the pipeline's loop through a wrapper without ``bind``; the IOBinding loop is
medsr.engine.device_loop. Their final latents must be bit-identical.

    .venv/bin/python benchmarks/device_loop.py --steps 10 --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from medsr.bundle import load_bundle
from medsr.engine.pipeline import LatentSRPipeline
from medsr.engine.sessions import open_ort_sessions
from medsr.models import DEFAULT_BUNDLE


class HostOnly:
    """The session without ``bind``: the pipeline then loops through the host."""

    def __init__(self, session):
        self.session = session
        self.input_names, self.output_names, self.providers = session.input_names, session.output_names, ("host",)

    def run(self, feeds):
        return self.session.run(feeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="LR side in pixels")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "device-loop-cpu.json")
    args = parser.parse_args()

    bundle = load_bundle(DEFAULT_BUNDLE)
    sessions = open_ort_sessions(bundle, threads=args.threads)
    loops = {
        "host": LatentSRPipeline(bundle, {**sessions, "denoiser": HostOnly(sessions["denoiser"])}),
        "iobinding": LatentSRPipeline(bundle, sessions),
    }
    lr = np.random.default_rng(0).uniform(-1, 1, (1, args.size, args.size)).astype(np.float32)
    image = np.repeat(bundle.conditioning.image(lr, bundle.scale)[:, None], bundle.image_channels, axis=1)
    z_lr = loops["host"].encode(image, [], "mean")
    latents, seconds = {}, {name: [] for name in loops}

    def once(name: str) -> float:
        pipeline = loops[name]
        rngs = [np.random.default_rng([0, 0])]
        start = time.perf_counter()
        latents[name] = pipeline.denoise(z_lr, rngs, args.steps, [0])
        return time.perf_counter() - start

    for name in loops:  # warm-up: arenas, bindings
        once(name)
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(loops)[::-1]
        for name in order:
            seconds[name].append(once(name))
    identical = bool(np.array_equal(latents["host"], latents["iobinding"]))
    ratios = [h / d for h, d in zip(seconds["host"], seconds["iobinding"])]
    result = {
        "command": f"benchmarks/device_loop.py --steps {args.steps} --repeats {args.repeats} --threads {args.threads}",
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "latent": list(latents["host"].shape),
        "steps": args.steps,
        "seconds": seconds,
        "median_s": {name: statistics.median(values) for name, values in seconds.items()},
        "speedup_median_of_ratios": statistics.median(ratios),
        "bit_identical": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("median_s", "speedup_median_of_ratios", "bit_identical", "latent")}))


if __name__ == "__main__":
    main()
