"""One Session interface over the runtimes that execute a bundle graph.

``run(feeds) -> outputs`` takes and returns dicts keyed by the graph's input and output names
(medsr.engine.graphs), never positional lists. A requested runtime or provider that is missing, or that did not
become active (onnxruntime silently falls back to CPU), raises BackendError instead of running somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from medsr.errors import BackendError

ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


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


class OrtSession:
    """An ONNX Runtime InferenceSession with explicit providers that are checked after creation.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (CUDA provider, CPU fallback for unsupported nodes only).
        threads: intra-op threads; default: the cores available to this process.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from exc
        if device not in ORT_PROVIDERS:
            raise BackendError(f"device must be one of {sorted(ORT_PROVIDERS)}, got {device!r}")
        requested = ORT_PROVIDERS[device]
        if requested[0] not in ort.get_available_providers():
            raise BackendError(
                f"{requested[0]} is not available in this onnxruntime "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for --device cuda"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or available_cores()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
        self.providers = tuple(self._session.get_providers())
        if self.providers[0] != requested[0]:
            raise BackendError(
                f"{Path(path).name}: {requested[0]} was requested but onnxruntime activated {self.providers[0]}"
            )
        self.input_names = tuple(item.name for item in self._session.get_inputs())
        self.output_names = tuple(item.name for item in self._session.get_outputs())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(list(self.output_names), feeds)
        return dict(zip(self.output_names, outputs))


def open_ort_sessions(bundle, device: str = "cpu", threads: int | None = None) -> dict[str, OrtSession]:
    """An OrtSession for each graph of ``bundle`` (a medsr.engine.bundle.Bundle), keyed by graph name."""
    return {name: OrtSession(entry.path, device=device, threads=threads) for name, entry in bundle.graphs.items()}


def open_sessions(bundle, engine: str, device: str = "cpu", threads: int | None = None) -> dict[str, Session]:
    """Sessions for ``engine`` ("ort", "torch" or "trt") on ``device``.

    "torch" runs the PyTorch reference modules stored in the bundle and needs the torch extra; it is imported only
    here, so the ort path never loads torch.
    """
    if engine == "ort":
        return open_ort_sessions(bundle, device=device, threads=threads)
    if engine == "torch":
        try:
            from medsr.export.reference import open_torch_sessions
        except ImportError as exc:
            raise BackendError(f"--engine torch needs the torch extra (pip install 'medsr[torch]'): {exc}") from exc
        return open_torch_sessions(bundle, device=device, threads=threads)
    if engine == "trt":
        raise BackendError(
            "--engine trt: the TensorRT backend has not landed in this medsr version yet; use --engine ort "
            "(with --device cuda for ONNX Runtime on a GPU)"
        )
    raise BackendError(f"unknown engine {engine!r}; choose ort, torch or trt")
