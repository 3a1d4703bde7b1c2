"""``--engine auto``: the fastest engine present on the device, decided in one place with the reason recorded.

The order (docs/design.md, "Engines and `--engine`"):

- ``--device cuda``: TensorRT (``trt``, precision ``auto``: fp16 per graph where the parity gate passes), then
  ONNX Runtime with the CUDA provider (fp32).
- ``--device cpu``: OpenVINO with bf16 per graph where the parity gate passes (``openvino auto``,
  medsr.engine.precision.choose_mixed) when openvino imports and the CPU has bf16 units (AVX-512 BF16 or AMX);
  else OpenVINO fp32 only if :data:`OPENVINO_FP32_BEATS_ORT` (it was measured slower, benchmarks/README.md); else
  ONNX Runtime on the CPU.

The device is never guessed: a GPU run is asked for with ``--device cuda``, so a GPU that is listed but broken
cannot turn the default command into an error, and a CPU run never starts probing CUDA. ``auto`` walks its list,
skips each engine that is not installed, has no device, or does not run the precision asked for, and says why in
the reason; when none is left it raises one BackendError naming every engine and why. A named engine is taken as
named: if it is unavailable, opening it raises (never a silent fallback). The torch reference is never chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

from medsr.engine.precision import AUTO, PRECISIONS
from medsr.engine.sessions import ENGINES, ORT_PROVIDERS
from medsr.errors import BackendError

AUTO_ENGINE = "auto"
#: The values of every ``--engine`` option that runs an engine: ``auto`` first (the default), then ENGINES.
ENGINE_CHOICES = (AUTO_ENGINE, *ENGINES)
#: The engines ``auto`` tries on each device, fastest first.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("trt", "ort"), "cpu": ("openvino", "ort")}
#: Whether OpenVINO fp32 runs the default model faster than ONNX Runtime fp32 on a CPU without bf16 units. Measured
#: side by side (benchmarks/results/cpu-auto-10steps.md and cpu-auto-1step.md, and the paper-size rows of
#: benchmarks/results/cpu.md): ONNX Runtime was faster, so on such CPUs ``auto`` runs ONNX Runtime.
OPENVINO_FP32_BEATS_ORT = False
#: What a named engine records as its reason.
NAMED = "named with --engine"

#: ``probe(device, precision) -> (precision it would run, why)``; precision None: the engine cannot run, why not.
Probe = Callable[[str, str], tuple["str | None", str]]


class EngineChoice(NamedTuple):
    """The engine to open, its precision (one of PRECISIONS[engine]) and why it was chosen."""

    engine: str
    precision: str
    reason: str


def resolve_engine(engine: str, device: str, precision: str | None = None) -> EngineChoice:
    """What ``--engine engine --device device --precision precision`` runs.

    ``auto``: :func:`choose_engine`. A named engine is returned as asked, precision default fp32; whether it is
    installed is for medsr.engine.sessions.open_sessions to say (an error, not a fallback).
    """
    if engine == AUTO_ENGINE:
        return choose_engine(device, precision)
    if engine not in ENGINES:
        raise BackendError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    return EngineChoice(engine, precision or "fp32", NAMED)


def choose_engine(device: str, precision: str | None = None, probes: dict[str, Probe] | None = None) -> EngineChoice:
    """The first engine of AUTO_ORDER[device] that is present and runs ``precision``.

    Args:
        device: "cpu" or "cuda".
        precision: None or "auto": each engine's fastest parity-gated precision (``auto`` on OpenVINO with bf16
            units and on TensorRT, fp32 elsewhere); else only engines that run it (PRECISIONS) are candidates.
        probes: {engine: probe} replacing the built-in checks (tests).

    Returns:
        EngineChoice whose reason says why this engine and why each engine before it was skipped.

    Raises:
        BackendError (one line) when no engine of the device can run.
    """
    if device not in AUTO_ORDER:
        raise BackendError(f"device must be one of {', '.join(AUTO_ORDER)}, got {device!r}")
    wanted = precision or AUTO
    probes = {**PROBES, **(probes or {})}
    skipped = []
    for engine in AUTO_ORDER[device]:
        chosen, why = probes[engine](device, wanted)
        if chosen is not None:
            reason = "; ".join([why, *(f"{name} not used: {text}" for name, text in skipped)])
            return EngineChoice(engine, chosen, reason)
        skipped.append((engine, why))
    asked = "" if wanted == AUTO else f" --precision {wanted}"
    hint = ""
    if device == "cuda":
        hint = "; install a gpu extra (gpu-cu12 or gpu-cu13: your driver's CUDA major) on an NVIDIA GPU or use --device cpu"
    details = "; ".join(f"{name}: {text}" for name, text in skipped)
    raise BackendError(f"--engine auto --device {device}{asked}: no engine can run ({details}){hint}")


def _runs(engine: str, wanted: str) -> str | None:
    """Why ``engine`` cannot run ``wanted`` (None: it can)."""
    allowed = PRECISIONS[engine]
    if wanted == AUTO or wanted in allowed:
        return None
    return f"runs {', '.join(p for p in allowed if p != AUTO)} only, not {wanted}"


def _import(name: str):
    """The module ``name``, or None when it is not installed (or blocked)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def probe_openvino(device: str, wanted: str) -> tuple[str | None, str]:
    """OpenVINO runs on the CPU: ``auto`` (or bf16) where it has bf16 units, fp32 only if it beats ONNX Runtime."""
    if device != "cpu":
        return None, "runs on the CPU only"
    if (refused := _runs("openvino", wanted)) is not None:
        return None, refused
    ov = _import("openvino")
    if ov is None:
        return None, "openvino is not installed (pip install 'medsr[openvino]')"
    from medsr.engine.openvino import has_bf16_units, ov_version

    bf16 = has_bf16_units(ov.Core())
    name = f"OpenVINO {ov_version(ov)}"
    if bf16 and wanted == AUTO:
        return AUTO, f"{name} on a CPU with bf16 units: bf16 per graph where the parity gate passes, fp32 elsewhere"
    if bf16 and wanted == "bf16":
        return "bf16", f"{name} on a CPU with bf16 units"
    if wanted == "bf16":
        return None, "this CPU has no bf16 units (AVX-512 BF16 or AMX)"
    if OPENVINO_FP32_BEATS_ORT:
        return "fp32", f"{name} fp32, measured faster than ONNX Runtime fp32 (benchmarks/README.md)"
    why = "this CPU has no bf16 units (AVX-512 BF16 or AMX)" if not bf16 else "fp32 asked"
    return None, f"{why}, and OpenVINO fp32 measured slower than ONNX Runtime fp32 (benchmarks/README.md)"


