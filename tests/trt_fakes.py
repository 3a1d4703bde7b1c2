"""Stand-ins for the tensorrt module and the CUDA runtime, so the TensorRT logic is tested without a GPU.

The fake engine computes, item by item of a batch as the real graphs do (so a padded batch leaves its real items
unchanged), ``model_output = 2 * sample + mean(lr_latent)``, ``latent_mean`` = the image averaged over 4 x 4 blocks
(``latent_logvar`` 0) and ``image = latent + 1`` repeated 4 x 4, the shapes of the f=4 graphs of
:func:`fake_bundle`; the fake CUDA runtime keeps buffers in NumPy arrays and records the work enqueued while a
graph is captured, replaying it on launch, as CUDA does.

The fake tensorrt of a version exposes exactly the TensorRT names medsr uses on that version
(medsr.engine.trt_build.TRT_API through trt_features(version).api_names): any other class, member or enum value
raises AttributeError, as a name removed from the real bindings would (11.x has no BuilderFlag.FP16 or
ILayer.precision). tests/test_trt_api_surface.py checks that these names match the real bindings of 10.x and 11.x
name for name, so the fakes model the real surface of the version they claim. FakeCudart does the same for the
cuda-python runtime names of medsr.engine.cuda.CUDART_API.
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np

from medsr.bundle.conditioning import PAPER
from medsr.engine.cuda import CUDART_API, GpuInfo
from medsr.engine.trt_build import trt_features

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
#: Real versions the fakes claim (tests/test_trt_api_surface.py checks their surfaces against these bindings).
TRT10, TRT11 = "10.8.0.43", "11.4.0.106"


class FakeCuda:
    """CudaRuntime's interface over host memory. ``captured`` work runs only when its graph is launched."""

    def __init__(self, gpu: GpuInfo | None = None):
        self._gpu, self.stream = gpu or H100, 7
        self.stream_handle = 7
        self.memory: dict[int, np.ndarray] = {}
        self._addresses = itertools.count(0x1000, 0x1000)
        self._capture: list | None = None
        self.graphs: dict[int, list] = {}
        self._handles = itertools.count(1)  # never reused, as destroyed graphs' handles are not
        self.launches = 0
        self.aborted = 0

    def gpu(self):
        return self._gpu

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    def submit(self, work) -> None:
        if self._capture is not None:
            self._capture.append(work)
        else:
            work()

    def malloc(self, nbytes):
        address = next(self._addresses)
        self.memory[address] = np.zeros(nbytes, np.uint8)
        return address

    def pinned(self, shape, dtype):
        address = next(self._addresses)
        array = np.zeros(shape, dtype)
        self.memory[address] = array.view(np.uint8).reshape(-1)
        return address, array

    def free(self, address):
        del self.memory[address]

    free_pinned = free

    def _copy(self, dst, src, nbytes):
        self.submit(lambda: np.copyto(self.memory[dst][:nbytes], self.memory[src][:nbytes]))

    def copy_to_device(self, device, host, nbytes):
        self._copy(device, host, nbytes)

    def copy_to_host(self, host, device, nbytes):
        self._copy(host, device, nbytes)

    def synchronize(self):
        assert self._capture is None, "cudaStreamSynchronize while capturing (cudaErrorStreamCaptureUnsupported)"

    def begin_capture(self):
        assert self._capture is None, "capture already under way"
        self._capture = []

    def end_capture(self):
        handle = next(self._handles)
        self.graphs[handle], self._capture = self._capture, None
        return handle

    def abort_capture(self):
        self._capture = None
        self.aborted += 1

    def launch(self, handle):
        self.launches += 1
        for work in self.graphs[handle]:
            work()

    def destroy_graph(self, handle):
        del self.graphs[handle]


def _members(version: str) -> dict[str, set[str]]:
    """{TensorRT class or module attribute: its members medsr uses on ``version``}; "" holds the module level."""
    members: dict[str, set[str]] = {"": set()}
    for name in trt_features(version).api_names:
        owner, _, member = name.rpartition(".")
        members[""].add(owner or member)
        if owner:
            members.setdefault(owner, set()).add(member)
    return members


