"""OpenVINO on the CPU behind the Session interface, fp32 or bf16 on the CPU's bf16 units, gated by parity.

OpenVINO reads the bundle's ONNX graphs directly. Each input shape is compiled once as a static model (the fast path;
slices of a volume share one shape) with INFERENCE_PRECISION_HINT f32 or bf16, LATENCY hint and one thread per core.
Compiled blobs go to OpenVINO's model cache in the engine cache (medsr.bundle.cache):
``engines/<manifest sha256>/openvino-<version>/<CPU model digest>/<precision>``. OpenVINO keys each blob by the
graph's content and the compile properties (threads, shapes) within that folder, so a blob of another bundle,
OpenVINO build or CPU model is never read. An unwritable cache runs uncached with a warning.

Precision (medsr.engine.precision.PRECISIONS["openvino"]): ``fp32``; ``bf16`` (AVX-512 BF16 or AMX: several times
the fp32 GEMM rate); ``auto``: bf16 per graph where the parity gate of medsr.engine.precision.choose_mixed passes,
fp32 on CPUs without bf16 units. The choice and its parity show in each session's ``providers``.

ONNX Runtime has no bf16 path on x86 CPUs (MLAS fast-math bf16 GEMMs are ARM only) and its OpenVINO execution
provider ships as onnxruntime-openvino, which replaces the onnxruntime package: so medsr's reduced-precision CPU path
is this engine, and ``--engine ort`` stays fp32.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from medsr.bundle.cache import engine_dir, usable_dir
from medsr.bundle.graphs import GRAPHS
from medsr.engine.precision import AUTO, AUTO_REDUCED, PRECISIONS, choose_mixed
from medsr.engine.sessions import available_cores
from medsr.errors import BackendError, ShapeError

_HINTS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino():
    """The ``openvino`` module, or a BackendError naming the extra."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendError(
            "--engine openvino needs OpenVINO, which is not installed: pip install 'medsr[openvino]'"
        ) from exc
    return openvino


def has_bf16_units(core) -> bool:
    """Whether OpenVINO's CPU plugin reports bf16 compute (AVX-512 BF16 or AMX) on this CPU."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def ov_version(ov) -> str:
    """The OpenVINO release, ``2026.4.1`` of ``2026.4.1-22982-...``."""
    return ov.__version__.split("-")[0]


def model_cache_dir(bundle, ov, core) -> Path:
    """The engine-cache folder of ``bundle``'s blobs compiled by this OpenVINO on this CPU model; one subfolder per
    precision."""
    cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
    device = "cpu-" + hashlib.sha256(cpu.encode()).hexdigest()[:12]
    return engine_dir(bundle, "openvino", ov_version(ov), device)


class OpenVinoSession:
    """One bundle graph compiled by OpenVINO for the CPU: compile per input shape, infer, close.

    Args:
        graph: graph name (medsr.bundle.graphs); path: its .onnx file.
        precision: "fp32" or "bf16" ("auto" is resolved per graph by ``open_openvino_sessions``).
        threads: inference threads; default: the cores available to this process.
        cache_dir: OpenVINO model cache folder of this precision (None: no cache).
        ov, core: the openvino module and an ov.Core (tests may pass their own).
    """

    def __init__(self, graph: str, path, precision="fp32", threads=None, cache_dir=None, ov=None, core=None):
        if precision not in _HINTS:
            allowed = ", ".join(PRECISIONS["openvino"])
            raise BackendError(f"OpenVINO precision must be one of {allowed}, got {precision!r}")
        spec = GRAPHS[graph]
        self.graph, self.path, self.precision = graph, Path(path), precision
        self.ov = ov or import_openvino()
        self.core = core or self.ov.Core()
        self.cache_dir = cache_dir
        if precision == "bf16" and not has_bf16_units(self.core):
            raise BackendError("--precision bf16: this CPU has no bf16 units (AVX-512 BF16 or AMX); use fp32 or auto")
        self.threads = threads or available_cores()
        self.note = ""
        self.input_names, self.output_names = spec.inputs, spec.outputs
        self._model = self.core.read_model(str(self.path))
        self._requests: dict[tuple, object] = {}

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"OpenVINO-{ov_version(self.ov)}-CPU-{self.precision}{self.note}",)

    def compile(self, shapes: dict[str, tuple[int, ...]]):
        """An infer request of the graph reshaped to static ``shapes``."""
        model = self._model.clone()
        model.reshape({name: self.ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self.cache_dir is not None:  # per compile, not on the shared Core: each precision has its own folder
            config["CACHE_DIR"] = str(self.cache_dir)
        return self.core.compile_model(model, "CPU", config).create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named float32 arrays in, named float32 arrays out, like every Session."""
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise ShapeError(f"{self.graph}: missing input(s) {', '.join(missing)}")
        signature = tuple(tuple(np.shape(feeds[name])) for name in self.input_names)
        if signature not in self._requests:
            self._requests[signature] = self.compile(dict(zip(self.input_names, signature)))
        request = self._requests[signature]
        request.infer({name: np.ascontiguousarray(feeds[name], dtype=np.float32) for name in self.input_names})
        return {name: np.array(request.get_tensor(name).data, dtype=np.float32) for name in self.output_names}

    def close(self) -> None:
        self._requests.clear()


def open_openvino_sessions(bundle, precision: str = AUTO, threads: int | None = None) -> dict[str, OpenVinoSession]:
    """An OpenVinoSession per graph of ``bundle`` sharing one ov.Core, with blobs cached in the engine cache.

    ``auto``: bf16 graphs as medsr.engine.precision.choose_mixed allows on CPUs with bf16 units, fp32 elsewhere;
    each session's ``providers`` then names its precision and the probe's end-to-end PSNR against fp32.
    """
    if precision not in PRECISIONS["openvino"]:
        raise BackendError(f"OpenVINO precision must be one of {', '.join(PRECISIONS['openvino'])}, got {precision!r}")
    ov = import_openvino()
    core = ov.Core()
    cache = usable_dir(model_cache_dir(bundle, ov, core), "OpenVINO model cache")

    def sessions(chosen: str) -> dict[str, OpenVinoSession]:
        cache_dir = None if cache is None else usable_dir(cache / chosen, "OpenVINO model cache")
        return {
            name: OpenVinoSession(name, entry.path, chosen, threads, cache_dir, ov, core)
            for name, entry in bundle.graphs.items()
        }

    if precision != AUTO:
        return sessions(precision)
    if not has_bf16_units(core):
        return sessions("fp32")
    chosen, _, parity = choose_mixed(bundle, sessions, AUTO_REDUCED["openvino"])
    for session in chosen.values():
        session.note = f" (auto: {parity:.1f} dB vs fp32 on the probe)"
    return chosen
