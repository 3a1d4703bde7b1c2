"""OpenVINO on the CPU behind the Session interface, fp32 or bf16 on the CPU's bf16 units, gated by parity.

OpenVINO reads the bundle's ONNX graphs directly. Each input shape is compiled once as a static model (the fast path;
slices of a volume share one shape) with INFERENCE_PRECISION_HINT f32 or bf16, LATENCY hint and one thread per core.
Compiled blobs go to OpenVINO's model cache under ``<engine cache>/openvino/<OpenVINO version>/<CPU>``: OpenVINO keys
each blob by the graph's content and the compile properties (precision, threads), and the folder adds what TensorRT
plans are keyed by beside them, so a blob from another OpenVINO or CPU is never read.

Precision: ``fp32``; ``bf16`` (AVX-512 BF16 or AMX: several times the fp32 GEMM rate); ``auto``: as many graphs in
bf16 as keep the pipeline's SR output within ``AUTO_THRESHOLD_DB`` of all-fp32 on a seeded probe
(``choose_precisions``), fp32 on CPUs without bf16 units. The choice and its parity show in each session's
``providers``.

ONNX Runtime has no bf16 path on x86 CPUs (MLAS fast-math bf16 GEMMs are ARM only) and its OpenVINO execution
provider ships as onnxruntime-openvino, which replaces the onnxruntime package: so medsr's reduced-precision CPU path
is this engine, and ``--engine ort`` stays fp32.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from pathlib import Path

import numpy as np

from medsr.bundle.graphs import GRAPHS
from medsr.engine.sessions import available_cores
from medsr.errors import BackendError, ShapeError

OPENVINO_PRECISIONS = ("fp32", "bf16", "auto")
#: Parity (dB, SR output of the mixed-precision pipeline vs all-fp32) that ``auto`` requires to keep bf16 graphs.
AUTO_THRESHOLD_DB = 40.0
#: Extra dB the probe must clear: it is one seeded slice, and other slices (content, size) of the tiny random-weight
#: model scored up to 5 dB lower with the same precisions (41 dB on the 32 x 32 probe, 36 dB on 16 x 16 slices).
AUTO_MARGIN_DB = 3.0
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


def model_cache_dir(root: str | os.PathLike, ov, core) -> Path:
    """``root/openvino/<version>/<CPU name digest>``: blobs of one OpenVINO build on one CPU model."""
    cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
    digest = hashlib.sha256(cpu.encode()).hexdigest()[:12]
    return Path(root) / "openvino" / ov.__version__.split("-")[0] / digest


def psnr_db(actual: np.ndarray, expected: np.ndarray) -> float:
    """PSNR (dB) of ``actual`` against ``expected`` with the expected array's range as peak (medsr.eval.parity)."""
    from medsr.eval.parity import compare_arrays

    return compare_arrays(actual, expected)["psnr_db"]


