"""Parity: does an engine reproduce the PyTorch reference, stage by stage?

Both pipelines run the same bundle, LR slices, seed, initial and per-step noise (medsr.engine.pipeline draws it per
slice), so every intermediate can be compared: the LR latent, each denoiser output, the final latent, the decoded
image and the final SR image. A stage passes when its PSNR (peak = the reference's range) reaches the threshold.
NumPy only: the reference sessions are passed in by the caller.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions

#: Default final-image thresholds (dB) by engine precision (issue 5).
DEFAULT_THRESHOLDS_DB = {"fp32": 60.0, "fp16": 40.0, "bf16": 40.0}


def compare_arrays(actual: np.ndarray, expected: np.ndarray) -> dict:
    """Max abs error, relative L2 error and PSNR (dB, peak = the expected array's range) of two arrays."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = actual - expected
    mse = float(np.mean(diff**2))
    peak = float(expected.max() - expected.min()) or 1.0
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "rel_l2": float(np.linalg.norm(diff) / (np.linalg.norm(expected) or 1.0)),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse)),
    }


@dataclass(frozen=True)
class StageParity:
    """One stage compared: errors of the engine's array against the reference's."""

    stage: str
    max_abs: float
    rel_l2: float
    psnr_db: float
    passed: bool


@dataclass(frozen=True)
class ParityReport:
    """Every stage in pipeline order, the threshold, and the first stage below it (None when all pass)."""

    stages: list[StageParity]
    threshold_db: float
    first_drift: str | None

    @property
    def passed(self) -> bool:
        return self.first_drift is None

    @property
    def final(self) -> StageParity:
        return self.stages[-1]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "threshold_db": self.threshold_db,
            "first_drift": self.first_drift,
            "stages": [asdict(stage) for stage in self.stages],
        }


def trace_stages(pipeline: LatentSRPipeline, lr: np.ndarray, options: SamplingOptions) -> dict[str, np.ndarray]:
    """Run ``pipeline`` on (N, h, w) LR slices; every traced stage concatenated over batches, plus ``sr_image``."""
    chunks: dict[str, list[np.ndarray]] = defaultdict(list)

    def record(stage, indices, array):
        chunks[stage].append(np.array(array, copy=True))

    result = pipeline.super_resolve(lr, options, trace=record)
    stages = {stage: np.concatenate(parts) for stage, parts in chunks.items()}
    stages["sr_image"] = result.images
    return stages


def compare_pipelines(
    engine: LatentSRPipeline,
    reference: LatentSRPipeline,
    lr: np.ndarray,
    options: SamplingOptions,
    threshold_db: float = DEFAULT_THRESHOLDS_DB["fp32"],
) -> ParityReport:
    """Run both pipelines on the same inputs and compare every stage (see module docstring)."""
    actual = trace_stages(engine, lr, options)
    expected = trace_stages(reference, lr, options)
    stages = []
    for name in expected:
        figures = compare_arrays(actual[name], expected[name])
        stages.append(StageParity(stage=name, passed=figures["psnr_db"] >= threshold_db, **figures))
    first = next((stage.stage for stage in stages if not stage.passed), None)
    return ParityReport(stages=stages, threshold_db=threshold_db, first_drift=first)
