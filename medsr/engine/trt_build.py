"""TensorRT engine (plan) building from a bundle's ONNX graphs: precision policy, shape profiles, timing cache.

Precisions (``--precision`` of ``--engine trt``):

- ``fp32``: strict fp32 (TF32 off).
- ``tf32``: fp32 storage, TF32 tensor-core matrix products.
- ``fp16``: fp16 kernels, but normalization layers (GroupNorm/InstanceNorm/LayerNorm, which TensorRT parses into
  normalization layers), softmax and reductions are pinned to fp32: their sums of squares overflow fp16 and turn
  VAE images into NaN or black (REFERENCE.md section 6).
- ``fp16-all``: fp16 everywhere, chosen only where parity passes (``choose_precision``).
- ``bf16``: bf16 kernels (fp32 range: no overflow pinning needed), Ampere and newer.

Which precision each graph runs in is decided by parity, not by default: ``choose_precision`` tries candidates from
fastest to safest and keeps the first whose output reaches the PSNR threshold against fp32 (the VAE decoder
typically stays fp32 or fp16 with pinned norms). TensorRT is imported lazily by the caller and passed in as ``trt``,
so this module imports neither torch nor TensorRT; medsr.engine.trt uses it to rebuild stale plans.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medsr.engine.profiles import ShapeProfile
from medsr.errors import BackendError

LOG = logging.getLogger(__name__)

TRT_PRECISIONS = ("fp32", "tf32", "fp16", "fp16-all", "bf16")
#: Layer types kept in fp32 under fp16: normalizations, softmax and reductions (mean/variance pieces of norms).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
#: Default parity threshold of a reduced-precision graph against fp32 (dB), as the parity harness uses.
PARITY_THRESHOLD_DB = 40.0


@dataclass(frozen=True)
class PrecisionPlan:
    """Builder flags to set and clear, and the layer types pinned to fp32, for one precision."""

    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    fp32_layer_types: tuple[str, ...]


def precision_plan(precision: str) -> PrecisionPlan:
    """The builder settings of ``precision`` (one of TRT_PRECISIONS)."""
    plans = {
        "fp32": PrecisionPlan((), ("TF32",), ()),
        "tf32": PrecisionPlan(("TF32",), (), ()),
        "fp16": PrecisionPlan(("FP16", "OBEY_PRECISION_CONSTRAINTS"), (), FP32_LAYER_TYPES),
        "fp16-all": PrecisionPlan(("FP16",), (), ()),
        "bf16": PrecisionPlan(("BF16",), (), ()),
    }
    if precision not in plans:
        raise BackendError(f"TensorRT precision must be one of {', '.join(TRT_PRECISIONS)}, got {precision!r}")
    return plans[precision]


def pin_fp32_layers(trt, network, layer_types: tuple[str, ...]) -> list[str]:
    """Force every layer of ``layer_types`` (trt.LayerType names) to compute and output fp32; their names."""
    wanted = {getattr(trt.LayerType, name) for name in layer_types}
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in wanted:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned.append(layer.name)
    return pinned


def parse_onnx(trt, logger, onnx_path: Path):
    """(builder, network) with the ONNX graph parsed; parser errors raise BackendError with every message."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return builder, network, parser


def build_plan(
    trt,
    onnx_path: str | os.PathLike,
    profile: ShapeProfile,
    precision: str,
    timing_cache: str | os.PathLike | None = None,
    workspace_bytes: int | None = None,
) -> bytes:
    """A serialized TensorRT engine of ``onnx_path`` for ``profile`` in ``precision``.

    ``timing_cache``: a file of kernel timings shared by every build on this GPU; read if present and written back
    after the build (REFERENCE.md section 6: it cuts rebuilds from minutes to seconds).
    """
    onnx_path = Path(onnx_path)
    plan = precision_plan(precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_onnx(trt, logger, onnx_path)
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    pinned = pin_fp32_layers(trt, network, plan.fp32_layer_types)
    optimization_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.shapes:
        optimization_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build {onnx_path.name} in {precision} for profile {profile.tag}")
    LOG.info(
        "built %s %s %s in %.1f s (%d layers pinned to fp32)",
        onnx_path.name,
        precision,
        profile.tag,
        time.perf_counter() - start,
        len(pinned),
    )
    if cache_path:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


def choose_precision(
    candidates: tuple[str, ...], parity_db: Callable[[str], float], threshold_db: float = PARITY_THRESHOLD_DB
) -> tuple[str, dict[str, float]]:
    """The first of ``candidates`` (fastest first, e.g. ("fp16-all", "fp16", "fp32")) whose parity against fp32
    reaches ``threshold_db``; fp32 (parity by definition) when none does. Returns (precision, {tried: dB})."""
    measured = {}
    for precision in candidates:
        if precision == "fp32":
            return precision, measured
        measured[precision] = parity_db(precision)
        if measured[precision] >= threshold_db:
            return precision, measured
    return "fp32", measured
