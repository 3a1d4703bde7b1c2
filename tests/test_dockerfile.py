"""What can be checked of the Dockerfile without docker: a CUDA + TensorRT base, sources that exist, packages that
match the gpu extra, a console script as entry point, a non-root user and a writable engine cache."""

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


def test_installed_packages_are_the_gpu_extra_and_core_without_cpu_onnxruntime():
    run = " ".join(args for kind, args in instructions() if kind == "RUN")
    requirements = set(re.findall(r'"([A-Za-z0-9_.-]+[<>=!~][^"]*)"', run))
    names = {re.split(r"[<>=!~]", req)[0] for req in requirements}
    project = pyproject()["project"]
    core = {re.split(r"[<>=!~]", dep)[0] for dep in project["dependencies"]}
    gpu = {re.split(r"[<>=!~]", dep)[0] for dep in project["optional-dependencies"]["gpu"]}
    assert names == (core - {"onnxruntime"}) | (gpu - {"tensorrt"}), names  # tensorrt comes with the base image
    assert "pip install --no-deps ." in run


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
