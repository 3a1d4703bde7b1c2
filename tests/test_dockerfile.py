"""What can be checked of the Dockerfile without docker: a CUDA + TensorRT base, sources that exist, packages that
match the gpu-cu12 extra (one CUDA major in the image, the base image's), a build-time check of the whole GPU chain,
the drivers it needs said, a console script as entry point, a non-root user and a writable engine cache; and that
each gpu extra pairs packages of one CUDA major."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_base_image_has_cuda_and_tensorrt():
    (first, image), *_ = instructions()
    assert first == "FROM" and image.startswith("nvcr.io/nvidia/tensorrt:") and image.endswith("-py3")


def test_copied_sources_exist():
    copies = [shlex.split(args)[:-1] for kind, args in instructions() if kind == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source


def _requirements(run: str) -> dict[str, str]:
    """{package: version specifier} of the quoted requirements of ``run``."""
    found = re.findall(r'"([A-Za-z0-9_.-]+)(\[[^\]]*\])?([<>=!~][^"]*)"', run)
    return {name: spec for name, _, spec in found}


def _extra(name: str) -> dict[str, str]:
    """{package: version specifier} of a pyproject extra (its own extras in brackets dropped)."""
    return {
        match[0]: match[2]
        for dep in pyproject()["project"]["optional-dependencies"][name]
        for match in [re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?(.*)", dep).groups()]
    }


def test_installed_packages_are_the_gpu_cu12_extra_and_core_without_cpu_onnxruntime():
    """The image is CUDA 12 (TensorRT 25.01: CUDA 12.8), so its GPU packages are the gpu-cu12 extra's, with the
    same version bounds; its own tensorrt (10.8, CUDA 12) stands for tensorrt-cu12."""
    run = " ".join(args for kind, args in instructions() if kind == "RUN")
    requirements = _requirements(run)
    project = pyproject()["project"]
    core = {re.split(r"[<>=!~]", dep)[0] for dep in project["dependencies"]}
    gpu = _extra("gpu-cu12")
    assert set(requirements) == (core - {"onnxruntime"}) | (set(gpu) - {"tensorrt-cu12"}), requirements
    assert {name: requirements[name] for name in gpu if name in requirements} == {
        name: spec for name, spec in gpu.items() if name != "tensorrt-cu12"
    }
    assert "pip install --no-deps ." in run


def _release(image: str) -> tuple[int, int]:
    year, month = image.rsplit(":", 1)[1].split("-")[0].split(".")
    return int(year), int(month)


def test_one_cuda_major_in_the_image():
    """NVIDIA's TensorRT images 23.x-25.x are CUDA 12 (25.01: CUDA 12.8, TensorRT 10.8), so no CUDA 13 build may be
    installed: onnxruntime-gpu 1.27 and later and cuda-python 13 are CUDA 13 builds."""
    (_, image), *_ = instructions()
    assert (23, 1) <= _release(image) <= (25, 12), image
    requirements = _requirements(" ".join(args for kind, args in instructions() if kind == "RUN"))
    assert requirements["onnxruntime-gpu"].endswith(",<1.27") and requirements["cuda-python"].endswith(",<13")


def test_the_build_checks_the_whole_gpu_chain():
    """The build fails unless TensorRT, cuda.bindings and ONNX Runtime import, each of the image's CUDA major, the
    CUDA provider is listed and every library it links (but the host's libcuda) is found in the image, and CuPy is
    installed with the NVRTC of that major (CuPy's import itself needs the host's driver)."""
    run = " ".join(args for kind, args in instructions() if kind == "RUN")
    for needed in (
        "import medsr.engine.trt",
        "tensorrt",
        "cuda.bindings.runtime",
        "tensorrt.__version__.startswith('10.')",
        "cuda.bindings.__version__.startswith('12.')",
        "'CUDAExecutionProvider' in providers",
        "libonnxruntime_providers_cuda.so",
        "not found",
        "ctypes.CDLL('libnvrtc.so.12')",
        "importlib.metadata.version('cupy-cuda12x')",
    ):
        assert needed in run, needed


def test_the_drivers_it_needs_are_said():
    text = (ROOT / "Dockerfile").read_text()
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "CUDA 12.8" in comments and "R570" in comments and "gpu-cu13" in comments and ">= 580" in comments
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^\| `gpu-cu12` \| .*driver >= 525", readme, flags=re.MULTILINE)
    assert re.search(r"^\| `gpu-cu13` \| .*driver >= 580", readme, flags=re.MULTILINE)


@pytest.mark.parametrize("major", [12, 13])
def test_each_gpu_extra_pairs_packages_of_one_cuda_major(major):
    """onnxruntime-gpu 1.21-1.26 are the CUDA 12 builds on PyPI with [cuda,cudnn] extras, 1.27 and later CUDA 13;
    cuda-python's major is its CUDA major; TensorRT's and CuPy's wheels name theirs (tensorrt-cu12, cupy-cuda12x),
    and CuPy's [ctk] extra brings the NVRTC of that major, which compiles the sampler-step kernel."""
    extra = _extra(f"gpu-cu{major}")
    assert set(extra) == {"onnxruntime-gpu", f"tensorrt-cu{major}", "cuda-python", f"cupy-cuda{major}x"}
    assert extra["cuda-python"].endswith(f",<{major + 1}")
    assert extra["onnxruntime-gpu"] == (">=1.21,<1.27" if major == 12 else ">=1.27,<2")
    deps = pyproject()["project"]["optional-dependencies"][f"gpu-cu{major}"]
    assert "onnxruntime-gpu[cuda,cudnn]" + extra["onnxruntime-gpu"] in deps
    assert f"cupy-cuda{major}x[ctk]" + extra[f"cupy-cuda{major}x"] in deps
    assert "gpu" not in pyproject()["project"]["optional-dependencies"]  # one extra per CUDA major, no ambiguous one


def test_entry_point_is_a_console_script():
    entry = [args for kind, args in instructions() if kind == "ENTRYPOINT"]
    assert len(entry) == 1
    script = json.loads(entry[0])[0]  # exec (JSON) form
    assert script in pyproject()["project"]["scripts"]


def test_runs_as_a_non_root_user_with_a_writable_engine_cache():
    steps = instructions()
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_run = max(i for i, (kind, _) in enumerate(steps) if kind == "RUN")
    assert max(i for i, (kind, _) in enumerate(steps) if kind == "USER") > last_run
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert f"MEDSR_CACHE=/home/{users[-1]}/" in env and "MEDSR_ENGINE_CACHE" not in env