class OpenVinoSession:
    """One bundle graph compiled by OpenVINO for the CPU: compile per input shape, infer, close.

    Args:
        graph: graph name (medsr.bundle.graphs); path: its .onnx file.
        precision: "fp32" or "bf16" ("auto" is resolved per graph by ``choose_precisions``).
        threads: inference threads; default: the cores available to this process.
        cache_dir: OpenVINO model cache folder (None: no cache).
        ov, core: the openvino module and an ov.Core (tests may pass their own).
    """

    def __init__(self, graph: str, path, precision="fp32", threads=None, cache_dir=None, ov=None, core=None):
        if precision not in _HINTS:
            raise BackendError(f"OpenVINO precision must be one of {', '.join(OPENVINO_PRECISIONS)}, got {precision!r}")
        spec = GRAPHS[graph]
        self.graph, self.path, self.precision = graph, Path(path), precision
        self.ov = ov or import_openvino()
        self.core = core or self.ov.Core()
        if cache_dir is not None:
            self.core.set_property({"CACHE_DIR": str(cache_dir)})
        if precision == "bf16" and not has_bf16_units(self.core):
            raise BackendError("--precision bf16: this CPU has no bf16 units (AVX-512 BF16 or AMX); use fp32 or auto")
        self.threads = threads or available_cores()
        self.note = ""
        self.input_names, self.output_names = spec.inputs, spec.outputs
        self._model = self.core.read_model(str(self.path))
        self._requests: dict[tuple, object] = {}

    @property
    def providers(self) -> tuple[str, ...]:
        return (f"OpenVINO-{self.ov.__version__.split('-')[0]}-CPU-{self.precision}{self.note}",)

    def compile(self, shapes: dict[str, tuple[int, ...]]):
        """An infer request of the graph reshaped to static ``shapes``."""
        model = self._model.clone()
        model.reshape({name: self.ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        config = {
            "INFERENCE_PRECISION_HINT": _HINTS[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
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


def choose_precisions(bundle, by_precision: dict[str, dict[str, OpenVinoSession]], threshold_db=AUTO_THRESHOLD_DB):
    """``auto``: the sessions mixing bf16 and fp32 graphs with the most bf16 graphs whose SR output stays within
    ``threshold_db`` + AUTO_MARGIN_DB of the all-fp32 pipeline on a seeded probe (one 32 x 32 LR slice, 2 steps);
    and that PSNR.

    Judged on the pipeline's output, not per graph: bf16 error in the latent is amplified by the decoder, so a
    denoiser that passes alone can fail end to end (seen on random-weight models: 43 dB alone, 36 dB at the image).
    """
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions

    probe = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32)).astype(np.float32)
    options = SamplingOptions(steps=2, batch_size=1, consistency="none")

    def output(sessions):
        return LatentSRPipeline(bundle, sessions).super_resolve(probe, options).images

    reference = output(by_precision["fp32"])
    graphs = list(bundle.graphs)
    combos = sorted(itertools.product(("bf16", "fp32"), repeat=len(graphs)), key=lambda combo: combo.count("fp32"))
    for combo in combos[:-1]:
        sessions = {graph: by_precision[precision][graph] for graph, precision in zip(graphs, combo)}
        parity = psnr_db(output(sessions), reference)
        if parity >= threshold_db + AUTO_MARGIN_DB:
            return sessions, parity
    return by_precision["fp32"], float("inf")


def open_openvino_sessions(bundle, precision: str = "auto", threads: int | None = None) -> dict[str, OpenVinoSession]:
    """An OpenVinoSession per graph of ``bundle`` sharing one ov.Core and the engine cache's OpenVINO folder.

    ``auto``: bf16 graphs as ``choose_precisions`` allows on CPUs with bf16 units, fp32 elsewhere; each session's
    ``providers`` then names its precision and the probe's end-to-end PSNR against fp32.
    """
    from medsr.engine.trt import CACHE_ENV, cache_root

    if precision not in OPENVINO_PRECISIONS:
        raise BackendError(f"OpenVINO precision must be one of {', '.join(OPENVINO_PRECISIONS)}, got {precision!r}")
    ov = import_openvino()
    core = ov.Core()
    cache_dir = model_cache_dir(cache_root(bundle), ov, core)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only bundle without MEDSR_ENGINE_CACHE: run uncached, and say so
        warnings.warn(
            f"OpenVINO model cache disabled, {cache_dir} is not writable ({exc}); set {CACHE_ENV}", stacklevel=2
        )
        cache_dir = None

    def sessions(chosen: str) -> dict[str, OpenVinoSession]:
        return {
            name: OpenVinoSession(name, entry.path, chosen, threads, cache_dir, ov, core)
            for name, entry in bundle.graphs.items()
        }

    if precision != "auto":
        return sessions(precision)
    if not has_bf16_units(core):
        return sessions("fp32")
    chosen, parity = choose_precisions(bundle, {"fp32": sessions("fp32"), "bf16": sessions("bf16")})
    for session in chosen.values():
        session.note = f" (auto: {parity:.1f} dB vs fp32 on the probe)"
    return chosen
