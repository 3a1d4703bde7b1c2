"""Native TensorRT behind the Session interface: a versioned plan cache, per-shape executors, CUDA graphs.

Plans live in the engine cache (medsr.bundle.cache), never in the bundle:
``engines/<manifest sha256>/tensorrt-<version>/<GPU>-sm<compute capability>/<graph>-<precision>-<profile>.plan``
with a JSON of its key: graph sha256, precision, builder recipe (its settings, the method deciding fp32 islands and
the medsr version: medsr.engine.trt_build.recipe_id), shape profile, TensorRT version, GPU name and compute
capability. A plan whose key differs from this machine's (one copied from elsewhere) is stale: it is
refused with a message naming what differs and rebuilt, never silently reused; with ``build=False`` the refusal is
a BackendError. The timing cache is shared by every bundle: ``runtimes/tensorrt-<version>/<GPU>/timing.cache``. An
unwritable cache runs uncached (plans built in memory) with one warning. See docs/design.md, "Nothing is written at
run time into a bundle or the package".

Each input shape gets an executor: device buffers and page-locked host buffers allocated once, and for a static
profile the whole step (copies in, the engine, copies out) captured once as a CUDA graph and replayed, so a step
costs one launch (a capture that CUDA or TensorRT refuses leaves that executor without graphs, with one warning).
One plan serves a whole volume: a batch smaller than a static plan's batch with the same plane size (a volume's last
batch) is padded to it by repeating its last item, and the outputs are cropped, instead of building another plan for
minutes; the graphs treat the items of a batch independently, so the real items' results do not change. Every
executor of a plan shares its one deserialized ICudaEngine (several execution contexts, used one after the other on
the session's stream), so a plan's weights sit on the GPU once (docs/sources.md, "GPU engines"). Activations and
weights never leave the GPU. With CuPy installed, the denoising loop binds an executor's device buffers
(:meth:`TrtSession.bind`, medsr.engine.device_loop) and the latents stay on the GPU for the whole loop: the NumPy
scheduler's coefficients are applied by one fused CuPy kernel per step on the session's stream, and for a static
shape the whole trajectory of a batch (timesteps, engine, steps) is captured as one CUDA graph and replayed for
every later batch of that shape (the engine alone per step where the loop must stop at each step: a trace, chunks).
Without CuPy, the latent (B x C x h x w float32, 48 KB for one 256x256 slice of a f=4 model) crosses to the host and
back once per step, with one warning naming the package. TensorRT and cuda-python are imported only here, on first
use; a missing package or GPU is a BackendError. TensorRT 10.8 to 11.x is supported
(medsr.engine.trt_build.trt_features): fp16 and bf16 build from a mixed-precision ONNX with fp32 islands chosen by
the parity gate (medsr.engine.mixed_precision), strongly typed on 11.x, with pinned layers on 10.x;
:attr:`TrtSession.precision_report` says what was decided, for outputs' provenance.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medsr.bundle.cache import engine_dir, runtime_dir, usable_dir
from medsr.bundle.graphs import GRAPHS
from medsr.engine.cuda import GPU_EXTRA_HINT, CudaRuntime, GpuInfo
from medsr.engine.device_loop import CupyArrays, external_stream, import_cupy, warn_without_cupy
from medsr.engine.precision import AUTO, AUTO_REDUCED, PRECISIONS, choose_mixed
from medsr.engine.profiles import Shape, ShapeProfile, choose_profile
from medsr.engine.trt_build import INSTALL_HINT, recipe_id, trt_features, trt_logger
from medsr.errors import BackendError, OutputError, ShapeError
from medsr.io.atomic import atomic_path

LOG = logging.getLogger(__name__)


def import_tensorrt():
    """The ``tensorrt`` module, a version medsr supports (10.8 to 11.x, medsr.engine.trt_build.trt_features), or a
    BackendError that says what to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # not installed, or its libraries (libnvinfer) missing
        raise BackendError(
            f"--engine trt needs TensorRT 10.8 to 11.x, which does not import ({exc}): {INSTALL_HINT}, or "
            f"{GPU_EXTRA_HINT}, or run the medsr container (Dockerfile); --engine ort --device cuda runs ONNX Runtime "
            "on the GPU instead"
        ) from exc
    trt_features(trt.__version__)
    return trt


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on. Two plans are interchangeable only when every field is equal."""

    graph: str
    graph_sha256: str
    precision: str
    recipe: str
    profile: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    @property
    def stem(self) -> str:
        """File name stem: what the plan is for; the machine-dependent fields are checked, not named."""
        return f"{self.graph}-{self.precision}-{self.profile}"

    def mismatches(self, other: PlanKey) -> list[str]:
        """Human-readable differences ``self`` (this machine) vs ``other`` (a cached plan)."""
        labels = {
            "graph_sha256": "graph sha256",
            "recipe": "build recipe",
            "tensorrt_version": "TensorRT version",
            "gpu_name": "GPU",
            "compute_capability": "compute capability",
        }
        return [
            f"{label}: plan {getattr(other, field)!s}, here {getattr(self, field)!s}"
            for field, label in labels.items()
            if getattr(self, field) != getattr(other, field)
        ]


class PlanCache:
    """Plans on disk: ``<stem>.plan`` and ``<stem>.json`` (the PlanKey and the plan's sha256). ``root`` None: no
    cache (an unwritable cache folder), every lookup misses and nothing is stored."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else Path(root)

    def paths(self, key: PlanKey) -> tuple[Path, Path]:
        folder = self.root if self.root is not None else Path("<uncached>")
        return folder / f"{key.stem}.plan", folder / f"{key.stem}.json"

    def lookup(self, key: PlanKey) -> tuple[bytes | None, str | None]:
        """(plan, None) on a hit; (None, None) when absent; (None, reason) when a stale or corrupt plan is there."""
        plan_path, meta_path = self.paths(key)
        if self.root is None or not plan_path.is_file():
            return None, None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            cached = PlanKey(**meta["key"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"its key file {meta_path.name} is missing or unreadable ({exc})"
        differences = key.mismatches(cached)
        if differences:
            return None, "built for another setup: " + "; ".join(differences)
        plan = plan_path.read_bytes()
        if hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            return None, "the plan file does not match its recorded sha256 (truncated or modified)"
        return plan, None

    def store(self, key: PlanKey, plan: bytes) -> Path | None:
        """Write the plan and its key atomically (key last: a plan without its key is never trusted); its path, or
        None when there is no cache or the write failed (with a warning: the plan still runs from memory)."""
        if self.root is None:
            return None
        plan_path, meta_path = self.paths(key)
        meta = json.dumps({"key": asdict(key), "plan_sha256": hashlib.sha256(plan).hexdigest()}).encode()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for path, data in ((plan_path, plan), (meta_path, meta)):
                with atomic_path(path, overwrite=True) as staging:
                    staging.write_bytes(data)
        except (OSError, OutputError) as exc:
            warnings.warn(f"TensorRT plan not cached: {exc}", stacklevel=3)
            return None
        return plan_path


@dataclass
class LoadedPlan:
    """A deserialized plan: the ICudaEngine and the Runtime that made it (kept: the runtime outlives its engine).
    Every execution context of the plan is made from this one engine."""

    runtime: object
    engine: object


def load_plan(trt, plan: bytes) -> LoadedPlan:
    """Deserialize ``plan`` once; a BackendError when TensorRT cannot."""
    runtime = trt.Runtime(trt_logger(trt))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendError("TensorRT could not deserialize the plan (built by another TensorRT or corrupt)")
    return LoadedPlan(runtime, engine)


class PlanExecutor:
    """One plan run at one set of input shapes: activate -> allocate -> infer -> close.

    Args:
        trt, cuda: the tensorrt module and a CudaRuntime (tests inject fakes).
        plan: the LoadedPlan (shared by every executor of the plan), or serialized engine bytes (loaded here).
        shapes: input name -> shape this executor runs.
        cuda_graph: capture copies + engine once and replay them (static shapes only).
    """

    def __init__(self, trt, cuda: CudaRuntime, plan: LoadedPlan | bytes, shapes: dict[str, Shape], cuda_graph: bool):
        self.trt, self.cuda, self.shapes, self.use_graph = trt, cuda, shapes, cuda_graph
        loaded = plan if isinstance(plan, LoadedPlan) else load_plan(trt, plan)
        self.runtime, self.engine = loaded.runtime, loaded.engine
        self.context = self.activate()
        self.buffers: dict[str, tuple[int, int, np.ndarray]] = {}
        self.graph = None  # copies in, engine, copies out (infer)
        self.device_graph = None  # the engine alone, on the device buffers as they are (execute_device)
        self.allocate()

    def activate(self):
        context = self.engine.create_execution_context()
        for name, shape in self.shapes.items():
            if not context.set_input_shape(name, shape):
                raise ShapeError(f"input {name} shape {shape} is outside the plan's optimization profile")
        return context

    def _tensor_names(self, mode) -> list[str]:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        return [name for name in names if self.engine.get_tensor_mode(name) == mode]

    def allocate(self) -> None:
        """A device buffer and a pinned host buffer per input and output, bound to the context."""
        inputs = self._tensor_names(self.trt.TensorIOMode.INPUT)
        outputs = self._tensor_names(self.trt.TensorIOMode.OUTPUT)
        for name in inputs + outputs:
            shape = tuple(self.shapes[name]) if name in inputs else tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            host_address, host = self.cuda.pinned(shape, dtype)
            device = self.cuda.malloc(host.nbytes)
            self.context.set_tensor_address(name, device)
            self.buffers[name] = (device, host_address, host)
        self.input_names, self.output_names = tuple(inputs), tuple(outputs)

    def execute(self) -> None:
        """Queue the engine on the stream, on the device buffers as they are."""
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise BackendError("TensorRT execution failed (execute_async_v3 returned False)")

    def _enqueue(self) -> None:
        for name in self.input_names:
            device, host_address, host = self.buffers[name]
            self.cuda.copy_to_device(device, host_address, host.nbytes)
        self.execute()
        for name in self.output_names:
            device, host_address, host = self.buffers[name]
            self.cuda.copy_to_host(host_address, device, host.nbytes)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy ``feeds`` into the pinned inputs, run (graph replay or enqueue), return copies of the outputs."""
        for name in self.input_names:
            np.copyto(self.buffers[name][2], feeds[name], casting="same_kind")
        if self.graph is not None:
            self.cuda.launch(self.graph)
        else:
            self._enqueue()
            if self.use_graph:  # the first run did TensorRT's lazy setup; capture the next ones (this one is done)
                self.graph = self._capture_or_warn(self._enqueue)
        self.cuda.synchronize()
        return {name: self.buffers[name][2].copy() for name in self.output_names}

    def execute_device(self) -> None:
        """Run the engine on the device buffers as they are, queued on the stream (no host copy, no
        synchronization): the first call runs it directly (TensorRT's lazy setup) and, for a static shape,
        captures it as a CUDA graph that every later call replays."""
        if self.device_graph is not None:
            self.cuda.launch(self.device_graph)
            return
        self.execute()
        if self.use_graph:
            self.device_graph = self._capture_or_warn(self.execute)

    def capture(self, work):
        """``work`` recorded as an executable CUDA graph (not run)."""
        self.cuda.synchronize()
        self.cuda.begin_capture()
        try:
            work()
        except BaseException:
            self.cuda.abort_capture()  # leave capture mode, or the stream refuses all later work
            raise
        return self.cuda.end_capture()

    def _capture_or_warn(self, work):
        """:meth:`capture`, or None where CUDA or TensorRT refuses it (a BackendError): then this executor runs
        without graphs from now on, and one warning per process and reason says why. Other errors propagate."""
        try:
            return self.capture(work)
        except BackendError as exc:
            self.use_graph = False
            _warn_without_graphs(str(exc))
            return None

    def close(self) -> None:
        for graph in (self.graph, self.device_graph):
            if graph is not None:
                self.cuda.destroy_graph(graph)
        self.graph = self.device_graph = None
        for device, host_address, _ in self.buffers.values():
            self.cuda.free(device)
            self.cuda.free_pinned(host_address)
        self.buffers.clear()
        self.context = self.engine = self.runtime = None  # the context first: it must not outlive its engine


@functools.cache
def _warn_without_graphs(reason: str) -> None:
    warnings.warn(
        f"TensorRT: the engine could not be captured as a CUDA graph ({reason}); it runs without", stacklevel=4
    )


class TrtBinding:
    """An executor's device buffers as a medsr.engine.device_loop.CapturableGraph: array views (CuPy on the GPU)
    of the first ``batch`` items of each, so that a batch padded to a larger plan sees only its own items; the
    padding items start at zero and then hold earlier batches' finite values, which the graphs keep apart from the
    real items. At a static shape the denoising loop captures whole trajectories on the session's stream
    (``loops``, whose graphs :meth:`release` and :meth:`close` destroy)."""

    def __init__(self, executor: PlanExecutor, arrays, batch: int, outputs):
        self.arrays, self._executor = arrays, executor
        self._capturable = True
        self.loops: dict = {}
        with arrays.active():
            views = {
                name: arrays.view(device, host.shape, host.dtype)
                for name, (device, _, host) in executor.buffers.items()
            }
            for view in views.values():
                view.fill(0)
        self.inputs = {name: views[name][:batch] for name in executor.input_names}
        self.outputs = {name: views[name][:batch] for name in outputs}

    @property
    def capturable(self) -> bool:
        """False at a dynamic shape, or once a capture on this binding or its executor has been refused."""
        return self._capturable and self._executor.use_graph

    @capturable.setter
    def capturable(self, value: bool) -> None:
        self._capturable = value

    def run(self) -> None:
        self._executor.execute_device()

    def enqueue(self) -> None:
        self._executor.execute()

    def capture(self, work):
        return self._executor.capture(work)

    def launch(self, graph) -> None:
        self._executor.cuda.launch(graph)

    def release(self, graph) -> None:
        self._executor.cuda.destroy_graph(graph)

    def close(self) -> None:
        """Destroy the captured loops (before the executor frees the buffers they use)."""
        for loop in self.loops.values():
            if loop.graph is not None:
                self.release(loop.graph)
        self.loops.clear()


class TrtSession:
    """One bundle graph on TensorRT: picks a profile for each input shape, loads or builds its plan, runs it.

    Without ``profiles`` every new shape gets its own static profile (built on first use, then cached on disk);
    with them, a shape runs on the narrowest profile that admits it (medsr.engine.profiles.choose_profile). With
    ``pad_batch``, a shape no profile admits whose batch is smaller than that of a static profile of the same
    plane size (one this session knows, or a plan in the cache) runs padded on the smallest such profile
    (:meth:`padded_shapes`), so the last batch of a volume reuses the plan of its full batches. The executors of
    one plan share its deserialized engine.

    Args:
        graph: graph name (medsr.bundle.graphs); entry: its bundle GraphEntry (path, sha256).
        precision: one of medsr.engine.trt_build.RECIPES.
        cache: the PlanCache; gpu: this machine's GpuInfo.
        build: build missing or stale plans (False: refuse them with a BackendError).
        builder: ``builder(onnx_path, profile, precision) -> plan bytes``; default: medsr.engine.trt_build.build_plan.
        timing_cache: the TensorRT timing cache file the default builder reads and updates (None: none).
    """

    #: where it computes (medsr.engine.sessions.Session): the host stages can overlap it
    device = "cuda"

    def __init__(
        self,
        graph,
        entry,
        precision,
        cache: PlanCache,
        trt,
        cuda,
        gpu: GpuInfo,
        profiles=(),
        build=True,
        builder=None,
        cuda_graphs=True,
        timing_cache: Path | None = None,
        pad_batch: bool = True,
    ):
        spec = GRAPHS[graph]
        self.graph, self.entry, self.precision, self.cache = graph, entry, precision, cache
        self.trt, self.cuda, self.gpu, self.build, self.cuda_graphs = trt, cuda, gpu, build, cuda_graphs
        self.timing_cache = timing_cache
        self.profiles = list(profiles)
        self.builder = builder or self._default_builder
        self.input_names, self.output_names = spec.inputs, spec.outputs
        self.providers = (f"TensorRT-{trt.__version__}-{precision}",)
        self.pad_batch = pad_batch
        self._executors: dict[tuple, PlanExecutor] = {}
        self._loaded: dict[str, LoadedPlan] = {}  # profile tag -> the one engine of that plan
        self._targets: dict[tuple, dict[str, Shape]] = {}  # input shapes -> the shapes they run at (padded_shapes)
        self.arrays = None  # what bind views the device buffers with: CuPy on the session's stream, made on first use
        self._bindings: dict[tuple, TrtBinding] = {}

    @property
    def precision_report(self) -> dict:
        """What this graph runs as built (medsr.engine.trt_build.precision_report): its precision, fp32 islands and
        their parity; every output's provenance carries it."""
        from medsr.engine.trt_build import precision_report

        return precision_report(self.cache.root, self.entry.path, self.precision)

    def _default_builder(self, onnx_path, profile: ShapeProfile, precision: str) -> bytes:
        from medsr.engine.trt_build import build_plan

        return build_plan(self.trt, onnx_path, profile, precision, self.timing_cache, mixed_dir=self.cache.root)

    def key(self, profile: ShapeProfile) -> PlanKey:
        return PlanKey(
            self.graph,
            self.entry.sha256,
            self.precision,
            recipe_id(self.precision),
            profile.tag,
            self.trt.__version__,
            self.gpu.name,
            self.gpu.compute_capability,
        )

    def plan(self, profile: ShapeProfile) -> bytes:
        """The cached plan for ``profile``, built (and cached) when absent or stale."""
        key = self.key(profile)
        plan, stale = self.cache.lookup(key)
        if plan is not None:
            return plan
        plan_path = self.cache.paths(key)[0]
        if stale:
            if not self.build:
                raise BackendError(f"{plan_path}: stale TensorRT plan refused, {stale}; rebuild it with build=True")
            warnings.warn(f"{plan_path.name}: stale TensorRT plan rebuilt, {stale}", stacklevel=2)
        elif not self.build:
            raise BackendError(f"{plan_path}: no TensorRT plan for this shape profile and building is off")
        where = (
            f"cached in {plan_path.parent}" if self.cache.root is not None else "not cached: the cache is unwritable"
        )
        LOG.info(
            "building the TensorRT plan of %s (%s, shapes %s) for %s: this can take minutes, once per GPU model, "
            "TensorRT version and shapes (%s)",
            self.graph,
            self.precision,
            profile.tag,
            self.gpu.name,
            where,
        )
        start = time.perf_counter()
        plan = self.builder(self.entry.path, profile, self.precision)
        self.cache.store(key, plan)
        LOG.info("built the TensorRT plan of %s in %.0f s", self.graph, time.perf_counter() - start)
        return plan

    def loaded(self, profile: ShapeProfile) -> LoadedPlan:
        """The deserialized plan of ``profile``, loaded (and built when needed) once per session."""
        if profile.tag not in self._loaded:
            self._loaded[profile.tag] = load_plan(self.trt, self.plan(profile))
        return self._loaded[profile.tag]

    def executor(self, shapes: dict[str, Shape]) -> PlanExecutor:
        signature = tuple(shapes[name] for name in self.input_names)
        if signature not in self._executors:
            profile = choose_profile(self.profiles, shapes)
            if profile is None:
                profile = ShapeProfile(self.graph, tuple((n, (s, s, s)) for n, s in shapes.items()))
                self.profiles.append(profile)
            use_graph = self.cuda_graphs and profile.static
            self._executors[signature] = PlanExecutor(self.trt, self.cuda, self.loaded(profile), shapes, use_graph)
        return self._executors[signature]

    def padded_shapes(self, shapes: dict[str, Shape]) -> dict[str, Shape]:
        """The shapes ``shapes`` run at: themselves when a profile admits them or ``pad_batch`` is off, else those
        of the smallest larger batch of a static profile with the same other dimensions, among this session's
        profiles and then the plans in the cache (a batch that no plan exceeds, or whose own plan is in the cache,
        runs as it is). Decided once per shape."""
        signature = tuple(shapes[name] for name in self.input_names)
        if signature in self._executors or not self.pad_batch:
            return shapes
        if signature not in self._targets:
            self._targets[signature] = self._pad_target(shapes)
        return self._targets[signature]

    def _pad_target(self, shapes: dict[str, Shape]) -> dict[str, Shape]:
        if choose_profile(self.profiles, shapes) is not None:
            return shapes
        batch = shapes[self.input_names[0]][0]
        batches = [b for b in (_static_batch(p, shapes) for p in self.profiles) if b is not None and b > batch]
        if not batches:
            cached = self._cached_batches(shapes)
            batches = [] if batch in cached else [b for b in cached if b > batch]
        if not batches:
            return shapes
        target = min(batches)
        return {name: (target, *shape[1:]) for name, shape in shapes.items()}

    def _cached_batches(self, shapes: dict[str, Shape]) -> list[int]:
        """Batches of the static plans of this graph and precision in the cache with the plane size of ``shapes``
        (a plan built by an earlier run or by medsr-export --trt-precision); its key is checked when it is used."""
        if self.cache.root is None or not self.cache.root.is_dir():
            return []
        prefix = f"{self.graph}-{self.precision}-"
        found = []
        for path in self.cache.root.glob(f"{prefix}*.plan"):
            tag = path.name[len(prefix) : -len(".plan")]
            parts = tag.split("_")
            if "-" in tag or len(parts) != len(self.input_names):
                continue
            try:
                dims = [tuple(int(d) for d in part.split("x")) for part in parts]
            except ValueError:
                continue
            profile = ShapeProfile(self.graph, tuple((n, (d, d, d)) for n, d in zip(self.input_names, dims)))
            batch = _static_batch(profile, shapes)
            if batch is not None:
                found.append(batch)
        return found

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named float32 arrays in, named float32 arrays out (host memory), like every Session.

        A batch padded to a larger plan (:meth:`padded_shapes`) repeats its last item up to the plan's batch;
        the outputs are cropped back to the batch given."""
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise ShapeError(f"{self.graph}: missing input(s) {', '.join(missing)}")
        shapes = {name: tuple(np.shape(feeds[name])) for name in self.input_names}
        target = self.padded_shapes(shapes)
        if target == shapes:
            return self.executor(shapes).infer(feeds)
        batch = shapes[self.input_names[0]][0]
        padded = {name: _pad_batch(np.asarray(feeds[name]), target[name][0]) for name in self.input_names}
        return {name: out[:batch] for name, out in self.executor(target).infer(padded).items()}

    def bind(self, inputs: dict[str, Shape], outputs: dict[str, Shape]) -> TrtBinding | None:
        """The device buffers of the executor these input shapes run on (padded like :meth:`run`), as arrays the
        denoising loop keeps its latents in; None, with one warning, when CuPy is not installed."""
        if self.arrays is None:
            cupy = import_cupy()
            if cupy is None:
                warn_without_cupy("TensorRT")
                return None
            self.arrays = CupyArrays(cupy, external_stream(cupy, self.cuda.stream_handle))
        signature = tuple(inputs[name] for name in self.input_names)
        if signature not in self._bindings:
            executor = self.executor(self.padded_shapes(inputs))
            self._bindings[signature] = TrtBinding(executor, self.arrays, signature[0][0], outputs)
        return self._bindings[signature]

    def close(self) -> None:
        for binding in self._bindings.values():
            binding.close()
        self._bindings.clear()
        for executor in self._executors.values():
            executor.close()
        self._executors.clear()
        self._targets.clear()
        self._loaded.clear()  # after every context of each engine is gone


def _static_batch(profile: ShapeProfile, shapes: dict[str, Shape]) -> int | None:
    """The batch of ``profile`` when it is static, names the inputs of ``shapes``, has one batch for all of them
    and the same other dimensions; else None."""
    if not profile.static:
        return None
    bounds = {name: low for name, (low, _, _) in profile.shapes}
    if set(bounds) != set(shapes):
        return None
    batches = {bounds[name][0] for name in shapes}
    same = all(len(bounds[n]) == len(s) and tuple(bounds[n][1:]) == tuple(s[1:]) for n, s in shapes.items())
    return batches.pop() if same and len(batches) == 1 else None


def _pad_batch(array: np.ndarray, batch: int) -> np.ndarray:
    """``array`` (B, ...) with its last item repeated up to ``batch`` items."""
    extra = batch - array.shape[0]
    return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)]) if extra > 0 else array


def gpu_folder(gpu: GpuInfo) -> str:
    """The device part of the cache paths: ``<GPU name>-sm<compute capability>``."""
    return f"{gpu.name}-sm{gpu.compute_capability}"


def open_trt_sessions(
    bundle,
    precision: str = "fp16",
    profiles: dict | None = None,
    build: bool = True,
    trt=None,
    cuda=None,
    pad_batch: bool = True,
) -> dict[str, TrtSession]:
    """A TrtSession per graph of ``bundle``, sharing one CUDA stream, the bundle's plan folder of the engine cache
    and this GPU's timing cache.

    ``precision``: one of PRECISIONS["trt"] for every graph, or {graph: precision}; ``auto``: fp16 per graph where
    the parity gate of medsr.engine.precision.choose_mixed passes against TensorRT fp32 (its probe builds plans
    of both), fp32 elsewhere, the choice and its parity named in each session's ``providers``.
    ``profiles``: {graph: [ShapeProfile]}; ``pad_batch``: run a smaller batch padded on a larger static plan of
    the same plane size instead of building another (TrtSession).
    """
    trt = trt or import_tensorrt()
    precisions = precision if isinstance(precision, dict) else dict.fromkeys(bundle.graphs, precision)
    bad = {graph: p for graph, p in precisions.items() if p not in PRECISIONS["trt"]}
    if bad:
        raise BackendError(f"TensorRT precision must be one of {', '.join(PRECISIONS['trt'])}, got {bad}")
    features = trt_features(trt.__version__)
    for chosen in dict.fromkeys(precisions.values()):
        features.check_precision(chosen)  # before the GPU is touched
    cuda = cuda or CudaRuntime()
    gpu = cuda.gpu()
    device = gpu_folder(gpu)
    plans = usable_dir(engine_dir(bundle, "tensorrt", trt.__version__, device), "TensorRT plan cache")
    timing_cache = None  # without a plan cache (already warned) there is no timing cache either
    if plans is not None and usable_dir(timings := runtime_dir("tensorrt", trt.__version__, device), "timing cache"):
        timing_cache = timings / "timing.cache"
    cache = PlanCache(plans)

    def session(graph: str, chosen: str) -> TrtSession:
        graph_profiles = (profiles or {}).get(graph, ())
        return TrtSession(
            graph,
            bundle.graphs[graph],
            chosen,
            cache,
            trt,
            cuda,
            gpu,
            graph_profiles,
            build,
            timing_cache=timing_cache,
            pad_batch=pad_batch,
        )

    if AUTO not in precisions.values():
        return {graph: session(graph, precisions[graph]) for graph in bundle.graphs}
    if set(precisions.values()) != {AUTO}:
        raise BackendError(f"TensorRT precision auto applies to every graph or none, got {precisions}")
    chosen, _, parity = choose_mixed(
        bundle, lambda p: {graph: session(graph, p) for graph in bundle.graphs}, AUTO_REDUCED["trt"]
    )
    for item in chosen.values():
        item.providers = (f"{item.providers[0]} (auto: {parity:.1f} dB vs fp32 on the probe)",)
    return chosen
