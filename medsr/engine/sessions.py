"""One Session interface over the runtimes that execute a bundle graph, and the registry of engines.

``run(feeds) -> outputs`` takes and returns dicts keyed by the graph's input and output names
(medsr.bundle.graphs), never positional lists. A requested runtime or provider that is missing, or that did not
become active (onnxruntime silently falls back to CPU), raises BackendError instead of running somewhere else.

Engines: ``ort`` (ONNX Runtime, CPU or CUDA), ``trt`` (native TensorRT, medsr.engine.trt), ``openvino``
(medsr.engine.openvino) and ``torch`` (the PyTorch reference). Each is an opener in a registry
(:func:`register_backend`); the built-in ones import their runtime only when called, so the ort path never loads
TensorRT or OpenVINO. The engine never imports the PyTorch side: ``medsr.export.reference`` registers ``torch``
when it is imported (the command-line layer does so for ``--engine torch``), see docs/design.md, "Import rules".
``--engine auto`` (the default) chooses among them in medsr.engine.select.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from medsr.engine.device_loop import CupyArrays, HostArrays, import_cupy, warn_without_cupy
from medsr.engine.precision import PRECISIONS
from medsr.engine.profiles import Shape
from medsr.errors import BackendError

ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
ENGINES = tuple(PRECISIONS)  # ort, torch, trt, openvino


class Session(Protocol):
    """A loaded graph that maps named input arrays to named output arrays.

    ``device`` (optional, "cpu" when absent) says where it computes: "cpu" or "cuda". A session may also offer
    ``bind(input shapes, output shapes)``, buffers on its device bound once
    (medsr.engine.device_loop.BoundGraph), so that the denoising loop keeps its latents there; and
    ``run_outputs(feeds, names)``, a run fetching only some outputs (medsr.engine.sessions.run_outputs).
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    providers: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ort_session_options(ort, threads: int | None = None):
    """The ``onnxruntime.SessionOptions`` of every OrtSession (measured in benchmarks/results/, see
    benchmarks/README.md).

    ``threads`` intra-op threads (None: the cores available to this process) and one inter-op thread: the graphs are
    chains, and a second pool would only compete for the same cores. Idle threads do not spin between parallel
    regions: spinning gains almost nothing on these convolution-bound graphs and steals whole cores from anything
    else on a shared server. All graph optimizations (layout transforms to the blocked NCHWc convolutions, fusions of
    GroupNorm pieces, GELU and attention). The memory arena and memory patterns reuse activation buffers across runs:
    the slices of a volume share one shape, so after the first run no step allocates.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def cuda_provider_options(stream: int | None = None, cuda_graph: bool = False) -> dict[str, str]:
    """The CUDAExecutionProvider options of every CUDA OrtSession: ``stream`` the CUDA stream to compute on (the
    one CuPy applies the sampler steps on), ``cuda_graph`` capture each bound shape once and replay it."""
    options = {
        "device_id": "0",
        # a bundle's graphs run at a few fixed shapes (one per batch size): the exhaustive cuDNN search runs once per
        # shape, on the first run, and its fastest algorithm then serves every later step
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        # let that search consider the algorithms that need cuDNN's largest workspace (usually the fastest)
        "cudnn_conv_use_max_workspace": "1",
        # input and output copies queue on the compute stream, ordered with the graph and with the CuPy steps on
        # that stream, instead of a copy stream that would need an event per transfer
        "do_copy_in_default_stream": "1",
        # grow the arena by what is asked: static shapes ask for the same sizes every run, so rounding each growth up
        # to a power of two only strands GPU memory that other sessions (encoder, decoder) could use
        "arena_extend_strategy": "kSameAsRequested",
        # ONNX Runtime runs fp32 only (medsr.engine.precision): TF32's 10-bit mantissa would move convolutions and
        # matrix products about 1e-3 away from the CPU engines the parity harness compares with
        "use_tf32": "0",
    }
    if stream is not None:
        # compute on the loop's stream, so the graph and the device-side sampler steps are ordered by the stream
        # alone, with no host synchronization between them
        options["has_user_compute_stream"] = "1"
        options["user_compute_stream"] = str(stream)
    if cuda_graph:
        # replay one captured CUDA graph per bound shape (gpu_graph_id of each binding) instead of launching every
        # kernel: valid because a binding's buffers never move; needs every node of the graph on the CUDA EP
        options["enable_cuda_graph"] = "1"
    return options


def run_outputs(session: Session, feeds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The outputs ``names`` of ``session`` on ``feeds``. A session with ``run_outputs`` (ONNX Runtime) fetches only
    those, so an unused ``latent_logvar`` is never copied to the host; the others run whole and the rest is dropped."""
    select = getattr(session, "run_outputs", None)
    outputs = select(feeds, names) if select is not None else session.run(feeds)
    return {name: outputs[name] for name in names}


