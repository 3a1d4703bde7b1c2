"""TensorRT engine (plan) building from a bundle's ONNX graphs: builder recipe per precision, shape profiles,
timing cache, and which TensorRT versions medsr supports with which precisions.

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

TensorRT versions (:func:`trt_features`, the one place that says what each version has): 10.8 to 10.x build every
precision above through weak typing (builder flags FP16/BF16/OBEY_PRECISION_CONSTRAINTS and per-layer pins).
TensorRT 11 removed weak typing: every network is strongly typed, its precision is the ONNX graph's own types, and
a bundle's graphs are fp32, so 11.x builds ``fp32`` and ``tf32`` only and medsr refuses the others with one line
(docs/sources.md, "GPU engines"). :data:`TRT_API` lists every TensorRT name this module and medsr.engine.trt use,
by the path that uses it; tests/test_trt_api_surface.py checks it against the real bindings of each major version
and tests/trt_fakes.py exposes exactly those names.

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

from medsr.engine.precision import AUTO, AUTO_REDUCED
from medsr.engine.profiles import ShapeProfile
from medsr.errors import BackendError, OutputError
from medsr.io.atomic import atomic_path

LOG = logging.getLogger(__name__)

#: Layer types kept in fp32 under fp16: normalizations, softmax and reductions (mean/variance pieces of norms).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")

#: The oldest TensorRT medsr supports (the newest major is 11) and what to install otherwise.
MIN_VERSION = (10, 8)
MAX_MAJOR = 11
INSTALL_HINT = "pip install 'tensorrt>=10.8,<12'"
#: TensorRT 10.x, for the precisions that need weak typing.
INSTALL_HINT_WEAK = "pip install 'tensorrt>=10.8,<11'"

#: Every TensorRT name medsr uses ("Class.member" or a module attribute), by the path that uses it: "common" on every
#: supported version, "weak_typing" only where :class:`TrtFeatures` says the version has weak typing (10.x).
TRT_API: dict[str, tuple[str, ...]] = {
    "common": (
        "__version__",
        "nptype",
        "float32",
        "Logger",
        "Logger.WARNING",
        "Runtime",
        "Runtime.deserialize_cuda_engine",
        "ICudaEngine.create_execution_context",
        "ICudaEngine.num_io_tensors",
        "ICudaEngine.get_tensor_name",
        "ICudaEngine.get_tensor_mode",
        "ICudaEngine.get_tensor_dtype",
        "IExecutionContext.set_input_shape",
        "IExecutionContext.get_tensor_shape",
        "IExecutionContext.set_tensor_address",
        "IExecutionContext.execute_async_v3",
        "TensorIOMode.INPUT",
        "TensorIOMode.OUTPUT",
        "Builder",
        "Builder.create_network",
        "Builder.create_builder_config",
        "Builder.create_optimization_profile",
        "Builder.build_serialized_network",
        "OnnxParser",
        "OnnxParser.parse_from_file",
        "OnnxParser.num_errors",
        "OnnxParser.get_error",
        "INetworkDefinition.num_layers",
        "INetworkDefinition.get_layer",
        "ILayer.name",
        "ILayer.type",
        "ILayer.num_outputs",
        "LayerType.NORMALIZATION",
        "LayerType.SOFTMAX",
        "LayerType.REDUCE",
        "IBuilderConfig.set_memory_pool_limit",
        "IBuilderConfig.set_flag",
        "IBuilderConfig.clear_flag",
        "IBuilderConfig.add_optimization_profile",
        "IBuilderConfig.create_timing_cache",
        "IBuilderConfig.set_timing_cache",
        "IBuilderConfig.get_timing_cache",
        "ITimingCache.serialize",
        "IOptimizationProfile.set_shape",
        "MemoryPoolType.WORKSPACE",
        "BuilderFlag.TF32",
    ),
    "weak_typing": (
        "BuilderFlag.FP16",
        "BuilderFlag.BF16",
        "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
        "ILayer.precision",
        "ILayer.set_output_type",
    ),
}


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
#: The precisions a strongly typed build of the bundle's fp32 graphs runs (TensorRT 11: no weak typing).
STRONGLY_TYPED_PRECISIONS = ("fp32", "tf32")


@dataclass(frozen=True)
class TrtFeatures:
    """What one TensorRT version offers medsr.

    Attributes:
        version: the version string (``tensorrt.__version__``).
        weak_typing: BuilderFlag.FP16/BF16/OBEY_PRECISION_CONSTRAINTS and ILayer.precision/set_output_type exist
            (10.x; removed in 11).
        precisions: the builder precisions medsr runs on it (keys of RECIPES; ``auto`` needs ``fp16``).
    """

    version: str
    weak_typing: bool
    precisions: tuple[str, ...]

    @property
    def api_names(self) -> tuple[str, ...]:
        """Every TensorRT name medsr uses on this version (TRT_API of its path)."""
        return TRT_API["common"] + (TRT_API["weak_typing"] if self.weak_typing else ())

    def check_precision(self, precision: str) -> None:
        """Refuse a precision this version cannot build, in one line naming the version and what it runs."""
        wanted = AUTO_REDUCED["trt"] if precision == AUTO else precision
        if wanted not in self.precisions:
            raise BackendError(
                f"TensorRT {self.version} runs --precision {', '.join(self.precisions)} in medsr, not {precision}: "
                f"it has no weak typing (no fp16/bf16 builder flags) and the bundle's graphs are fp32; "
                f"for {precision} use TensorRT 10.x ({INSTALL_HINT_WEAK})"
            )


def _version_tuple(version: str) -> tuple[int, int]:
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise BackendError(f"unreadable TensorRT version {version!r}: {INSTALL_HINT}") from exc


def trt_features(version: str) -> TrtFeatures:
    """The features of TensorRT ``version``; a BackendError naming it and what to install when medsr does not
    support it (10.8 to 11.x)."""
    major, minor = _version_tuple(version)
    if (major, minor) < MIN_VERSION or major > MAX_MAJOR:
        raise BackendError(
            f"--engine trt supports TensorRT {MIN_VERSION[0]}.{MIN_VERSION[1]} to {MAX_MAJOR}.x, found {version}: "
            f"{INSTALL_HINT}"
        )
    weak = major < 11
    return TrtFeatures(str(version), weak, tuple(RECIPES) if weak else STRONGLY_TYPED_PRECISIONS)


_LOGGERS: dict[int, tuple[object, object]] = {}


def trt_logger(trt):
    """The one TensorRT Logger of this process (per ``trt`` module: tests pass fakes), shared by every Builder,
    OnnxParser and Runtime: TensorRT warns when a second logger is passed to it."""
    held = _LOGGERS.get(id(trt))
    if held is None or held[0] is not trt:
        held = _LOGGERS[id(trt)] = (trt, trt.Logger(trt.Logger.WARNING))
    return held[1]


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
    """Force every layer of ``layer_types`` (trt.LayerType names) to compute and output fp32; their names.
    Weak typing only (TensorRT 10.x): callers check TrtFeatures.weak_typing first."""
    if not layer_types:
        return []
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
    """(builder, network, parser) with the ONNX graph parsed; parser errors raise BackendError with every message.
    TensorRT 11 networks are always strongly typed (flag 0 is the only kind there is); 10.x networks are weakly
    typed so that the builder flags of RECIPES apply."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return builder, network, parser


