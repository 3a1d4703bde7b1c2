"""TensorRT engine (plan) building from a bundle's ONNX graphs: builder recipe per precision, shape profiles,
timing cache.

Precisions (``--precision`` of ``--engine trt``, medsr.engine.precision.PRECISIONS["trt"]):

- ``fp32``: strict fp32 (TF32 off).
- ``tf32``: fp32 storage, TF32 tensor-core matrix products.
- ``fp16``: fp16 kernels, but normalization layers (GroupNorm/InstanceNorm/LayerNorm, which TensorRT parses into
  normalization layers), softmax and reductions are pinned to fp32: their sums of squares overflow fp16 and turn
  VAE images into NaN or black (docs/sources.md, "Deployment engines").
- ``fp16-all``: fp16 everywhere (fastest; only where parity allows it).
- ``bf16``: bf16 kernels (fp32 range: no overflow pinning needed), Ampere and newer.
- ``auto``: fp16 per graph where the end-to-end parity gate of medsr.engine.precision passes, fp32 elsewhere
  (resolved by medsr.engine.trt.open_trt_sessions before anything is built here).

TensorRT is imported lazily by the caller and passed in as ``trt``, so this module imports neither torch nor
TensorRT; medsr.engine.trt uses it to build missing or stale plans.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from medsr.engine.profiles import ShapeProfile
from medsr.errors import BackendError, OutputError
from medsr.io.atomic import atomic_path

LOG = logging.getLogger(__name__)

#: Layer types kept in fp32 under fp16: normalizations, softmax and reductions (mean/variance pieces of norms).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")


@dataclass(frozen=True)
class PrecisionPlan:
    """Builder flags to set and clear, and the layer types pinned to fp32, for one precision."""

    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    fp32_layer_types: tuple[str, ...]


#: The builder recipe of every precision of PRECISIONS["trt"] but ``auto`` (which is resolved per graph first).
RECIPES = {
    "fp32": PrecisionPlan((), ("TF32",), ()),
    "tf32": PrecisionPlan(("TF32",), (), ()),
    "fp16": PrecisionPlan(("FP16", "OBEY_PRECISION_CONSTRAINTS"), (), FP32_LAYER_TYPES),
    "fp16-all": PrecisionPlan(("FP16",), (), ()),
    "bf16": PrecisionPlan(("BF16",), (), ()),
}


def precision_plan(precision: str) -> PrecisionPlan:
    """The builder settings of ``precision`` (a key of RECIPES)."""
    if precision not in RECIPES:
        raise BackendError(f"TensorRT precision must be one of {', '.join(RECIPES)}, got {precision!r}")
    return RECIPES[precision]


def recipe_id(precision: str) -> str:
    """A short digest of the builder recipe of ``precision`` (flags set and cleared, layer types pinned): part of a
    plan's cache key, so a plan built by an older recipe is rebuilt, not reused."""
    return hashlib.sha256(repr(precision_plan(precision)).encode()).hexdigest()[:12]


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
    after the build (docs/sources.md, "Deployment engines": it cuts rebuilds from minutes to seconds). A timing
    cache that cannot be written back is skipped with a warning; the plan is still returned.
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
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_path, overwrite=True) as staging:
                staging.write_bytes(bytes(config.get_timing_cache().serialize()))
        except (OSError, OutputError) as exc:
            warnings.warn(f"TensorRT timing cache not saved: {exc}", stacklevel=2)
    return bytes(serialized)
