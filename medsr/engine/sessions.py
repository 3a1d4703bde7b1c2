"""One Session interface over the runtimes that execute a bundle graph.

``run(feeds) -> outputs`` takes and returns dicts keyed by the graph's input and output names
(medsr.bundle.graphs), never positional lists. A requested runtime or provider that is missing, or that did not
become active (onnxruntime silently falls back to CPU), raises BackendError instead of running somewhere else.

Engines: ``ort`` (ONNX Runtime, CPU or CUDA), ``trt`` (native TensorRT, medsr.engine.trt), ``openvino``
(medsr.engine.openvino) and ``torch`` (the PyTorch reference, medsr.export.reference). Each backend is imported only
when asked for, so the ort path never loads torch, TensorRT or OpenVINO.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from medsr.errors import BackendError

ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
ENGINES = ("ort", "torch", "trt", "openvino")


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


@dataclass(frozen=True)
class OrtTuning:
    """How an ONNX Runtime session is set up (measured in benchmarks/results/, see benchmarks/README.md).

    Attributes:
        threads: intra-op threads; None: the cores available to this process. One inter-op thread: the graphs are
            chains, and a second pool would only compete for the same cores.
        spinning: let idle intra-op threads spin between parallel regions. Off by default: spinning gains almost
            nothing on these convolution-bound graphs and steals whole cores from anything else on a shared server
            (the bundled benchmarks were run next to a training job).
        optimization: ORT graph optimization level, "basic", "extended" or "all" (layout transforms to the blocked
            NCHWc convolutions, fusions of GroupNorm pieces, GELU and attention).
        memory_arena: reuse activation buffers across runs (ORT's arena with memory patterns); the slices of a
            volume share one shape, so after the first run no step allocates.
    """

    threads: int | None = None
    spinning: bool = False
    optimization: str = "all"
    memory_arena: bool = True

    def session_options(self, ort):
        """An ``onnxruntime.SessionOptions`` with these settings."""
        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if self.optimization not in levels:
            raise BackendError(f"optimization must be one of {', '.join(levels)}, got {self.optimization!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[self.optimization]
        options.intra_op_num_threads = self.threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = self.memory_arena
        options.enable_mem_pattern = self.memory_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
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
        threads: intra-op threads; default: the cores available to this process (overrides ``tuning.threads``).
        tuning: session settings (OrtTuning); default: OrtTuning().
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        tuning: OrtTuning | None = None,
    ):
        self.path = Path(path)
        self.device = device
        tuning = tuning or OrtTuning()
        self.tuning = dataclasses.replace(tuning, threads=threads or tuning.threads)
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
            str(self.path), sess_options=self.tuning.session_options(ort), providers=requested
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


def open_ort_sessions(
    bundle, device: str = "cpu", threads: int | None = None, tuning: OrtTuning | None = None
) -> dict[str, OrtSession]:
    """An OrtSession for each graph of ``bundle`` (a medsr.bundle.Bundle), keyed by graph name."""
    return {
        name: OrtSession(entry.path, device=device, threads=threads, tuning=tuning)
        for name, entry in bundle.graphs.items()
    }


def open_sessions(
    bundle, engine: str, device: str = "cpu", threads: int | None = None, precision: str = "fp32"
) -> dict[str, Session]:
    """Sessions for ``engine`` ("ort", "torch", "trt" or "openvino") on ``device``.

    ``precision`` applies to trt ("fp32", "tf32", "fp16", "bf16") and openvino ("fp32", "bf16", "auto"); ort and
    torch run the bundle's fp32 graphs. "torch" runs the PyTorch reference modules stored in the bundle and needs the
    torch extra; it is imported only here, so the ort path never loads torch.
    """
    if engine == "ort":
        _require_precision(engine, precision, ("fp32",))
        return open_ort_sessions(bundle, device=device, threads=threads)
    if engine == "torch":
        _require_precision(engine, precision, ("fp32",))
        try:
            from medsr.export.reference import open_torch_sessions
        except ImportError as exc:
            raise BackendError(f"--engine torch needs the torch extra (pip install 'medsr[torch]'): {exc}") from exc
        return open_torch_sessions(bundle, device=device, threads=threads)
    if engine == "trt":
        if device != "cuda":
            raise BackendError("--engine trt (TensorRT) runs on a GPU: pass --device cuda")
        from medsr.engine.trt import open_trt_sessions

        return open_trt_sessions(bundle, precision=precision)
    if engine == "openvino":
        if device != "cpu":
            raise BackendError("--engine openvino runs on the CPU in medsr: pass --device cpu")
        from medsr.engine.openvino import open_openvino_sessions

        return open_openvino_sessions(bundle, precision=precision, threads=threads)
    raise BackendError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def _require_precision(engine: str, precision: str, allowed: tuple[str, ...]) -> None:
    if precision not in allowed:
        raise BackendError(f"--engine {engine} runs {'/'.join(allowed)} only, got --precision {precision}")
