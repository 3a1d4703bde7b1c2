"""The few CUDA runtime calls the TensorRT engine needs, through NVIDIA's cuda-python bindings (no torch).

Device buffers, pinned host buffers, one non-blocking stream, asynchronous copies and CUDA graphs. Every call's
status is checked and a failure raises BackendError naming the call; a machine without a GPU or with a driver too old
for the installed cuda-python says what to install instead of a bare CUDA error. cuda-python 13 needs an NVIDIA driver
>= 580 and 12.x runs on 525+; ``cuda.cudart`` moved to ``cuda.bindings.runtime`` (docs/sources.md, "GPU engines").
:data:`CUDART_API` lists every runtime name used here; tests/test_trt_api_surface.py checks it against the real
cuda-bindings 12 and 13. Imported lazily: only ``--engine trt`` needs it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from medsr.errors import BackendError

GPU_EXTRA_HINT = (
    "install the gpu extra of your driver's CUDA major on a machine with an NVIDIA GPU: "
    "pip install 'medsr[gpu-cu12]' (driver >= 525) or 'medsr[gpu-cu13]' (driver >= 580)"
)
#: Every name of the cuda-python runtime module medsr calls (functions, and "Enum.member").
CUDART_API = (
    "cudaGetDeviceCount",
    "cudaDriverGetVersion",
    "cudaRuntimeGetVersion",
    "cudaGetDeviceProperties",
    "cudaStreamCreateWithFlags",
    "cudaStreamNonBlocking",
    "cudaStreamDestroy",
    "cudaMalloc",
    "cudaFree",
    "cudaMallocHost",
    "cudaFreeHost",
    "cudaMemcpyAsync",
    "cudaMemcpyKind.cudaMemcpyHostToDevice",
    "cudaMemcpyKind.cudaMemcpyDeviceToHost",
    "cudaStreamSynchronize",
    "cudaStreamBeginCapture",
    "cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal",
    "cudaStreamEndCapture",
    "cudaGraphInstantiate",
    "cudaGraphDestroy",
    "cudaGraphLaunch",
    "cudaGraphExecDestroy",
    "cudaError_t.cudaErrorNoDevice",
    "cudaError_t.cudaErrorInsufficientDriver",
)
#: The oldest NVIDIA driver each cuda-python major runs on.
DRIVER_NEEDED = {12: "525", 13: "580"}


def _cuda_version(code: int) -> str:
    """12090 -> "12.9" (the encoding of cudaDriverGetVersion and cudaRuntimeGetVersion)."""
    return f"{code // 1000}.{code % 1000 // 10}"


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
        status, *rest = self.cudart.cudaGetDeviceCount()
        errors = self.cudart.cudaError_t
        if int(status) == int(errors.cudaErrorInsufficientDriver):
            raise BackendError(self._driver_message())
        if int(status) == int(errors.cudaErrorNoDevice) or (int(status) == 0 and not rest[0]):
            raise BackendError(f"--engine trt needs a CUDA GPU and none is visible; {GPU_EXTRA_HINT}")
        self._check("cudaGetDeviceCount", (status, *rest))
        # non-blocking: the legacy default stream (other libraries' work) never serializes with medsr's
        flags = self.cudart.cudaStreamNonBlocking
        self.stream = self._check("cudaStreamCreateWithFlags", self.cudart.cudaStreamCreateWithFlags(flags))

    def _driver_message(self) -> str:
        """Why the CUDA runtime cannot start (cudaErrorInsufficientDriver) and what to install."""
        status, driver = self.cudart.cudaDriverGetVersion()
        status_runtime, runtime = self.cudart.cudaRuntimeGetVersion()
        runtime_major = runtime // 1000 if int(status_runtime) == 0 and runtime else 12
        needed = DRIVER_NEEDED.get(runtime_major, DRIVER_NEEDED[13])
        if int(status) != 0 or not driver:
            return (
                f"--engine trt found no NVIDIA driver (libcuda): install the NVIDIA driver (>= {needed} for the "
                f"installed cuda-python {runtime_major}.x) on a machine with an NVIDIA GPU; without one, --engine ort "
                "runs on the CPU"
            )
        return (
            f"--engine trt: the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the installed "
            f"cuda-python (CUDA {_cuda_version(runtime)}, driver >= {needed}): upgrade the driver, or pip install "
            f"'cuda-python>={driver // 1000},<{driver // 1000 + 1}' to match it"
        )

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
        """Start capturing the stream's work into a graph. Thread-local mode: a call that capture forbids fails when
        this thread makes it, while other threads of the process (another engine, a server's other requests) keep
        working; global mode would fail their allocations for as long as the capture lasts."""
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._check("cudaStreamBeginCapture", self.cudart.cudaStreamBeginCapture(self.stream, mode))

    def end_capture(self):
        """Finish a capture; the instantiated executable graph."""
        graph = self._check("cudaStreamEndCapture", self.cudart.cudaStreamEndCapture(self.stream))
        try:
            return self._check("cudaGraphInstantiate", self.cudart.cudaGraphInstantiate(graph, 0))
        finally:
            self._check("cudaGraphDestroy", self.cudart.cudaGraphDestroy(graph))

    def abort_capture(self) -> None:
        """End a capture that failed midway, discarding what it recorded, so the stream leaves capture mode; its
        statuses are ignored (the capture may already be invalidated): the caller re-raises the first error."""
        result = self.cudart.cudaStreamEndCapture(self.stream)
        graph = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if graph is not None and int(graph):
            self.cudart.cudaGraphDestroy(graph)

    def launch(self, executable) -> None:
        self._check("cudaGraphLaunch", self.cudart.cudaGraphLaunch(executable, self.stream))

    def destroy_graph(self, executable) -> None:
        self._check("cudaGraphExecDestroy", self.cudart.cudaGraphExecDestroy(executable))

    def close(self) -> None:
        """Destroy the stream (after every buffer and graph on it is released)."""
        if self.stream is not None:
            self._check("cudaStreamDestroy", self.cudart.cudaStreamDestroy(self.stream))
            self.stream = None
