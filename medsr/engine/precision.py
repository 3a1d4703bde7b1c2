"""The precisions each engine runs, and the one parity-gated policy behind ``--precision auto``.

``PRECISIONS`` is the single list every ``--precision`` / ``--trt-precision`` option and every engine checks
against. ONNX Runtime and the torch reference run the bundle's fp32 graphs only (ONNX Runtime has no bf16 path on
x86 CPUs). OpenVINO runs fp32 or bf16 on a CPU's bf16 units (medsr.engine.openvino); TensorRT runs the builder
recipes of medsr.engine.trt_build (fp32, tf32, fp16 and bf16 with fp32 islands decided by :func:`first_passing`,
fp16 everywhere).

``auto`` (OpenVINO and TensorRT) is decided by :func:`choose_mixed`: as many graphs in the engine's reduced
precision as keep the pipeline's SR output within ``AUTO_THRESHOLD_DB`` + ``AUTO_MARGIN_DB`` of the same engine in
all-fp32, on a seeded probe. The gate is end to end, not per graph: reduced-precision error in the latent is
amplified by the decoder, so a denoiser that passes alone can fail at the image (seen on random-weight models:
43 dB alone, 36 dB at the image). Graphs that fail stay fp32. See docs/design.md, "Engines and `--engine`".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from medsr.engine.compare import compare_arrays

AUTO = "auto"
#: What each engine runs, in the order the CLI lists them; "auto" where the engine applies :func:`choose_mixed`.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "ort": ("fp32",),
    "torch": ("fp32",),
    "trt": ("fp32", "tf32", "fp16", "fp16-all", "bf16", AUTO),
    "openvino": ("fp32", "bf16", AUTO),
}
#: The reduced precision ``auto`` tries per graph before fp32: bf16 on OpenVINO (the CPU's bf16 units); fp16 with its
#: fp32 islands on TensorRT (bf16 has 3 fewer mantissa bits).
AUTO_REDUCED = {"openvino": "bf16", "trt": "fp16"}
#: Parity (dB, SR output of the mixed-precision pipeline vs all-fp32) that ``auto`` requires to keep reduced graphs.
AUTO_THRESHOLD_DB = 40.0
#: Extra dB the probe must clear: it is one seeded slice, and other slices (content, size) of the tiny random-weight
#: model scored up to 5 dB lower with the same precisions (41 dB on the 32 x 32 probe, 36 dB on 16 x 16 slices).
AUTO_MARGIN_DB = 3.0


def precision_choices(*engines: str) -> tuple[str, ...]:
    """The precisions of ``engines`` in PRECISIONS order, each once: the choices of a CLI option shared by them."""
    return tuple(dict.fromkeys(p for engine in engines for p in PRECISIONS[engine]))


def describe_precisions(*engines: str) -> str:
    """``"ort: fp32; openvino: fp32, bf16, auto; ..."``, for help texts."""
    return "; ".join(f"{engine}: {', '.join(PRECISIONS[engine])}" for engine in engines)


def first_passing(
    candidates: list, parity: Callable[[object], float], threshold_db: float = AUTO_THRESHOLD_DB
) -> tuple[object | None, dict]:
    """The first of ``candidates`` (ordered from the most reduced) whose ``parity(candidate)`` (PSNR in dB against
    fp32) clears ``threshold_db`` + AUTO_MARGIN_DB, and {candidate: parity} for each one tried; None when none
    does (the caller stays fp32). The one gate of :func:`choose_mixed` and of the fp32 islands of
    medsr.engine.mixed_precision."""
    tried = {}
    for candidate in candidates:
        tried[candidate] = parity(candidate)
        if tried[candidate] >= threshold_db + AUTO_MARGIN_DB:
            return candidate, tried
    return None, tried


def probe_output(bundle, sessions: dict) -> np.ndarray:
    """The SR output of ``sessions`` on the seeded probe: one 32 x 32 LR slice in [-1, 1], 2 steps, batch 1, no
    consistency (so the images compare the networks alone)."""
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions

    probe = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32)).astype(np.float32)
    options = SamplingOptions(steps=2, batch_size=1, consistency="none")
    return LatentSRPipeline(bundle, sessions).super_resolve(probe, options).images


def choose_mixed(
    bundle,
    open_at: Callable[[str], dict],
    reduced: str,
    threshold_db: float = AUTO_THRESHOLD_DB,
    output: Callable[[object, dict], np.ndarray] | None = None,
) -> tuple[dict, dict[str, str], float]:
    """The sessions mixing ``reduced`` and fp32 graphs with the most ``reduced`` graphs whose probe output stays
    within ``threshold_db`` + AUTO_MARGIN_DB of the all-fp32 output of the same engine.

    Args:
        bundle: the medsr.bundle.Bundle; its graph names fix the order of the mixes tried.
        open_at: ``open_at(precision) -> {graph: Session}``, called once per precision (fp32, then ``reduced`` when
            a mix needs it).
        reduced: the engine's reduced precision (AUTO_REDUCED).
        output: the probe run, ``output(bundle, sessions) -> SR images``; default: :func:`probe_output`.

    Returns:
        (sessions {graph: Session}, precisions {graph: precision}, probe PSNR in dB against all-fp32; inf when
        every graph stayed fp32).
    """
    output = output or probe_output
    opened = {"fp32": open_at("fp32")}
    reference = output(bundle, opened["fp32"])
    graphs = list(opened["fp32"])
    mixes = sorted(itertools.product((reduced, "fp32"), repeat=len(graphs)), key=lambda mix: mix.count("fp32"))

    def sessions_of(mix) -> dict:
        if reduced not in opened:
            opened[reduced] = open_at(reduced)
        return {graph: opened[precision][graph] for graph, precision in zip(graphs, mix)}

    def parity(mix) -> float:
        return compare_arrays(output(bundle, sessions_of(mix)), reference)["psnr_db"]

    mix, tried = first_passing(mixes[:-1], parity, threshold_db)  # the last mix is all-fp32, the reference itself
    if mix is None:
        return opened["fp32"], dict.fromkeys(graphs, "fp32"), float("inf")
    return sessions_of(mix), dict(zip(graphs, mix)), tried[mix]