class OrtBinding:
    """An IOBinding of an OrtSession over OrtValues allocated once for fixed shapes: a
    medsr.engine.device_loop.BoundGraph whose ``inputs`` and ``outputs`` are arrays (NumPy on the CPU, CuPy on
    CUDA) viewing those OrtValues, which ``run`` reads and overwrites in place. Nothing crosses to the host."""

    def __init__(self, session: OrtSession, inputs: dict[str, Shape], outputs: dict[str, Shape], graph_id: int):
        self.arrays = session.arrays
        self._session = session._session
        self._binding = self._session.io_binding()
        self._values = []  # the OrtValues, alive as long as the binding
        self.inputs, self.outputs = {}, {}
        for names, bind, arrays in (
            (inputs, self._binding.bind_ortvalue_input, self.inputs),
            (outputs, self._binding.bind_ortvalue_output, self.outputs),
        ):
            for name, shape in names.items():
                value, array = session.allocate(shape)
                bind(name, value)
                self._values.append(value)
                arrays[name] = array
        self._options = session._ort.RunOptions()
        if session.device == "cuda":
            # return once the graph is queued: what reads its outputs (the CuPy step) runs on the same stream
            self._options.add_run_config_entry("disable_synchronize_execution_providers", "1")
            if session.cuda_graph:
                self._options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self) -> None:
        self._session.run_with_iobinding(self._binding, self._options)


