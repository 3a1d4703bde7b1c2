"""Stand-ins for the tensorrt module and the CUDA runtime, so the TensorRT logic is tested without a GPU.

The fake engine computes ``model_output = 2 * sample + mean(lr_latent)`` and ``image = latent + 1``; the fake CUDA
runtime keeps buffers in NumPy arrays and records the work enqueued while a graph is captured, replaying it on
launch, as CUDA does.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from medsr.bundle.conditioning import PAPER
from medsr.engine.cuda import GpuInfo

H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


class FakeCuda:
    """CudaRuntime's interface over host memory. ``captured`` work runs only when its graph is launched."""

    def __init__(self, gpu: GpuInfo | None = None):
        self._gpu, self.stream = gpu or H100, 7
        self.stream_handle = 7
        self.memory: dict[int, np.ndarray] = {}
        self._addresses = itertools.count(0x1000, 0x1000)
        self._capture: list | None = None
        self.graphs: dict[int, list] = {}
        self.launches = 0

    def gpu(self):
        return self._gpu

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
        pass

    def begin_capture(self):
        self._capture = []

    def end_capture(self):
        handle = len(self.graphs) + 1
        self.graphs[handle], self._capture = self._capture, None
        return handle

    def launch(self, handle):
        self.launches += 1
        for work in self.graphs[handle]:
            work()

    def destroy_graph(self, handle):
        del self.graphs[handle]


GRAPH_IO = {
    "denoiser": (("sample", "lr_latent", "timestep"), ("model_output",)),
    "vae_decoder": (("latent",), ("image",)),
    "vae_encoder": (("image",), ("latent_mean", "latent_logvar")),
}


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        low, high = self.engine.bounds.get(name, (None, None))
        if low is not None and any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes[self.engine.inputs[0]]

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def _array(self, name):
        shape = self.shapes.get(name) or self.get_tensor_shape(name)
        return self.engine.cuda.memory[self.addresses[name]].view(np.float32).reshape(shape)

    def execute_async_v3(self, stream):
        def work():
            if self.engine.graph == "denoiser":
                out = 2 * self._array("sample") + self._array("lr_latent").mean()
                self._array("model_output")[...] = out
            elif self.engine.graph == "vae_decoder":
                self._array("image")[...] = self._array("latent") + 1
            else:
                self._array("latent_mean")[...] = self._array("image")
                self._array("latent_logvar")[...] = 0
            self.engine.executions += 1

        self.engine.cuda.submit(work)
        return True


@dataclass
class FakeEngine:
    graph: str
    cuda: FakeCuda
    bounds: dict = field(default_factory=dict)
    executions: int = 0

    @property
    def inputs(self):
        return GRAPH_IO[self.graph][0]

    @property
    def num_io_tensors(self):
        return sum(len(names) for names in GRAPH_IO[self.graph])

    def get_tensor_name(self, index):
        return (GRAPH_IO[self.graph][0] + GRAPH_IO[self.graph][1])[index]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self):
        return FakeContext(self)


def fake_tensorrt(cuda: FakeCuda, version="10.8.0"):
    """A tensorrt-like namespace whose plans are b"plan:<graph>" and deserialize to FakeEngine on ``cuda``."""
    engines = []

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            if not plan.startswith(b"plan:"):
                return None
            engines.append(FakeEngine(plan.split(b":")[1].decode(), cuda))
            return engines[-1]

    return SimpleNamespace(
        __version__=version,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=Runtime,
        TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda dtype: np.float32,
        engines=engines,
    )


def fake_bundle(root, sha="ab" * 32, name="fake"):
    """What TrtSession, the shape profiles and the engine cache read from a bundle: f=4, x4, 3 latents, LR multiple
    8, the paper's conditioning; ``root/medsr.json`` holds the name and the graphs' sha256 (the manifest digest keys
    the cache)."""
    root.mkdir(parents=True, exist_ok=True)
    graphs = {graph: SimpleNamespace(path=root / f"{graph}.onnx", sha256=sha) for graph in GRAPH_IO}
    manifest = {"name": name, "graphs": {graph: {"sha256": sha} for graph in GRAPH_IO}}
    (root / "medsr.json").write_text(json.dumps(manifest))
    return SimpleNamespace(
        name=name,
        root=root,
        graphs=graphs,
        scale=4,
        vae_factor=4,
        image_channels=3,
        latent_channels=3,
        lr_multiple=8,
        conditioning=PAPER,
    )
