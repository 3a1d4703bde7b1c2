"""TensorRT engine (plan) building from a bundle's ONNX graphs: builder recipe per precision, shape profiles,
timing cache, and which TensorRT versions medsr supports with which precisions.

Precisions (``--precision`` of ``--engine trt``, medsr.engine.precision.PRECISIONS["trt"]):

- ``fp32``: strict fp32 (TF32 off).
- ``tf32``: fp32 storage, TF32 tensor-core matrix products.
- ``fp16``: fp16 but for fp32 islands decided per graph by measurement (medsr.engine.mixed_precision): the
  timestep embedding first (fp16 cannot represent 999 x freq closely), widened when the graph's parity gate fails,
  fp32 for the whole graph when no island passes. Normalization layers are not pinned: TensorRT computes them in
  fp32 already (docs/sources.md, "GPU engines").
- ``fp16-all``: fp16 everywhere (fastest; only where parity allows it).
- ``bf16``: bf16 with the same islands, decided on an emulation of bf16 storage with fp32 arithmetic (ONNX
  Runtime has no bf16 CPU kernels; medsr.engine.mixed_precision), Ampere and newer.
- ``auto``: fp16 per graph where the end-to-end parity gate of medsr.engine.precision passes, fp32 elsewhere
  (resolved by medsr.engine.trt.open_trt_sessions before anything is built here).

TensorRT versions (:func:`trt_features`, the one place that says what each version has): 10.8 to 10.x build the
reduced precisions through weak typing (builder flags FP16/BF16/OBEY_PRECISION_CONSTRAINTS, the islands' layers
pinned to fp32). TensorRT 11 removed weak typing: a reduced precision is built from a mixed-precision copy of the
graph (fp16/bf16 tensors, fp32 islands, Casts at their borders) in a ``STRONGLY_TYPED`` network. The islands
decided and the mixed graph are kept beside the plans (:func:`mixed_graph`) and read back by
:func:`precision_report`. :data:`TRT_API` lists every TensorRT name this module and medsr.engine.trt use, by the
path that uses it; tests/test_trt_api_surface.py checks it against the real bindings of each major version and
tests/trt_fakes.py exposes exactly those names.

TensorRT is imported lazily by the caller and passed in as ``trt``, so this module imports neither torch nor
TensorRT; medsr.engine.trt uses it to build missing or stale plans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from medsr import __version__
from medsr.bundle.load import MANIFEST_NAME, read_manifest, sha256_file
from medsr.engine.mixed_precision import (
    DECISION_METHOD,
    ISLAND_LEVELS,
    IslandDecision,
    decide_islands,
    validation_feeds,
    write_mixed,
)
from medsr.engine.precision import AUTO, AUTO_REDUCED
from medsr.engine.profiles import ShapeProfile
from medsr.errors import BackendError, OutputError
from medsr.io.atomic import atomic_path

LOG = logging.getLogger(__name__)

#: The oldest TensorRT medsr supports (the newest major is 11) and what to install otherwise.
MIN_VERSION = (10, 8)
MAX_MAJOR = 11
INSTALL_HINT = "pip install 'tensorrt>=10.8,<12'"

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
        "ILayer.get_output",
        "ITensor.name",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
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
    """One precision's build: builder flags to set and clear on every version, those set only under weak typing
    (10.x), the reduced type of the graph (None: fp32), and the island levels its parity gate may widen through
    (empty: no islands, the whole graph reduced)."""

    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    weak_flags: tuple[str, ...] = ()
    reduced: str | None = None
    island_levels: tuple[str, ...] = ()


#: The builder recipe of every precision of PRECISIONS["trt"] but ``auto`` (which is resolved per graph first).
RECIPES = {
    "fp32": PrecisionPlan((), ("TF32",)),
    "tf32": PrecisionPlan(("TF32",), ()),
    "fp16": PrecisionPlan((), (), ("FP16", "OBEY_PRECISION_CONSTRAINTS"), "fp16", ISLAND_LEVELS),
    "fp16-all": PrecisionPlan((), (), ("FP16",), "fp16"),
    "bf16": PrecisionPlan((), (), ("BF16", "OBEY_PRECISION_CONSTRAINTS"), "bf16", ISLAND_LEVELS),
}


@dataclass(frozen=True)
class TrtFeatures:
    """What one TensorRT version offers medsr.

    Attributes:
        version: the version string (``tensorrt.__version__``).
        weak_typing: BuilderFlag.FP16/BF16/OBEY_PRECISION_CONSTRAINTS and ILayer.precision/set_output_type exist
            (10.x; removed in 11, where reduced precisions are built strongly typed from a mixed graph).
        precisions: the builder precisions medsr runs on it (keys of RECIPES; ``auto`` needs ``fp16``).
    """

    version: str
    weak_typing: bool
    precisions: tuple[str, ...] = tuple(RECIPES)

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
                f"{INSTALL_HINT}"
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
    return TrtFeatures(str(version), weak_typing=major < 11)


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
    """A short digest of the builder recipe of ``precision`` (flags set and cleared, island levels), the method
    that decides its fp32 islands where it has any (medsr.engine.mixed_precision.DECISION_METHOD) and the medsr
    version: part of a plan's cache key and of its island decision's, so a plan or decision made by an older recipe
    is made again, not reused (a new island method leaves the plans without islands alone)."""
    plan = precision_plan(precision)
    recipe = (plan, DECISION_METHOD if plan.island_levels else None, __version__)
    return hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]


def trt_name(trt, dotted: str):
    """``trt.<dotted>`` (e.g. ``BuilderFlag.FP16``), or one BackendError naming the TensorRT version and what to
    install when these bindings lack it."""
    value = trt
    for part in dotted.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise BackendError(f"TensorRT {trt.__version__} has no {dotted}: {INSTALL_HINT}") from None
    return value


def pin_fp32_layers(trt, network, fp32_nodes: tuple[str, ...], fp32_tensors: tuple[str, ...] = ()) -> list[str]:
    """Force the layers of the ONNX nodes ``fp32_nodes`` to compute and output fp32: a layer is theirs when it
    has a node's name or writes one of ``fp32_tensors`` (their outputs and the constants they read, which the ONNX
    parser turns into constant layers named by their tensor). Their names. Weak typing only (TensorRT 10.x)."""
    names, tensors = set(fp32_nodes), set(fp32_tensors)
    if not names:
        return []
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = {layer.get_output(i).name for i in range(layer.num_outputs)}
        if layer.name in names or outputs & tensors:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned.append(layer.name)
    return pinned


def parse_onnx(trt, logger, onnx_path: Path, strongly_typed: bool = False):
    """(builder, network, parser) with the ONNX graph parsed; parser errors raise BackendError with every message.
    ``strongly_typed``: the network takes the graph's own types (NetworkDefinitionCreationFlag.STRONGLY_TYPED, how
    TensorRT 11 builds a mixed graph); else weakly typed on 10.x, so that the builder flags of RECIPES apply, and the
    only kind on 11.x for an fp32 graph."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt_name(trt, "NetworkDefinitionCreationFlag.STRONGLY_TYPED")) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return builder, network, parser