def probe_ort(device: str, wanted: str) -> tuple[str | None, str]:
    """ONNX Runtime runs fp32 with the device's execution provider, when this onnxruntime has it."""
    if wanted not in (AUTO, *PRECISIONS["ort"]):
        return None, _runs("ort", wanted)
    ort = _import("onnxruntime")
    if ort is None:
        return None, "onnxruntime is not installed"
    provider = ORT_PROVIDERS[device][0]
    if provider not in ort.get_available_providers():
        return None, f"this onnxruntime has no {provider} (the GPU build is onnxruntime-gpu)"
    return "fp32", f"ONNX Runtime {ort.__version__} {provider}"


def probe_trt(device: str, wanted: str) -> tuple[str | None, str]:
    """TensorRT >= 10 runs on a visible CUDA GPU; ``auto``: fp16 per graph where the parity gate passes."""
    if device != "cuda":
        return None, "runs on a GPU only"
    if (refused := _runs("trt", wanted)) is not None:
        return None, refused
    from medsr.engine.cuda import import_cudart
    from medsr.engine.trt import import_tensorrt

    try:
        trt = import_tensorrt()
    except BackendError:
        return None, "TensorRT >= 10 is not installed"
    try:
        cudart = import_cudart()
    except BackendError:
        return None, "NVIDIA's cuda-python bindings are not installed"
    status, count = cudart.cudaGetDeviceCount()
    if int(status) != 0 or not count:
        return None, "no CUDA GPU is visible"
    if wanted == AUTO:
        return AUTO, f"TensorRT {trt.__version__} on a CUDA GPU: fp16 per graph where the parity gate passes"
    return wanted, f"TensorRT {trt.__version__} on a CUDA GPU"


PROBES: dict[str, Probe] = {"openvino": probe_openvino, "ort": probe_ort, "trt": probe_trt}

#: The help of every ``--engine`` option that offers ``auto`` (its "else ONNX Runtime": OPENVINO_FP32_BEATS_ORT).
ENGINE_HELP = (
    "auto: the fastest engine present on --device (cuda: TensorRT, then ONNX Runtime CUDA; cpu: OpenVINO, bf16 "
    "per graph where parity passes, on a CPU with bf16 units, else ONNX Runtime); the run says which and why. "
    "A named engine that is unavailable is an error."
)
#: The default of a ``--precision`` option beside ``--engine auto``, for its help.
PRECISION_DEFAULT_HELP = "default: auto's choice with --engine auto, fp32 with a named engine"