class Surface:
    """Base of the fakes of TensorRT objects: public attributes are only those TRT_API names of ``trt_class`` on
    the fake's version (internal state starts with "_")."""

    _trt_class = ""

    def __init__(self, allowed: dict[str, set[str]]):
        object.__setattr__(self, "_allowed", allowed.get(self._trt_class, set()))
        object.__setattr__(self, "_all", allowed)

    def _check(self, name):
        if not name.startswith("_") and name not in object.__getattribute__(self, "_allowed"):
            raise AttributeError(f"fake tensorrt: '{self._trt_class}' object has no attribute '{name}'")

    def __getattribute__(self, name):
        object.__getattribute__(self, "_check")(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        self._check(name)
        object.__setattr__(self, name, value)


def strict_namespace(label: str, allowed: set[str], **values) -> SimpleNamespace:
    """A namespace (module or enum) holding only ``allowed`` of ``values``; anything else is an AttributeError."""
    kept = {name: value for name, value in values.items() if name in allowed}

    class Strict(SimpleNamespace):
        def __getattr__(self, name):
            raise AttributeError(f"fake tensorrt: {label} has no attribute '{name}'")

    return Strict(**kept)


#: The VAE factor of the fake graphs (and of fake_bundle).
FAKE_VAE_FACTOR = 4

GRAPH_IO = {
    "denoiser": (("sample", "lr_latent", "timestep"), ("model_output",)),
    "vae_decoder": (("latent",), ("image",)),
    "vae_encoder": (("image",), ("latent_mean", "latent_logvar")),
}


class FakeContext(Surface):
    _trt_class = "IExecutionContext"

    def __init__(self, allowed, engine):
        super().__init__(allowed)
        self._engine, self._shapes, self._addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        low, high = self._engine._bounds.get(name, (None, None))
        if low is not None and any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False
        self._shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self._shapes:
            return self._shapes[name]
        first = self._shapes[self._engine._inputs[0]]
        if self._engine._graph == "vae_encoder":  # f=4: the latent is the image / 4 on each side
            return (*first[:2], first[2] // FAKE_VAE_FACTOR, first[3] // FAKE_VAE_FACTOR)
        if self._engine._graph == "vae_decoder":
            return (*first[:2], first[2] * FAKE_VAE_FACTOR, first[3] * FAKE_VAE_FACTOR)
        return first

    def set_tensor_address(self, name, address):
        self._addresses[name] = address

    def _array(self, name):
        shape = self._shapes.get(name) or self.get_tensor_shape(name)
        return self._engine._cuda.memory[self._addresses[name]].view(np.float32).reshape(shape)

    def execute_async_v3(self, stream):
        engine = self._engine
        if engine._fail_executions:
            engine._fail_executions -= 1
            raise RuntimeError("fake TensorRT: execution failed")

        def work():
            f = FAKE_VAE_FACTOR
            for b in range(self._shapes[engine._inputs[0]][0]):  # item by item: a batch never mixes its items
                if engine._graph == "denoiser":
                    out = 2 * self._array("sample")[b] + self._array("lr_latent")[b].mean()
                    self._array("model_output")[b] = out
                elif engine._graph == "vae_decoder":
                    image = np.repeat(np.repeat(self._array("latent")[b], f, axis=1), f, axis=2) + 1
                    self._array("image")[b] = image
                else:
                    image = self._array("image")[b]
                    channels, height, width = image.shape
                    blocks = image.reshape(channels, height // f, f, width // f, f)
                    self._array("latent_mean")[b] = blocks.mean(axis=(2, 4))
                    self._array("latent_logvar")[b] = 0
            engine._executions += 1

        engine._cuda.submit(work)
        return True


class FakeEngine(Surface):
    _trt_class = "ICudaEngine"

    def __init__(self, allowed, graph, cuda, bounds=None):
        super().__init__(allowed)
        self._graph, self._cuda, self._bounds, self._executions = graph, cuda, bounds or {}, 0
        self._fail_executions = 0

    @property
    def _inputs(self):
        return GRAPH_IO[self._graph][0]

    @property
    def num_io_tensors(self):
        return sum(len(names) for names in GRAPH_IO[self._graph])

    def get_tensor_name(self, index):
        return (GRAPH_IO[self._graph][0] + GRAPH_IO[self._graph][1])[index]

    def get_tensor_mode(self, name):
        return "in" if name in self._inputs else "out"

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return FakeContext(self._all, self)


class FakeTensor(Surface):
    _trt_class = "ITensor"
    name = None  # an instance attribute, declared for the class view of the module

    def __init__(self, allowed, name):
        super().__init__(allowed)
        self.name = name


class FakeLayer(Surface):
    """A network layer; ``precision`` and ``set_output_type`` exist only where the version has weak typing."""

    _trt_class = "ILayer"
    name = type = num_outputs = precision = None  # instance attributes, declared for the class view of the module

    def __init__(self, allowed, name, kind, outputs=()):
        super().__init__(allowed)
        object.__setattr__(self, "_state", {"precision": None, "output_types": {}})
        object.__setattr__(self, "_outputs", [FakeTensor(allowed, tensor) for tensor in outputs])
        self.name, self.type, self.num_outputs = name, kind, len(outputs)

    def get_output(self, index):
        return self._outputs[index]

    def __getattribute__(self, name):
        if name == "precision":
            object.__getattribute__(self, "_check")(name)
            return object.__getattribute__(self, "_state")["precision"]
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name == "precision":
            self._check(name)
            self._state["precision"] = value
        else:
            super().__setattr__(name, value)

    def set_output_type(self, index, dtype):
        self._state["output_types"][index] = dtype


#: The layers of the fake network every fake build parses, as TensorRT's ONNX parser names them for the default
#: denoiser: a constant layer (named after nothing medsr knows, writing the frequencies initializer), the layers of
#: two timestep-embedding nodes (named by node; the Sin with a second output), a GroupNorm and a convolution.
FAKE_LAYERS = (
    ("constant_17", "CONSTANT", ("/unet/time_proj/Constant_1_output_0",)),
    ("/unet/time_proj/Mul", "ELEMENTWISE", ("/unet/time_proj/Mul_output_0",)),
    ("/unet/time_proj/Sin", "UNARY", ("/unet/time_proj/Sin_output_0", "extra")),
    ("/unet/conv_in/Conv", "CONVOLUTION", ("/unet/conv_in/Conv_output_0",)),
    ("groupnorm", "NORMALIZATION", ("/unet/down_blocks.0/resnets.0/norm1/InstanceNormalization_output_0",)),
)


def fake_tensorrt(cuda: FakeCuda | None = None, version: str = TRT10, refuse_timing_cache: int = 0):
    """A tensorrt-like module of ``version`` with exactly the names medsr uses there. Plans are b"plan:<graph>" and
    deserialize to FakeEngine on ``cuda``; Builder/OnnxParser/IBuilderConfig record what a build set in ``_builds``
    (one dict per build: flags, cleared, shapes, cache_in, layers, network_flags, parsed: the ONNX path); ``refuse_timing_cache``: the
    number of set_timing_cache calls that return False (a cache from another GPU or TensorRT)."""
    cuda = cuda or FakeCuda()
    allowed = _members(version)
    engines, builds, loggers, refusals = [], [], [], [refuse_timing_cache]

    def enum(name, **values):
        return strict_namespace(name, allowed.get(name, set()), **values)

    class Logger(Surface):
        _trt_class = "Logger"
        WARNING = 2

        def __init__(self, level):
            super().__init__(allowed)
            loggers.append(level)

    class Runtime(Surface):
        _trt_class = "Runtime"

        def __init__(self, logger):
            super().__init__(allowed)
            assert isinstance(logger, Logger)

        def deserialize_cuda_engine(self, plan):
            if not plan.startswith(b"plan:"):
                return None
            engine = FakeEngine(allowed, plan.split(b":")[1].decode(), cuda)
            engines.append(engine)
            return engine

    class TimingCache(Surface):
        _trt_class = "ITimingCache"

        def __init__(self, data):
            super().__init__(allowed)
            self._data = data

        def serialize(self):
            return b"timings"

    class Config(Surface):
        _trt_class = "IBuilderConfig"

        def __init__(self, record):
            super().__init__(allowed)
            self._record, self._cache = record, None

        def set_memory_pool_limit(self, pool, size):
            self._record["pool"] = (pool, size)

        def set_flag(self, flag):
            self._record["flags"].append(flag)

        def clear_flag(self, flag):
            self._record["cleared"].append(flag)

        def add_optimization_profile(self, profile):
            self._record["profiles"] += 1

        def create_timing_cache(self, data):
            self._record["cache_in"].append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if refusals[0]:
                refusals[0] -= 1
                return False
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class Profile(Surface):
        _trt_class = "IOptimizationProfile"

        def __init__(self, record):
            super().__init__(allowed)
            self._record = record

        def set_shape(self, name, low, opt, high):
            self._record["shapes"].append((name, low, opt, high))

    class Network(Surface):
        _trt_class = "INetworkDefinition"

        def __init__(self, record):
            super().__init__(allowed)
            self._layers = [FakeLayer(allowed, *spec) for spec in FAKE_LAYERS]  # whichever graph was parsed
            record["layers"] = self._layers

        @property
        def num_layers(self):
            return len(self._layers)

        def get_layer(self, index):
            return self._layers[index]

    class Builder(Surface):
        _trt_class = "Builder"

        def __init__(self, logger):
            super().__init__(allowed)
            assert isinstance(logger, Logger)
            self._record = {"flags": [], "cleared": [], "shapes": [], "cache_in": [], "profiles": 0, "parsed": None}
            builds.append(self._record)

        def create_network(self, flags=0):
            self._record["network_flags"] = flags
            return Network(self._record)

        def create_builder_config(self):
            return Config(self._record)

        def create_optimization_profile(self):
            return Profile(self._record)

        def build_serialized_network(self, network, config):
            return b"plan:denoiser"

    class OnnxParser(Surface):
        _trt_class = "OnnxParser"
        errors: tuple[str, ...] = ()

        def __init__(self, network, logger):
            super().__init__(allowed)
            assert isinstance(logger, Logger)

        def parse_from_file(self, path):
            builds[-1]["parsed"] = path
            return not OnnxParser.errors

        @property
        def num_errors(self):
            return len(OnnxParser.errors)

        def get_error(self, index):
            return OnnxParser.errors[index]

    def view(cls):  # the class as the module shows it: only its members of TRT_API on this version
        members = {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}
        return strict_namespace(cls._trt_class, allowed.get(cls._trt_class, set()), **members)

    classes = (FakeEngine, FakeContext, FakeLayer, FakeTensor, Network, Config, TimingCache, Profile)
    module = strict_namespace(
        f"module tensorrt {version}",
        allowed[""],
        **{cls._trt_class: view(cls) for cls in classes},
        __version__=version,
        nptype=lambda dtype: np.float32,
        float32="float32",
        Logger=Logger,
        Runtime=Runtime,
        Builder=Builder,
        OnnxParser=OnnxParser,
        TensorIOMode=enum("TensorIOMode", INPUT="in", OUTPUT="out"),
        NetworkDefinitionCreationFlag=enum("NetworkDefinitionCreationFlag", STRONGLY_TYPED=1),
        MemoryPoolType=enum("MemoryPoolType", WORKSPACE="WORKSPACE"),
        BuilderFlag=enum(
            "BuilderFlag",
            TF32="TF32",
            FP16="FP16",
            BF16="BF16",
            OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS",
        ),
    )
    for name, value in (("engines", engines), ("builds", builds), ("loggers", loggers)):
        object.__setattr__(module, f"_{name}", value)
    return module


class FakeCudart:
    """The cuda-python runtime module, with only the names of CUDART_API: one device, a driver for CUDA
    ``driver`` (0: no driver, every call then fails with cudaErrorInsufficientDriver), a runtime for CUDA
    ``runtime``. ``calls`` records (name, args); ``fail`` {name: status} makes a call return that status."""

    SUCCESS, NO_DEVICE, INSUFFICIENT_DRIVER, CAPTURE_INVALIDATED = 0, 100, 35, 901

    def __init__(self, driver=13000, runtime=13000, devices=1, fail=None):
        self._driver, self._runtime, self._devices, self._fail = driver, runtime, devices, dict(fail or {})
        self.calls: list[tuple] = []
        self._handles = itertools.count(100)
        self._capturing = False
        self._host: dict[int, np.ndarray] = {}  # pinned buffers: real memory, CudaRuntime views it through ctypes
        self.cudaError_t = SimpleNamespace(cudaErrorNoDevice=self.NO_DEVICE, cudaErrorInsufficientDriver=35)
        self.cudaStreamNonBlocking = 1
        self.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)

    _public = frozenset({"calls", "SUCCESS", "NO_DEVICE", "INSUFFICIENT_DRIVER", "CAPTURE_INVALIDATED"})
    _names = frozenset(name.split(".")[0] for name in CUDART_API)

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in FakeCudart._public | FakeCudart._names:
            raise AttributeError(f"fake cuda.bindings.runtime has no attribute '{name}'")
        return object.__getattribute__(self, name)

    def _call(self, name, *args, value=None):
        self.calls.append((name, *args))
        if self._fail.get(name):
            return (self._fail[name], None)
        if not self._driver and name not in ("cudaDriverGetVersion", "cudaRuntimeGetVersion"):
            return (self.INSUFFICIENT_DRIVER, None)
        return (self.SUCCESS, value)

    def cudaDriverGetVersion(self):
        return self._call("cudaDriverGetVersion", value=self._driver)

    def cudaRuntimeGetVersion(self):
        return self._call("cudaRuntimeGetVersion", value=self._runtime)

    def cudaGetDeviceCount(self):
        if self._driver and self._driver < self._runtime // 1000 * 1000:
            self.calls.append(("cudaGetDeviceCount",))
            return (self.INSUFFICIENT_DRIVER, None)
        if self._driver and not self._devices:
            self.calls.append(("cudaGetDeviceCount",))
            return (self.NO_DEVICE, None)
        return self._call("cudaGetDeviceCount", value=self._devices)

    def cudaGetDeviceProperties(self, device):
        return self._call(
            "cudaGetDeviceProperties", device, value=SimpleNamespace(name=b"NVIDIA H200", major=9, minor=0)
        )

    def cudaStreamCreateWithFlags(self, flags):
        return self._call("cudaStreamCreateWithFlags", flags, value=next(self._handles))

    def cudaStreamDestroy(self, stream):
        return self._call("cudaStreamDestroy", stream)

    def cudaStreamSynchronize(self, stream):
        return self._call("cudaStreamSynchronize", stream)

    def cudaStreamBeginCapture(self, stream, mode):
        self._capturing = True
        return self._call("cudaStreamBeginCapture", stream, mode)

    def cudaStreamEndCapture(self, stream):
        self._capturing = False
        return self._call("cudaStreamEndCapture", stream, value=next(self._handles))

    def cudaGraphInstantiate(self, graph, flags):
        return self._call("cudaGraphInstantiate", graph, flags, value=next(self._handles))

    def cudaGraphDestroy(self, graph):
        return self._call("cudaGraphDestroy", graph)

    def cudaGraphLaunch(self, executable, stream):
        return self._call("cudaGraphLaunch", executable, stream)

    def cudaGraphExecDestroy(self, executable):
        return self._call("cudaGraphExecDestroy", executable)

    def cudaMalloc(self, nbytes):
        return self._call("cudaMalloc", nbytes, value=next(self._handles))

    def cudaFree(self, address):
        return self._call("cudaFree", address)

    def cudaMallocHost(self, nbytes):
        buffer = np.zeros(nbytes, np.uint8)
        status, address = self._call("cudaMallocHost", nbytes, value=buffer.ctypes.data)
        if status == self.SUCCESS:
            self._host[address] = buffer
        return status, address

    def cudaFreeHost(self, address):
        self._host.pop(address)
        return self._call("cudaFreeHost", address)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        return self._call("cudaMemcpyAsync", dst, src, nbytes, kind, stream)


def fake_bundle(root, sha="ab" * 32, name="fake"):
    """What TrtSession, the shape profiles and the engine cache read from a bundle: f=4, x4 in-plane (factors
    4 x 4), 3 latents, LR multiple 8, the paper's conditioning; ``root/medsr.json`` holds the name and the graphs'
    sha256 (the manifest digest keys the cache)."""
    root.mkdir(parents=True, exist_ok=True)
    graphs = {graph: SimpleNamespace(path=root / f"{graph}.onnx", sha256=sha) for graph in GRAPH_IO}
    manifest = {"name": name, "graphs": {graph: {"sha256": sha} for graph in GRAPH_IO}}
    (root / "medsr.json").write_text(json.dumps(manifest))
    return SimpleNamespace(
        name=name,
        root=root,
        graphs=graphs,
        scale=4,
        factors=(4, 4),
        vae_factor=4,
        image_channels=3,
        latent_channels=3,
        lr_multiple=8,
        conditioning=PAPER,
    )
