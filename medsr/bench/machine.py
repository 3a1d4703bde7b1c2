"""The machine a benchmark ran on: CPU, cores, load, library versions, and its measured GEMM ceilings.

Achieved GFLOP/s mean little without the ceiling of the same machine in the same run, so the peak is measured, not
taken from a data sheet: the best of several square matrix products in each library the engines use (PyTorch's
oneDNN/MKL, ONNX Runtime's MLAS), fp32 and bf16 (the latter where the CPU has bf16 units).
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

import numpy as np

from medsr.engine.sessions import available_cores

#: CPU flags that give bf16 matrix units (AVX-512 BF16 dot products, AMX tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (platform.processor() where /proc/cpuinfo has none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict:
    """CPU model, cores, bf16 flags, memory (GiB), load averages (1, 5, 15 min) and library versions."""
    flags = cpu_flags()
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    packages = ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "diffusers", "openvino", "tensorrt", "onnxslim")
    return {
        "cpu": cpu_model(),
        "cores": available_cores(),
        "bf16_units": sorted(flag for flag in BF16_FLAGS if flag in flags),
        "avx512": "avx512f" in flags,
        "memory_gib": None if memory_gib is None else round(memory_gib, 1),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: version for name in packages if (version := _version(name))},
    }


def _best_seconds(function, repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def torch_gemm_gflops(threads: int, dtype: str = "fp32", n: int = 2048, repeats: int = 8, device: str = "cpu") -> float:
    """Best GFLOP/s of an n x n matrix product in PyTorch (2 n^3 flops), ``dtype`` "fp32", "bf16" or "fp16".

    On CUDA, TF32 is switched off for fp32 so the figure is the true fp32 ceiling.
    """
    import torch

    torch.set_num_threads(threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    a = torch.randn(n, n, dtype=dtypes[dtype], device=device)
    b = torch.randn(n, n, dtype=dtypes[dtype], device=device)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False

    def product():
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        return 2 * n**3 / _best_seconds(product, repeats) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def ort_gemm_gflops(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """Best GFLOP/s of an n x n fp32 MatMul in ONNX Runtime's CPU provider (MLAS)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((n, n), dtype=np.float32) for name in ("a", "b")}
    return 2 * n**3 / _best_seconds(lambda: session.run(None, feeds), repeats) / 1e9


def gemm_ceilings(threads: int, device: str = "cpu") -> dict[str, float]:
    """GFLOP/s ceilings measured now: ``fp32`` (the best library) and ``bf16`` (CPUs with bf16 units) on the CPU;
    ``fp32`` (no TF32), ``fp16`` and ``bf16`` tensor-core products on CUDA."""
    if device == "cuda":
        return {dtype: torch_gemm_gflops(threads, dtype, n=8192, device="cuda") for dtype in ("fp32", "fp16", "bf16")}
    ceilings = {"fp32": max(torch_gemm_gflops(threads, "fp32"), ort_gemm_gflops(threads))}
    if any(flag in cpu_flags() for flag in BF16_FLAGS):
        ceilings["bf16"] = torch_gemm_gflops(threads, "bf16")
    return ceilings
