"""The CUDA runtime wrapper of the TensorRT engine on a real GPU (skipped without cuda-python and a GPU), and a real
TensorRT build and run of the tiny bundle where TensorRT is installed. benchmarks/gpu.sh runs these on a GPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

cuda_bindings = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda-bindings) is not installed")
pytestmark = pytest.mark.gpu  # real CuPy and GPU engines (tests/conftest.py)

from medsr.engine.cuda import CudaRuntime
from medsr.errors import BackendError


@pytest.fixture(scope="module")
def cuda():
    try:
        return CudaRuntime()
    except BackendError as exc:
        pytest.skip(str(exc))


def test_gpu_name_and_capability(cuda):
    gpu = cuda.gpu()
    assert gpu.name.startswith("NVIDIA") and gpu.compute_capability.count(".") == 1
    assert isinstance(cuda.stream_handle, int) and cuda.stream_handle != 0  # TensorRT needs a non-default stream


def test_round_trip_through_device_and_cuda_graph_replay(cuda):
    """Pinned -> device -> pinned copies captured once as a graph and replayed with new host data."""
    host_in_address, host_in = cuda.pinned((3, 64, 64), np.float32)
    host_out_address, host_out = cuda.pinned((3, 64, 64), np.float32)
    device = cuda.malloc(host_in.nbytes)
    try:
        host_in[...] = 1.5
        cuda.copy_to_device(device, host_in_address, host_in.nbytes)
        cuda.copy_to_host(host_out_address, device, host_in.nbytes)
        cuda.synchronize()
        np.testing.assert_array_equal(host_out, 1.5)
        cuda.begin_capture()
        cuda.copy_to_device(device, host_in_address, host_in.nbytes)
        cuda.copy_to_host(host_out_address, device, host_in.nbytes)
        graph = cuda.end_capture()
        for value in (2.0, -3.0):
            host_in[...] = value
            cuda.launch(graph)
            cuda.synchronize()
            np.testing.assert_array_equal(host_out, value)
        cuda.destroy_graph(graph)
    finally:
        cuda.free(device)
        cuda.free_pinned(host_in_address)
        cuda.free_pinned(host_out_address)


def test_a_failed_capture_leaves_the_stream_usable(cuda):
    """A call CUDA forbids while capturing (a synchronize) invalidates the capture; abort_capture ends it, so the
    stream takes ordinary work again (else every later call fails with cudaErrorStreamCaptureInvalidated)."""
    host_address, host = cuda.pinned((16,), np.float32)
    device = cuda.malloc(host.nbytes)
    try:
        cuda.begin_capture()
        with pytest.raises(BackendError, match="cudaStreamSynchronize"):
            cuda.synchronize()
        cuda.abort_capture()
        host[...] = 4.0
        cuda.copy_to_device(device, host_address, host.nbytes)
        host[...] = 0.0
        cuda.copy_to_host(host_address, device, host.nbytes)
        cuda.synchronize()
        np.testing.assert_array_equal(host, 4.0)
    finally:
        cuda.free(device)
        cuda.free_pinned(host_address)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed")
def test_tensorrt_matches_onnxruntime_on_the_tiny_bundle(tiny_bundle, tmp_path, monkeypatch):
    """Real TensorRT (fp32, and fp16 with pinned norms on 10.x or tf32 on 11.x) against ONNX Runtime CPU on every
    graph."""
    from medsr.bundle import load_bundle
    from medsr.engine.compare import compare_arrays
    from medsr.engine.profiles import graph_input_shapes
    from medsr.engine.sessions import open_ort_sessions
    from medsr.engine.trt import import_tensorrt, open_trt_sessions
    from medsr.engine.trt_build import trt_features

    runs = trt_features(import_tensorrt().__version__).precisions
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    bundle = load_bundle(tiny_bundle)
    reference = open_ort_sessions(bundle)
    rng = np.random.default_rng(0)
    for precision, threshold in (("fp32", 60.0), ("fp16" if "fp16" in runs else "tf32", 35.0)):
        sessions = open_trt_sessions(bundle, precision)
        for graph, shapes in graph_input_shapes(bundle, 2, 32, 32).items():
            feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
            expected = reference[graph].run(feeds)
            for _ in range(2):  # the second run replays the CUDA graph
                actual = sessions[graph].run(feeds)
            for name, array in expected.items():
                assert compare_arrays(actual[name], array)["psnr_db"] > threshold, (precision, graph, name)
