"""ONNX Runtime session settings, the engine registry and its errors, and the slimmed export graphs."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from fresh_python import run_python

import medsr.engine.sessions as sessions_module
from medsr.bundle import load_bundle
from medsr.engine.sessions import ENGINES, OrtSession, available_cores, open_sessions, ort_session_options
from medsr.errors import BackendError


def test_session_options_threads_no_spinning_full_optimization_and_arena():
    options = ort_session_options(ort, threads=3)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert ort_session_options(ort).intra_op_num_threads == available_cores()


def test_a_session_runs_with_the_threads_asked_for(tiny_bundle):
    path = load_bundle(tiny_bundle).graph_path("vae_decoder")
    session = OrtSession(path, threads=1)
    assert session.threads == 1
    out = session.run({"latent": np.zeros((1, 4, 8, 8), np.float32)})["image"]
    assert out.shape == (1, 1, 32, 32)
    session.close()


def test_cuda_without_the_gpu_package_is_an_error(tiny_bundle):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendError, match="install onnxruntime-gpu for --device cuda"):
        OrtSession(load_bundle(tiny_bundle).graph_path("denoiser"), device="cuda")


@pytest.mark.parametrize(
    "engine, device, precision, message",
    [
        ("onnx", "cpu", "fp32", "unknown engine 'onnx'; choose one of ort, torch, trt, openvino"),
        ("ort", "cpu", "bf16", "--engine ort runs fp32 only"),  # ORT has no x86 bf16 path: use openvino
        ("torch", "cpu", "fp16", "--engine torch runs fp32 only"),
        ("openvino", "cpu", "fp16", "--engine openvino runs fp32, bf16, auto, got --precision fp16"),
        ("openvino", "cuda", "fp32", "runs on the CPU in medsr"),
        ("trt", "cpu", "fp16", "pass --device cuda"),
    ],
)
def test_open_sessions_refuses_what_cannot_run(tiny_bundle, engine, device, precision, message):
    with pytest.raises(BackendError, match=message):
        open_sessions(load_bundle(tiny_bundle), engine, device=device, precision=precision)


def test_torch_is_a_registered_backend_and_its_absence_is_one_line(tiny_bundle, monkeypatch):
    """The engine never imports medsr.export: ``torch`` is an opener that medsr.export.reference registers when it is
    imported; without it, open_sessions says to install the torch extra."""
    without_torch = {name: opener for name, opener in sessions_module._BACKENDS.items() if name != "torch"}
    monkeypatch.setattr(sessions_module, "_BACKENDS", without_torch)  # restored, with a real torch if any, after
    with pytest.raises(BackendError, match=r"^--engine torch needs the torch extra \(pip install 'medsr\[torch\]'\)"):
        open_sessions(load_bundle(tiny_bundle), "torch")
    seen = []
    sessions_module.register_backend("torch", lambda bundle, **options: seen.append(options) or {"graph": "s"})
    assert open_sessions(load_bundle(tiny_bundle), "torch", threads=2) == {"graph": "s"}
    assert seen == [{"device": "cpu", "threads": 2, "precision": "fp32"}]
    with pytest.raises(BackendError, match="unknown engine 'tvm'"):
        sessions_module.register_backend("tvm", lambda bundle, **options: {})
    assert set(without_torch) == {"ort", "trt", "openvino", "torch"} == set(ENGINES)


def test_importing_the_reference_registers_torch():
    pytest.importorskip("torch")
    code = (
        "import medsr.engine.sessions as s\n"
        "assert 'torch' not in s._BACKENDS, 'the engine registered torch by itself'\n"
        "import medsr.export.reference as r\n"
        "assert s._BACKENDS['torch'] is r._open_backend\n"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr


def test_exported_graphs_are_slimmed_and_keep_dynamic_axes(tiny_bundle):
    """onnxslim ran at export (slimming again removes nothing; the raw tiny export has 370 nodes, slimmed 210), and
    the named dynamic axes survive."""
    import onnx
    import onnxslim

    model = onnx.load(str(load_bundle(tiny_bundle).graph_path("denoiser")))
    assert len(onnxslim.slim(model).graph.node) == len(model.graph.node) < 300
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["sample"][0] == "batch" and dims["sample"][2] == "latent_height"


@pytest.mark.parametrize(
    "module",
    [
        "medsr.engine.trt",
        "medsr.engine.openvino",
        "medsr.engine.cuda",
        "medsr.engine.profiles",
        "medsr.engine.trt_build",
    ],
)
def test_backend_modules_import_without_torch(module):
    """The engine's backends (and the torch-free TensorRT builder they call) never need torch."""

    code = f"import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; import {module}"
    run = run_python(code)
    assert run.returncode == 0, run.stderr


