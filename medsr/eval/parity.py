"""Parity: does an engine reproduce the PyTorch reference, stage by stage?

Both pipelines run the same bundle, LR slices, seed, initial and per-step noise (medsr.engine.pipeline draws it per
slice), so every intermediate can be compared: the LR latent, each denoiser output, the final latent, the decoded
image and the final SR image. A stage passes when its PSNR (peak = the reference's range) reaches the threshold.
Slices longer than the tile size run in tiles, as medsr-infer runs them; the pipeline traces no intermediate of a
tiled slice, so such a run compares the final image alone, and its report says so (``note``) and lists only that
stage. NumPy only: the reference sessions are passed in by the caller.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from medsr.engine.compare import compare_arrays
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions

#: Default thresholds (dB) of every compared stage by engine precision: fp32 engines agree with the fp32 reference
#: to rounding; fp16/bf16 keep about 3 significant digits.
DEFAULT_THRESHOLDS_DB = {"fp32": 60.0, "fp16": 40.0, "bf16": 40.0}


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
    """Every compared stage in pipeline order, the threshold, the first stage below it (None when all pass), and a
    ``note`` saying what was not compared (None when every stage was)."""

    stages: list[StageParity]
    threshold_db: float
    first_drift: str | None
    note: str | None = None

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
            "note": self.note,
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
    """Run both pipelines on the same inputs and compare every stage both traced (see module docstring)."""
    actual = trace_stages(engine, lr, options)
    expected = trace_stages(reference, lr, options)
    stages = []
    for name in (name for name in expected if name in actual):
        figures = compare_arrays(actual[name], expected[name])
        stages.append(StageParity(stage=name, passed=figures["psnr_db"] >= threshold_db, **figures))
    first = next((stage.stage for stage in stages if not stage.passed), None)
    note = None
    if [stage.stage for stage in stages] == ["sr_image"]:
        height, width = lr.shape[1:]
        note = (
            f"slices of {height}x{width} LR pixels ran in tiles of {options.tile_size} (as medsr-infer runs them), "
            "whose intermediate stages are not traced: only the final image (sr_image) was compared"
        )
    return ParityReport(stages=stages, threshold_db=threshold_db, first_drift=first, note=note)
