"""The device loop on a real GPU (skipped without CuPy and a GPU engine): on TensorRT the whole-loop CUDA graph, on
ONNX Runtime CUDA the per-step loop with the fused step kernel. tests/test_device_loop.py checks the same logic on
the CPU and on fakes on every machine; benchmarks/gpu.sh runs this file.

Each device loop is compared with the host loop (every step through the host) on the same engine, plans and seeds:
the engine's kernels are deterministic for one engine and shape, and the fused step kernel is bit-identical to the
NumPy step (tests/test_step_kernel.py), so the images must be equal bit for bit.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

pytest.importorskip("cupy", reason="CuPy is not installed")
pytestmark = pytest.mark.gpu  # real CuPy and GPU engines (tests/conftest.py)

from samplers import SAMPLERS

import medsr.engine.trt as trt_module
from medsr.bench.loop_variants import HostOnly
from medsr.bundle import load_bundle
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.errors import BackendError

VOLUME = np.random.default_rng(5).uniform(-1, 1, (7, 32, 32)).astype(np.float32)
OPTIONS = SamplingOptions(steps=4, seed=2, batch_size=2, tile_size=None)
LOOPS = ["ddpm-stochastic", "dpmsolver++", "ddim-clip-stochastic"]


def images_of(bundle, sessions, name):
    return LatentSRPipeline(bundle, sessions, SAMPLERS[name]).super_resolve(VOLUME, OPTIONS).images


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None,
    reason="TensorRT or cuda-python is not installed",
)
@pytest.mark.parametrize("name", LOOPS)
def test_the_captured_loop_equals_the_host_loop_on_tensorrt(tiny_bundle, tmp_path, monkeypatch, name):
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    bundle = load_bundle(tiny_bundle)
    try:
        device_sessions = trt_module.open_trt_sessions(bundle, "fp32")
    except BackendError as exc:
        pytest.skip(str(exc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused capture warns: here it must not happen
        images = images_of(bundle, device_sessions, name)
    bindings = device_sessions["denoiser"]._bindings
    (full,) = [binding for signature, binding in bindings.items() if signature[0][0] == 2]
    assert full.capturable and [loop.graph is not None for loop in full.loops.values()] == [True]
    monkeypatch.setattr(trt_module, "import_cupy", lambda: None)
    host_sessions = trt_module.open_trt_sessions(bundle, "fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CuPy is not installed"
        host_images = images_of(bundle, host_sessions, name)
    assert not host_sessions["denoiser"]._bindings
    np.testing.assert_array_equal(images, host_images)
    for sessions in (device_sessions, host_sessions):
        for session in sessions.values():
            session.close()


@pytest.mark.parametrize("name", LOOPS)
def test_the_device_loop_equals_the_host_loop_on_onnxruntime_cuda(tiny_bundle, name):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu (the CUDA execution provider) is not installed")
    from medsr.engine.sessions import open_ort_sessions

    bundle = load_bundle(tiny_bundle)
    sessions = open_ort_sessions(bundle, device="cuda")
    images = images_of(bundle, sessions, name)
    assert sessions["denoiser"]._bindings, "the device loop did not run"
    host_images = images_of(bundle, {**sessions, "denoiser": HostOnly(sessions["denoiser"])}, name)
    np.testing.assert_array_equal(images, host_images)
