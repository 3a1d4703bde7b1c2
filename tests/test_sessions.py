"""ONNX Runtime tuning, engine dispatch and its errors, and the slimmed export graphs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from fresh_python import run_python

from medsr.bundle import load_bundle
from medsr.engine.sessions import OrtSession, OrtTuning, available_cores, open_sessions
from medsr.errors import BackendError


def test_tuning_sets_threads_spinning_arena_and_level():
    options = OrtTuning(threads=3, spinning=False, optimization="extended", memory_arena=False).session_options(ort)
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert not options.enable_cpu_mem_arena and not options.enable_mem_pattern
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert (
        OrtTuning(spinning=True).session_options(ort).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    )
    assert OrtTuning().session_options(ort).intra_op_num_threads == available_cores()
    with pytest.raises(BackendError, match="optimization must be one of basic, extended, all"):
        OrtTuning(optimization="max").session_options(ort)


def test_threads_argument_overrides_tuning(tiny_bundle):
    path = load_bundle(tiny_bundle).graph_path("vae_decoder")
    session = OrtSession(path, threads=1, tuning=OrtTuning(threads=2, spinning=True))
    assert session.tuning == OrtTuning(threads=1, spinning=True)
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
        ("openvino", "cuda", "fp32", "runs on the CPU in medsr"),
        ("trt", "cpu", "fp16", "pass --device cuda"),
    ],
)
def test_open_sessions_refuses_what_cannot_run(tiny_bundle, engine, device, precision, message):
    with pytest.raises(BackendError, match=message):
        open_sessions(load_bundle(tiny_bundle), engine, device=device, precision=precision)


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
