"""Fidelity to the truth: a model, its autoencoder ceiling and the fair baselines, measured against the true HR.

The work behind ``medsr-eval fidelity``. For every evaluation slice (:mod:`medsr.eval.slices`, normalized to the
model's [-1, 1]):

- HR is the slice centre-cropped to a multiple of the scale s; the measured LR = A(HR) with the bundle's
  degradation operator A (manifest ``task.degradation``; k-space truncation when it names none).
- The model gets what the engine gets: the measured LR, which the pipeline clips to [-1, 1] for its networks only.
  It super-resolves it once (``first_index`` = the slice's index in its volume, so the noise is the one
  ``medsr-infer`` would draw for that slice); each consistency mode is then applied to that one decoder output with
  the measured LR, as the engine applies it.
- Baselines get the same measured LR: zero-filled k-space,
  grid-aligned bicubic and Lanczos upsampling (:func:`medsr.degrade.upsample_baseline`, one geometry with the
  operators: docs/sources.md, "Degradations and fair baselines").
- The autoencoder ceiling AE = decode(encode(HR)) (LatentSRPipeline.autoencode: posterior mean, the bundle's latent
  scaling), also reported as the configuration ``ae_ceiling``.

Each output is measured against HR on the [-1, 1] scale (data range 2) by :func:`medsr.eval.metrics.image_metrics`;
hallucination and loss rates use the AE threshold for every configuration; model rows also carry ``ae_psnr``, so
only they become points of the screening regression (:mod:`medsr.eval.compare`). ``consistency_residual`` is
||A(out) - LR|| / ||LR|| per image, against the measured (unclipped) LR.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from medsr.data.pairs import trim_to_multiple
from medsr.degrade import BASELINES, CONSISTENCY_MODES, consistency_residual, upsample_baseline
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.volume import check_task_plane
from medsr.errors import InputError
from medsr.eval.metrics import hallucination_rates, image_metrics
from medsr.eval.slices import EvalSlice

DATA_RANGE = 2.0
"""Span of the model's intensity scale [-1, 1]: the PSNR peak and the SSIM range."""
AE_CONFIG = "ae_ceiling"


@dataclass(frozen=True)
class FidelitySettings:
    """What to measure.

    Attributes:
        model_name: name of the model's configurations: ``<model_name>+<consistency mode>``.
        consistency: data-consistency modes to measure the model with (each one configuration).
        baselines: baselines of :data:`medsr.degrade.BASELINES` to measure.
        options: sampling options of the model (its ``consistency`` is ignored: see ``consistency``).
    """

    model_name: str
    consistency: tuple[str, ...]
    baselines: tuple[str, ...] = BASELINES
    options: SamplingOptions = field(default_factory=SamplingOptions)

    def __post_init__(self):
        unknown = [m for m in self.consistency if m not in CONSISTENCY_MODES]
        if not self.consistency or unknown:
            raise InputError(f"consistency modes must be among {CONSISTENCY_MODES}, got {list(self.consistency)}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise InputError(f"unknown baseline(s) {unknown}; expected among {BASELINES}")
        if not self.model_name or "/" in self.model_name:
            raise InputError(f"the model name must be non-empty without '/', got {self.model_name!r}")

    @property
    def model_configs(self) -> list[str]:
        return [f"{self.model_name}+{mode}" for mode in self.consistency]

    @property
    def configs(self) -> list[str]:
        """Every configuration, in report order: the model's, the baselines, the autoencoder ceiling."""
        return self.model_configs + list(self.baselines) + [AE_CONFIG]


@dataclass
class ImageOutputs:
    """One evaluated slice: HR (H, W), the measured LR (H/s, W/s) and each configuration's output (H, W), float32."""

    slice: EvalSlice
    hr: np.ndarray
    lr: np.ndarray
    outputs: dict[str, np.ndarray]
    sr_seconds: float


@dataclass
class FidelityResult:
    """Per-image metric rows ``rows[config][id]`` and the wall time of the model per slice."""

    settings: FidelitySettings
    slices: list[EvalSlice]
    rows: dict[str, dict[str, dict[str, float]]]
    sr_seconds: list[float]


def run_slice(pipeline: LatentSRPipeline, item: EvalSlice, settings: FidelitySettings) -> ImageOutputs:
    """HR, LR and every configuration's output for one slice (see the module docstring)."""
    scale = pipeline.bundle.scale
    hr = trim_to_multiple(item.image, scale).astype(np.float32)
    measured = pipeline.degradation.forward(hr).astype(np.float32)
    started = time.perf_counter()
    options = replace(settings.options, consistency="none")
    decoded = pipeline.super_resolve(measured[None], options, first_index=max(item.index, 0)).images
    sr_seconds = time.perf_counter() - started
    outputs = {
        config: pipeline.enforce_consistency(decoded, measured[None], mode)[0]
        for config, mode in zip(settings.model_configs, settings.consistency)
    }
    outputs.update({name: upsample_baseline(measured, name, scale).astype(np.float32) for name in settings.baselines})
    outputs[AE_CONFIG] = pipeline.autoencode(hr[None])[0]
    return ImageOutputs(item, hr, measured, outputs, sr_seconds)


def measure(pipeline: LatentSRPipeline, result: ImageOutputs, model_configs: list[str]) -> dict[str, dict]:
    """``{config: metric row}`` of one slice; see the module docstring for which columns each row has."""
    ae = result.outputs[AE_CONFIG]
    rows = {}
    for config, image in result.outputs.items():
        if config in model_configs:
            row = image_metrics(image, result.hr, DATA_RANGE, ae=ae)
        else:
            row = image_metrics(image, result.hr, DATA_RANGE)
            row.update(hallucination_rates(image, result.hr, ae)._asdict())
            row["hallucination_tau"] = row.pop("tau")
        row["consistency_residual"] = float(consistency_residual(image, result.lr, pipeline.degradation))
        rows[config] = row
    return rows


def evaluate(
    pipeline: LatentSRPipeline,
    slices: list[EvalSlice],
    settings: FidelitySettings,
    progress: Callable[[int], None] | None = None,
    keep: Callable[[ImageOutputs], None] | None = None,
) -> FidelityResult:
    """Measure every configuration of ``settings`` on every slice.

    ``progress(1)`` is called after each slice; ``keep(outputs)`` receives each slice's images (for figures) before
    they are dropped. Only in-plane models are measured (a through-plane one is refused naming it).
    """
    check_task_plane(pipeline.bundle, through_plane=False)
    ids = [s.id for s in slices]
    if len(set(ids)) != len(ids):
        raise InputError(
            f"evaluation slice ids must be unique, got duplicates {sorted({i for i in ids if ids.count(i) > 1})}"
        )
    rows: dict[str, dict[str, dict]] = {config: {} for config in settings.configs}
    seconds = []
    for item in slices:
        outputs = run_slice(pipeline, item, settings)
        for config, row in measure(pipeline, outputs, settings.model_configs).items():
            rows[config][item.id] = row
        seconds.append(outputs.sr_seconds)
        if keep is not None:
            keep(outputs)
        if progress is not None:
            progress(1)
    return FidelityResult(settings, slices, rows, seconds)