class CudaStandIn:
    """ONNX Runtime as a CUDA install would present it, computing on the CPU provider underneath: it records the
    CUDA provider options of every session, and refuses ``enable_cuda_graph`` as ONNX Runtime does when a node of
    the graph is not on the CUDA EP (when ``refuse_graphs``)."""

    def __init__(self, monkeypatch, refuse_graphs: bool):
        self.opened: list[tuple[str, dict]] = []
        real = ort.InferenceSession

        def session(path, sess_options=None, providers=None):
            name, options = providers[0]
            self.opened.append((path.rsplit("/", 1)[-1], dict(options)))
            if refuse_graphs and options.get("enable_cuda_graph") == "1":
                raise ort.capi.onnxruntime_pybind11_state.Fail(
                    "This session cannot use the graph capture feature as requested by the user as all compute "
                    "graph nodes have not been partitioned to the CUDAExecutionProvider"
                )
            inner = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
            inner.get_providers = lambda: [name, "CPUExecutionProvider"]
            return inner

        monkeypatch.setattr(ort, "InferenceSession", session)
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


class FakeStream:
    ptr = 0xC0DA


class FakeCupy:
    class cuda:  # the cupy.cuda namespace
        @staticmethod
        def Stream(non_blocking=False):
            assert non_blocking
            return FakeStream()


@pytest.mark.parametrize("refuse_graphs", [False, True])
def test_the_cuda_denoiser_replays_cuda_graphs_where_onnxruntime_allows(tiny_bundle, monkeypatch, refuse_graphs):
    stand_in = CudaStandIn(monkeypatch, refuse_graphs)
    monkeypatch.setattr(sessions_module, "import_cupy", lambda: FakeCupy)
    bundle = load_bundle(tiny_bundle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = sessions_module.open_ort_sessions(bundle, device="cuda", threads=1)
    refusals = [str(w.message) for w in caught if "refused CUDA graphs" in str(w.message)]
    assert len(refusals) == refuse_graphs
    assert all("not been partitioned to the CUDAExecutionProvider" in line for line in refusals)
    denoiser = bundle.graph_path("denoiser").name
    assert opened["denoiser"].cuda_graph is not refuse_graphs
    assert not opened["vae_encoder"].cuda_graph and not opened["vae_decoder"].cuda_graph
    attempts = [options for name, options in stand_in.opened if name == denoiser]
    assert [a.get("enable_cuda_graph") for a in attempts] == (["1", None] if refuse_graphs else ["1"])
    assert all(a["user_compute_stream"] == str(FakeStream.ptr) for a in attempts)
    asked = [name for name, options in stand_in.opened if options.get("enable_cuda_graph") == "1"]
    assert asked == [denoiser]  # the encoder and decoder, run once per batch at moving addresses, never ask


def test_without_cupy_the_cuda_denoiser_asks_for_no_cuda_graph(tiny_bundle, monkeypatch):
    stand_in = CudaStandIn(monkeypatch, refuse_graphs=False)
    monkeypatch.setattr(sessions_module, "import_cupy", lambda: None)
    opened = sessions_module.open_ort_sessions(load_bundle(tiny_bundle), device="cuda", threads=1)
    assert not opened["denoiser"].cuda_graph
    assert all("enable_cuda_graph" not in options for _, options in stand_in.opened)
