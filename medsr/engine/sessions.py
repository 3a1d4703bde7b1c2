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
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from medsr.engine.precision import PRECISIONS
from medsr.errors import BackendError

ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
ENGINES = tuple(PRECISIONS)  # ort, torch, trt, openvino


class Session(Protocol):
    """A loaded graph that maps named input arrays to named output arrays."""

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


class OrtSession:
    """An ONNX Runtime InferenceSession with explicit providers that are checked after creation.

    On CUDA the graph runs through IO binding: inputs are copied to the device once per run and outputs are
    allocated by ORT on the device and copied back in one transfer, so no intermediate crosses the bus.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (CUDA provider, CPU fallback for unsupported nodes only).
        threads: intra-op threads; default: the cores available to this process.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self._session = self._load()
        self.providers = tuple(self._session.get_providers())
        self.input_names = tuple(item.name for item in self._session.get_inputs())
        self.output_names = tuple(item.name for item in self._session.get_outputs())

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
        session = ort.InferenceSession(
            str(self.path), sess_options=ort_session_options(ort, self.threads), providers=requested
        )
        active = session.get_providers()[0]
        if active != requested[0]:
            raise BackendError(f"{self.path.name}: {requested[0]} was requested but onnxruntime activated {active}")
        return session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named (B, ...) float32 arrays in, named output arrays out (host memory)."""
        if self.device == "cuda":
            return self._run_bound(feeds)
        outputs = self._session.run(list(self.output_names), feeds)
        return dict(zip(self.output_names, outputs))

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self._session.io_binding()
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self._session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        """Release the session (its weights and arena)."""
        self._session = None


def open_ort_sessions(bundle, device: str = "cpu", threads: int | None = None) -> dict[str, OrtSession]:
    """An OrtSession for each graph of ``bundle`` (a medsr.bundle.Bundle), keyed by graph name."""
    return {name: OrtSession(entry.path, device=device, threads=threads) for name, entry in bundle.graphs.items()}


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
