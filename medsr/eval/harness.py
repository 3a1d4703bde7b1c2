"""Parity over real data: an engine against the PyTorch fp32 reference on slices of real volumes.

The work behind ``medsr-eval parity`` and ``medsr-export --validate``. Real slices (:mod:`medsr.eval.slices`) are
fed to both pipelines as LR input, exactly as ``medsr-infer`` feeds a volume's slices, centre-cropped to one common
LR size so they form one batch. Both pipelines share the bundle, seed, initial and per-step noise, and every stage
is compared by :func:`medsr.eval.parity.compare_pipelines`. A NaN or Inf in either pipeline (the engine's
NonFiniteError names the stage) fails the run with that stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsr.bundle import Bundle
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_sessions
from medsr.engine.volume import window_percentiles
from medsr.errors import InputError, NonFiniteError
from medsr.eval.parity import DEFAULT_THRESHOLDS_DB, ParityReport, compare_pipelines
from medsr.eval.slices import EvalSlice, builtin_volume, eval_sources, load_eval_slices


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central (height, width) window of a (H, W) image (H >= height, W >= width)."""
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def parity_inputs(
    inputs: list | None, per_file: int, size: int, percentiles: tuple[float, float]
) -> tuple[np.ndarray, list[str]]:
    """(N, h, w) float32 LR batch in [-1, 1] and the ids of its slices.

    ``per_file`` evenly spaced foreground slices of each input (:func:`medsr.eval.slices.eval_sources`; default:
    :func:`builtin_volume`), normalized with the window of ``percentiles`` (the bundle's), each centre-cropped to
    h = min(size, smallest height), w = min(size, smallest width) over the chosen slices.
    """
    if size < 1:
        raise InputError(f"the LR crop size must be >= 1 pixel, got {size}")
    sources = eval_sources(inputs or [builtin_volume()])
    slices: list[EvalSlice] = load_eval_slices(sources, percentiles, per_file=per_file)
    height = min(size, *(s.image.shape[0] for s in slices))
    width = min(size, *(s.image.shape[1] for s in slices))
    batch = np.stack([centre_crop(s.image, height, width) for s in slices]).astype(np.float32)
    return batch, [s.id for s in slices]


@dataclass
class ParityRun:
    """What a parity run compared and found. ``report`` is None when a pipeline produced NaN/Inf (``non_finite``
    then says which pipeline and stage)."""

    engine: str
    precision: str
    threshold_db: float
    ids: list[str]
    lr_shape: tuple[int, ...]
    providers: tuple[str, ...]
    report: ParityReport | None = None
    non_finite: dict | None = None
    options: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed

    def failure(self) -> str | None:
        """One line naming why the run failed (None when it passed)."""
        if self.non_finite is not None:
            return f"NaN/Inf in the {self.non_finite['pipeline']} pipeline: {self.non_finite['message']}"
        if self.report is None or self.report.passed:
            return None
        stage = next(s for s in self.report.stages if s.stage == self.report.first_drift)
        return (
            f"first stage below {self.threshold_db:g} dB: {stage.stage} ({stage.psnr_db:.2f} dB, max abs "
            f"{stage.max_abs:.3g}, rel L2 {stage.rel_l2:.3g})"
        )

    def to_dict(self) -> dict:
        body = self.report.to_dict() if self.report is not None else {"passed": False, "stages": []}
        return {
            "engine": self.engine,
            "precision": self.precision,
            "providers": list(self.providers),
            "threshold_db": self.threshold_db,
            "slices": self.ids,
            "lr_shape": list(self.lr_shape),
            "options": self.options,
            **body,
            "passed": self.passed,
            "non_finite": self.non_finite,
            "failure": self.failure(),
        }


def run_parity(
    bundle: Bundle,
    engine: str,
    lr: np.ndarray,
    ids: list[str],
    options: SamplingOptions,
    precision: str = "fp32",
    threshold_db: float | None = None,
    device: str = "cpu",
    reference_device: str = "cpu",
    threads: int | None = None,
) -> ParityRun:
    """Compare ``engine`` at ``precision`` with the torch fp32 reference on the LR batch ``lr`` (N, h, w).

    ``threshold_db`` defaults to :data:`medsr.eval.parity.DEFAULT_THRESHOLDS_DB` of the precision (its lowest, the
    reduced-precision threshold, for tf32, fp16-all and auto).
    """
    if threshold_db is None:  # open_sessions checks the precision against the engine's list
        threshold_db = DEFAULT_THRESHOLDS_DB.get(precision, min(DEFAULT_THRESHOLDS_DB.values()))
    threshold = float(threshold_db)
    sessions = open_sessions(bundle, engine, device=device, threads=threads, precision=precision)
    reference = open_sessions(bundle, "torch", device=reference_device, threads=threads)
    run = ParityRun(
        engine=engine,
        precision=precision,
        threshold_db=threshold,
        ids=ids,
        lr_shape=tuple(lr.shape),
        providers=tuple(next(iter(sessions.values())).providers),
    )
    engine_pipeline = LatentSRPipeline(bundle, sessions)
    reference_pipeline = LatentSRPipeline(bundle, reference)
    steps = options.steps or engine_pipeline.scheduler_config.default_steps
    run.options = {"steps": steps, "seed": options.seed, "batch_size": options.batch_size}
    try:
        run.report = compare_pipelines(engine_pipeline, reference_pipeline, lr, options, threshold)
    except NonFiniteError as exc:
        run.non_finite = {"pipeline": "engine", "message": str(exc)}
        try:  # the reference is deterministic: if it fails alone, the NaN was its own
            reference_pipeline.super_resolve(lr, options)
        except NonFiniteError as reference_exc:
            run.non_finite = {"pipeline": "reference", "message": str(reference_exc)}
    return run


def validate_bundle(root: Path, threshold_db: float | None = None) -> ParityRun:
    """The export gate (``medsr-export --validate``): ORT fp32 on the CPU against the torch reference, on 2 slices
    of :func:`builtin_volume` cropped to 32 x 32 LR pixels, seed 0, the bundle's default steps."""
    from medsr.bundle import load_bundle

    bundle = load_bundle(root)
    lr, ids = parity_inputs(None, per_file=2, size=32, percentiles=window_percentiles(bundle))
    return run_parity(bundle, "ort", lr, ids, SamplingOptions(seed=0, batch_size=2), threshold_db=threshold_db)