class OrtSession:
    """An ONNX Runtime InferenceSession with explicit providers that are checked after creation.

    ``run`` and ``run_outputs`` take and return host arrays; on CUDA they run through an IOBinding whose input
    OrtValues sit on the GPU, allocated once per input shape and updated in place, with only the outputs asked for
    bound and copied back. ``bind`` gives the denoising loop an :class:`OrtBinding` allocated once per set of shapes
    and reused by every step and every batch of those shapes (medsr.engine.device_loop): on the CPU its OrtValues
    wrap NumPy arrays, on CUDA CuPy views them on the stream ONNX Runtime computes on; without CuPy on CUDA,
    ``bind`` returns None (with one warning) and the loop runs through the host.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (CUDA provider, CPU fallback for unsupported nodes only).
        threads: intra-op threads; default: the cores available to this process.
        cuda_graph: on CUDA, capture each binding's run as a CUDA graph and replay it (every node must run on the
            CUDA EP; see :func:`cuda_provider_options`).
    """

    def __init__(
        self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None, cuda_graph: bool = False
    ):
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.cuda_graph = cuda_graph
        self._session = self._load()
        self.providers = tuple(self._session.get_providers())
        self.input_names = tuple(item.name for item in self._session.get_inputs())
        self.output_names = tuple(item.name for item in self._session.get_outputs())
        self._bindings: dict[tuple, OrtBinding] = {}
        self._host_bindings: dict[tuple, tuple] = {}

    def _load(self):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        if self.device not in ORT_PROVIDERS:
            raise BackendError(f"device must be one of {sorted(ORT_PROVIDERS)}, got {self.device!r}")
        requested = ORT_PROVIDERS[self.device]
        if requested[0] not in ort.get_available_providers():
            raise BackendError(
                f"{requested[0]} is not available in this onnxruntime "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for --device cuda"
            )
        self._ort = ort
        self.arrays = self._device_arrays()
        providers = list(requested)
        if self.device == "cuda":
            stream = None if self.arrays is None else self.arrays.stream.ptr
            providers[0] = (requested[0], cuda_provider_options(stream, self.cuda_graph))
        session = ort.InferenceSession(
            str(self.path), sess_options=ort_session_options(ort, self.threads), providers=providers
        )
        active = session.get_providers()[0]
        if active != requested[0]:
            raise BackendError(f"{self.path.name}: {requested[0]} was requested but onnxruntime activated {active}")
        return session

    def _device_arrays(self):
        """Host arrays on the CPU; on CUDA, CuPy on a new non-blocking stream, or None without CuPy."""
        if self.device == "cpu":
            return HostArrays()
        cupy = import_cupy()
        return None if cupy is None else CupyArrays(cupy, cupy.cuda.Stream(non_blocking=True))

    def allocate(self, shape: Shape, dtype=np.float32) -> tuple:
        """One OrtValue of ``shape`` on this session's device, and the array (NumPy or CuPy) viewing it."""
        if self.device == "cpu":
            array = np.zeros(shape, dtype)
            return self._ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0), array
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(tuple(shape), dtype, "cuda", 0)
        return value, self.arrays.view(value.data_ptr(), shape, dtype, owner=value)

    def bind(self, inputs: dict[str, Shape], outputs: dict[str, Shape]) -> OrtBinding | None:
        """The binding of these input and output shapes (only the outputs named are bound), made on first use;
        None on CUDA without CuPy."""
        if self.arrays is None:
            warn_without_cupy("onnxruntime --device cuda")
            return None
        key = (tuple(sorted(inputs.items())), tuple(sorted(outputs.items())))
        if key not in self._bindings:
            self._bindings[key] = OrtBinding(self, inputs, outputs, graph_id=len(self._bindings))
        return self._bindings[key]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named (B, ...) float32 arrays in, named output arrays out (host memory)."""
        return self.run_outputs(feeds, self.output_names)

    def run_outputs(self, feeds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """``run`` fetching only the outputs ``names``."""
        if self.device == "cuda":
            return self._run_bound(feeds, tuple(names))
        return dict(zip(names, self._session.run(list(names), feeds)))

    def _run_bound(self, feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """A host run on CUDA: the feeds are copied into the GPU inputs of their shape, the outputs ``names`` are
        computed into ONNX Runtime's arena and copied back together."""
        arrays = {name: np.ascontiguousarray(feeds[name]) for name in self.input_names}
        key = (tuple((name, array.shape, array.dtype.str) for name, array in arrays.items()), names)
        if key not in self._host_bindings:
            binding = self._session.io_binding()
            values = {}
            for name, array in arrays.items():
                values[name] = self._ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, "cuda", 0)
                binding.bind_ortvalue_input(name, values[name])
            for name in names:
                binding.bind_output(name, "cuda")
            options = self._ort.RunOptions()
            if self.cuda_graph:
                options.add_run_config_entry("gpu_graph_id", "-1")  # outputs move between runs: never captured
            self._host_bindings[key] = (binding, values, options)
        binding, values, options = self._host_bindings[key]
        for name, array in arrays.items():
            values[name].update_inplace(array)
        self._session.run_with_iobinding(binding, options)
        return dict(zip(names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        """Release the session (its weights, arena and bindings)."""
        self._bindings.clear()
        self._host_bindings.clear()
        self._session = None


def open_ort_sessions(bundle, device: str = "cpu", threads: int | None = None) -> dict[str, OrtSession]:
    """An OrtSession for each graph of ``bundle`` (a medsr.bundle.Bundle), keyed by graph name; on CUDA the
    denoiser, which runs every step at the fixed shapes of its bindings, replays CUDA graphs where ONNX Runtime
    allows them (:func:`replaying_denoiser`)."""
    sessions = {}
    for name, entry in bundle.graphs.items():
        if device == "cuda" and name == "denoiser":
            sessions[name] = replaying_denoiser(entry.path, threads)
        else:
            sessions[name] = OrtSession(entry.path, device=device, threads=threads)
    return sessions


def replaying_denoiser(path: str | os.PathLike, threads: int | None = None) -> OrtSession:
    """The denoiser's CUDA OrtSession, capturing each binding's run as a CUDA graph and replaying it.

    Requested only with CuPy, whose device loop keeps the loop's tensors at fixed addresses (medsr.engine.
    device_loop), which a replayed graph needs. ONNX Runtime refuses the option when a node of the graph is placed
    outside the CUDA EP (a shape computation on the CPU, say); the session then opens without it and one warning
    gives ONNX Runtime's reason. A replayed graph runs the same kernels on the same buffers, so results do not
    change, only the launch overhead of each step.
    """
    if import_cupy() is None:
        return OrtSession(path, device="cuda", threads=threads)
    try:
        return OrtSession(path, device="cuda", threads=threads, cuda_graph=True)
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail/InvalidArgument: retried without the option
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"{Path(path).name}: onnxruntime refused CUDA graphs ({reason}); each step launches its kernels",
            stacklevel=2,
        )
        return OrtSession(path, device="cuda", threads=threads)


#: ``opener(bundle, device, threads, precision) -> {graph: Session}`` of each registered engine.
Opener = Callable[..., dict]
_BACKENDS: dict[str, Opener] = {}


def register_backend(name: str, opener: Opener) -> None:
    """Make ``--engine name`` open its sessions with ``opener(bundle, device=, threads=, precision=)``; the
    precision is already checked against PRECISIONS[name]."""
    if name not in ENGINES:
        raise BackendError(f"unknown engine {name!r}; engines are {', '.join(ENGINES)}")
    _BACKENDS[name] = opener


def open_sessions(
    bundle, engine: str, device: str = "cpu", threads: int | None = None, precision: str = "fp32"
) -> dict[str, Session]:
    """Sessions of every graph of ``bundle`` on ``engine`` (one of ENGINES) on ``device`` in ``precision`` (one of
    medsr.engine.precision.PRECISIONS[engine]).

    ``torch`` is there once medsr.export.reference has been imported (it needs the torch extra); otherwise a one-line
    BackendError says what to install.
    """
    if engine not in ENGINES:
        raise BackendError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    allowed = PRECISIONS[engine]
    if precision not in allowed:
        runs = f"{allowed[0]} only" if len(allowed) == 1 else ", ".join(allowed)
        raise BackendError(f"--engine {engine} runs {runs}, got --precision {precision}")
    if engine not in _BACKENDS:  # only torch registers from outside the engine
        raise BackendError(
            f"--engine {engine} needs the torch extra (pip install 'medsr[torch]'), "
            "whose medsr.export.reference registers the PyTorch reference backend"
        )
    return _BACKENDS[engine](bundle, device=device, threads=threads, precision=precision)


def _open_ort(bundle, device, threads, precision):
    return open_ort_sessions(bundle, device=device, threads=threads)


def _open_trt(bundle, device, threads, precision):
    if device != "cuda":
        raise BackendError("--engine trt (TensorRT) runs on a GPU: pass --device cuda")
    from medsr.engine.trt import open_trt_sessions

    return open_trt_sessions(bundle, precision=precision)


def _open_openvino(bundle, device, threads, precision):
    if device != "cpu":
        raise BackendError("--engine openvino runs on the CPU in medsr: pass --device cpu")
    from medsr.engine.openvino import open_openvino_sessions

    return open_openvino_sessions(bundle, precision=precision, threads=threads)


register_backend("ort", _open_ort)
register_backend("trt", _open_trt)
register_backend("openvino", _open_openvino)