def _graph_name(onnx_path: Path) -> str:
    return onnx_path.name.removesuffix(".onnx")


def mixed_paths(folder: Path, onnx_path: Path, precision: str) -> tuple[Path, Path]:
    """(mixed graph, decision) files of ``onnx_path`` in ``precision``: ``<graph>-<precision>.mixed.onnx`` and
    ``.mixed.json`` beside the plans."""
    stem = f"{_graph_name(onnx_path)}-{precision}.mixed"
    return folder / f"{stem}.onnx", folder / f"{stem}.json"


def mixed_graph(onnx_path: Path, precision: str, folder: Path | None) -> tuple[Path, dict]:
    """The mixed-precision graph of ``onnx_path`` for ``precision`` (a reduced RECIPES key) and its report
    ({"precision", "level", "fp32_nodes", "parity_db", "note", "graph_sha256", "recipe"}), decided once and kept in
    ``folder`` (the plan cache folder; None: a temporary folder, nothing kept).

    With island levels (``fp16``, ``bf16``) the islands are decided by medsr.engine.mixed_precision.decide_islands on
    the validation inputs of the bundle whose manifest lies beside the graph; ``fp16-all`` has none. The kept files
    are reused while the graph's sha256 and the recipe are those recorded; a report whose precision is ``fp32`` has
    the fp32 graph as its graph."""
    import onnx

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="medsr-mixed-"))
    graph_path, report_path = mixed_paths(folder, onnx_path, precision)
    digest, recipe = sha256_file(onnx_path), recipe_id(precision)
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report["graph_sha256"] == digest and report["recipe"] == recipe:
            return (graph_path if report["precision"] != "fp32" else onnx_path), report
    except (OSError, ValueError, KeyError, TypeError):
        pass
    plan = precision_plan(precision)
    model = onnx.load(str(onnx_path))
    if plan.island_levels:
        manifest = read_manifest(onnx_path.parent / MANIFEST_NAME)
        decision = decide_islands(model, plan.reduced, validation_feeds(manifest, _graph_name(onnx_path)))
    else:
        decision = IslandDecision(plan.reduced, "", (), {}, "no islands: the whole graph reduced")
    report = {**decision.to_dict(), "graph_sha256": digest, "recipe": recipe}
    folder.mkdir(parents=True, exist_ok=True)
    if decision.precision != "fp32":
        mixed = write_mixed(model, decision.fp32_nodes, plan.reduced)
        with atomic_path(graph_path, overwrite=True) as staging:
            onnx.save(mixed, str(staging))
    with atomic_path(report_path, overwrite=True) as staging:
        staging.write_text(json.dumps(report, indent=1), encoding="utf-8")
    LOG.info(
        "%s %s: %s, %d fp32 nodes (%s)",
        onnx_path.name,
        precision,
        decision.level,
        len(decision.fp32_nodes),
        decision.note,
    )
    return (graph_path if decision.precision != "fp32" else onnx_path), report


