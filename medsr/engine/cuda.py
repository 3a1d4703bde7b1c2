"""The few CUDA runtime calls the TensorRT engine needs, through NVIDIA's cuda-python bindings (no torch).

Device buffers, pinned host buffers, one stream, asynchronous copies and CUDA graphs. Every call's status is checked
and a failure raises BackendError naming the call. Imported lazily: only ``--engine trt`` needs it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from medsr.errors import BackendError

GPU_EXTRA_HINT = "install the gpu extra on a machine with an NVIDIA GPU and driver: pip install 'medsr[gpu]'"


def import_cudart():
    """The cuda-python runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` in cuda-python < 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise BackendError(f"--engine trt needs NVIDIA's cuda-python bindings: {GPU_EXTRA_HINT}") from exc
    return runtime


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a TensorRT plan is built for: its name and compute capability ("9.0")."""

    name: str
    compute_capability: str


class CudaRuntime:
    """Thin checked wrappers over cuda-python on device 0. ``cudart`` may be injected (tests pass a fake)."""

    def __init__(self, cudart=None):
        self.cudart = cudart or import_cudart()
        count = self._check("cudaGetDeviceCount", self.cudart.cudaGetDeviceCount())
        if not count:
            raise BackendError(f"--engine trt needs a CUDA GPU and none is visible; {GPU_EXTRA_HINT}")
        self.stream = self._check("cudaStreamCreate", self.cudart.cudaStreamCreate())

    def _check(self, call: str, result):
        """cuda-python returns (status, value...) tuples; raise on a non-success status, return the value(s)."""
        status, *values = result if isinstance(result, tuple) else (result,)
        if int(status) != 0:
            raise BackendError(f"CUDA call {call} failed: {status}")
        return values[0] if len(values) == 1 else tuple(values) or None

    @property
    def stream_handle(self) -> int:
        """The stream as the integer handle TensorRT's execute_async_v3 takes."""
        return int(self.stream)

    def gpu(self) -> GpuInfo:
        props = self._check("cudaGetDeviceProperties", self.cudart.cudaGetDeviceProperties(0))
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name.strip("\x00 ").strip(), f"{props.major}.{props.minor}")

    def malloc(self, nbytes: int) -> int:
        """A device buffer of ``nbytes`` (at least 1); its address."""
        return int(self._check("cudaMalloc", self.cudart.cudaMalloc(max(nbytes, 1))))

    def free(self, address: int) -> None:
        self._check("cudaFree", self.cudart.cudaFree(address))

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        """A page-locked host array (fast, truly asynchronous copies); (address, array viewing it)."""
        nbytes = max(int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)
        address = int(self._check("cudaMallocHost", self.cudart.cudaMallocHost(nbytes)))
        buffer = (ctypes.c_byte * nbytes).from_address(address)
        return address, np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free_pinned(self, address: int) -> None:
        self._check("cudaFreeHost", self.cudart.cudaFreeHost(address))

    def copy_to_device(self, device: int, host: int, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check("cudaMemcpyAsync", self.cudart.cudaMemcpyAsync(device, host, nbytes, kind, self.stream))

    def copy_to_host(self, host: int, device: int, nbytes: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check("cudaMemcpyAsync", self.cudart.cudaMemcpyAsync(host, device, nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._check("cudaStreamSynchronize", self.cudart.cudaStreamSynchronize(self.stream))

    def begin_capture(self) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self._check("cudaStreamBeginCapture", self.cudart.cudaStreamBeginCapture(self.stream, mode))

    def end_capture(self):
        """Finish a capture; the instantiated executable graph."""
        graph = self._check("cudaStreamEndCapture", self.cudart.cudaStreamEndCapture(self.stream))
        executable = self._check("cudaGraphInstantiate", self.cudart.cudaGraphInstantiate(graph, 0))
        self._check("cudaGraphDestroy", self.cudart.cudaGraphDestroy(graph))
        return executable

    def launch(self, executable) -> None:
        self._check("cudaGraphLaunch", self.cudart.cudaGraphLaunch(executable, self.stream))

    def destroy_graph(self, executable) -> None:
        self._check("cudaGraphExecDestroy", self.cudart.cudaGraphExecDestroy(executable))