def attach_timing_cache(config, cache_path: Path | None):
    """Give ``config`` the timing cache read from ``cache_path`` (a new one when absent). A cache TensorRT refuses
    (written by another GPU or TensorRT, or corrupt) is replaced by a new one with a warning; when even a new one
    is refused the build runs without a timing cache. The cache attached, or None."""
    data = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if data:
        warnings.warn(
            f"TensorRT refused the timing cache {cache_path} (another GPU or TensorRT version, or corrupt): "
            "building with a new one, which replaces it",
            stacklevel=3,
        )
        cache = config.create_timing_cache(b"")
        if config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    warnings.warn("TensorRT refused a new timing cache: building without one", stacklevel=3)
    return None


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
    cache that cannot be written back is skipped with a warning; the plan is still returned. A precision this
    TensorRT cannot build (fp16/bf16 on 11.x) is a one-line BackendError before anything is parsed.
    """
    onnx_path = Path(onnx_path)
    plan = precision_plan(precision)
    features = trt_features(trt.__version__)
    features.check_precision(precision)
    logger = trt_logger(trt)
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
    cache = attach_timing_cache(config, cache_path)
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
    if cache_path and cache is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_path, overwrite=True) as staging:
                staging.write_bytes(bytes(config.get_timing_cache().serialize()))
        except (OSError, OutputError) as exc:
            warnings.warn(f"TensorRT timing cache not saved: {exc}", stacklevel=2)
    return bytes(serialized)