def precision_report(folder: Path | None, onnx_path: Path, precision: str) -> dict:
    """What ``precision`` means for the graph ``onnx_path`` as built into the plans of ``folder``, for outputs'
    provenance: {"precision": what runs, "level", "fp32_nodes", "parity_db", "note"} as recorded by
    :func:`mixed_graph`; fp32/tf32 (and a folder holding no decision yet) report themselves with no islands."""
    plan = precision_plan(precision)
    if folder is not None and plan.reduced is not None:
        try:
            report = json.loads(mixed_paths(Path(folder), Path(onnx_path), precision)[1].read_text(encoding="utf-8"))
            return {key: report[key] for key in ("precision", "level", "fp32_nodes", "parity_db", "note")}
        except (OSError, ValueError, KeyError):
            pass
    return {
        "precision": precision,
        "level": "",
        "fp32_nodes": [],
        "parity_db": {},
        "note": "not built yet" if plan.reduced is not None else "no reduced precision",
    }


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
    mixed_dir: str | os.PathLike | None = None,
) -> bytes:
    """A serialized TensorRT engine of ``onnx_path`` for ``profile`` in ``precision``.

    ``timing_cache``: a file of kernel timings shared by every build on this GPU; read if present and written back
    after the build (docs/sources.md, "Deployment engines": it cuts rebuilds from minutes to seconds). A timing
    cache that cannot be written back is skipped with a warning; the plan is still returned.

    A reduced precision first gets its fp32 islands (:func:`mixed_graph`, kept in ``mixed_dir``: the plan cache
    folder); TensorRT 10.x parses the fp32 graph weakly typed and pins the islands' layers, 11.x parses the mixed
    graph strongly typed. A TensorRT name these bindings lack is a one-line BackendError naming the version.
    """
    onnx_path = Path(onnx_path)
    plan = precision_plan(precision)
    features = trt_features(trt.__version__)
    features.check_precision(precision)
    source, report = (onnx_path, None) if plan.reduced is None else mixed_graph(onnx_path, precision, mixed_dir)
    reduced = report is not None and report["precision"] != "fp32"
    strongly_typed = reduced and not features.weak_typing
    logger = trt_logger(trt)
    builder, network, _parser = parse_onnx(trt, logger, onnx_path if features.weak_typing else source, strongly_typed)
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    recipe = plan if report is None or reduced else RECIPES["fp32"]  # every island failed the gate: fp32
    for flag in recipe.set_flags + (recipe.weak_flags if features.weak_typing else ()):
        config.set_flag(trt_name(trt, f"BuilderFlag.{flag}"))
    for flag in recipe.clear_flags:
        config.clear_flag(trt_name(trt, f"BuilderFlag.{flag}"))
    pinned = []
    if reduced and features.weak_typing:
        pinned = pin_fp32_layers(trt, network, tuple(report["fp32_nodes"]), _island_tensors(onnx_path, report))
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
        "built %s %s %s in %.1f s (%d layers pinned to fp32, strongly typed: %s)",
        onnx_path.name,
        precision,
        profile.tag,
        time.perf_counter() - start,
        len(pinned),
        strongly_typed,
    )
    if cache_path and cache is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_path, overwrite=True) as staging:
                staging.write_bytes(bytes(config.get_timing_cache().serialize()))
        except (OSError, OutputError) as exc:
            warnings.warn(f"TensorRT timing cache not saved: {exc}", stacklevel=2)
    return bytes(serialized)


def _island_tensors(onnx_path: Path, report: dict) -> tuple[str, ...]:
    """The tensors the fp32 nodes of ``report`` write and the constants they read (what TensorRT names the layers
    that compute them by)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    nodes = set(report["fp32_nodes"])
    tensors = [name for n in graph.node if n.name in nodes for name in (*n.output, *n.input) if name]
    return tuple(dict.fromkeys(t for t in tensors if t in initializers or t not in {i.name for i in graph.input}))
