"""Held-out evaluation of an exported bundle against the true HR slices, with the fair baselines.

For every held-out slice (normalized to [-1, 1] as the engine does, trimmed to a multiple of the scale): LR is the
k-space operator applied to HR; the bundle super-resolves the LR (clipped to [-1, 1] for the networks, as the engine does) through
the ONNX Runtime engine, with and without k-space data consistency; zero-filled, bicubic and Lanczos upsampling of the
same LR (medsr.degrade.upsample_baseline, one geometry) and the autoencoder ceiling (HR encoded to its posterior
mean and decoded) complete the table. PSNR and SSIM are computed on the [-1, 1] scale (data range 2) over the whole
slice.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medsr.data.pairs import degradation_for, make_pair, source_slices
from medsr.data.sources import Source
from medsr.degrade import kspace_consistency, upsample_baseline
from medsr.eval.metrics import psnr, ssim

METHODS = ("model", "model+kspace", "zerofill", "bicubic", "lanczos", "ae_ceiling")
DATA_RANGE = 2.0


def evaluate_bundle(
    bundle_dir: Path, sources: list[Source], steps: int | None = None, threads: int | None = None
) -> dict:
    """{source name: {"slices": n, "metrics": {method: {"psnr", "ssim"}}, "seconds_per_slice": {...}}}."""
    from medsr.bundle import load_bundle
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
    from medsr.engine.sessions import open_sessions
    from medsr.engine.volume import window_percentiles

    bundle = load_bundle(bundle_dir)
    pipeline = LatentSRPipeline(bundle, open_sessions(bundle, "ort", device="cpu", threads=threads))
    options = SamplingOptions(steps=steps, batch_size=1, consistency="none")
    results = {}
    for source in sources:
        op = degradation_for(source.modality, bundle.scale)
        scores = {method: {"psnr": [], "ssim": []} for method in METHODS}
        seconds = {"model": 0.0, "kspace_consistency": 0.0}
        slices = source_slices(source, window_percentiles(bundle))
        for index, item in enumerate(slices):
            hr, lr = make_pair(item.image, op)
            started = time.perf_counter()
            sr = pipeline.super_resolve(lr[None], options, first_index=index).images[0]
            seconds["model"] += time.perf_counter() - started
            started = time.perf_counter()
            consistent = kspace_consistency(sr, lr, bundle.scale)
            seconds["kspace_consistency"] += time.perf_counter() - started
            outputs = {
                "model": sr,
                "model+kspace": consistent,
                **{name: upsample_baseline(lr, name, bundle.scale) for name in ("zerofill", "bicubic", "lanczos")},
                "ae_ceiling": pipeline.autoencode(hr[None])[0],
            }
            for method, image in outputs.items():
                scores[method]["psnr"].append(psnr(image, hr, DATA_RANGE))
                scores[method]["ssim"].append(ssim(image, hr, DATA_RANGE))
        results[source.name] = {
            "slices": len(slices),
            "shape": list(slices[0].image.shape),
            "metrics": {m: {k: float(np.mean(v)) for k, v in s.items()} for m, s in scores.items()},
            "seconds_per_slice": {k: v / len(slices) for k, v in seconds.items()},
        }
    return results


def markdown_table(results: dict) -> str:
    """The held-out table: one row per method, PSNR / SSIM per source."""
    names = list(results)
    header = "| method | " + " | ".join(f"{n} ({results[n]['slices']} slices) PSNR dB / SSIM" for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for method in METHODS:
        cells = [
            f"{results[n]['metrics'][method]['psnr']:.2f} / {results[n]['metrics'][method]['ssim']:.4f}" for n in names
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
