"""The TensorRT and cuda-python names medsr uses, checked against the real Python bindings of each major version.

TensorRT's libraries cannot be installed without NVIDIA's download host, but its bindings (``tensorrt-cu12-bindings``,
about 1 MB a wheel) import once libnvinfer/libnvonnxparser/libnvinfer_plugin are satisfied by a stub exporting the nine
C entry points the bindings resolve at import (docs/sources.md, "Packages and exporters"). That is enough to check
every class, enum and member name against each version, not to build or run a plan. The wheels are downloaded once
(``pip download --no-deps``, the package registry only) into ``.test-cache/`` at the repository root (ignored by git)
and reused; the stub is built with ``cc``. Each version is imported in a subprocess (its own LD_LIBRARY_PATH).

Checked per TensorRT version, on the path medsr takes there (medsr.engine.trt_build.trt_features): every name of
TRT_API that path uses exists; the weak-typing names exist exactly where trt_features says (10.x, not 11.x); the
fake tensorrt of tests/trt_fakes.py for that version has exactly the same of those names as the real module; and
every precision opens on both (11.x builds the reduced ones strongly typed). The same for cuda-bindings 12 and 13
(``cuda.cudart`` is gone in 13; medsr imports ``cuda.bindings.runtime``), and what the real runtime says on this machine without a driver.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".test-cache" / "api-surface"
#: The oldest TensorRT medsr supports and the newest 10.x, the oldest and the newest 11.x (PyPI, cu12 builds).
TENSORRT = ("10.8.0.43", "10.16.1.11", "11.0.0.114", "11.4.0.106")
CUDA_BINDINGS = ("12.9.10", "13.5.0")
#: cuda-bindings' one runtime dependency (pure Python; 12.9 wants ~=1.1, 13.5 >= 1.4.2).
CUDA_PATHFINDER = "1.9.1"
#: What the TensorRT bindings resolve from libnvinfer, libnvonnxparser and libnvinfer_plugin at import.
STUB_C = """
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
int initLibNvInferPlugins(void *logger, const char *library_namespace) { return 0; }
"""
#: The sonames to serve when ``ldd`` is not there to list them.
DEFAULT_SONAMES = tuple(
    f"lib{name}.so.{major}" for name in ("nvinfer", "nvonnxparser", "nvinfer_plugin") for major in (10, 11)
)


def install(package: str, version: str) -> Path:
    """A folder holding the unpacked wheel of ``package==version`` (no dependencies), downloaded on first use."""
    target = CACHE / f"{package}-{version}"
    if (target / ".complete").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=CACHE))
    try:
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        run = subprocess.run(
            [*download, "--dest", str(staging / "wheel"), f"{package}=={version}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=600,
        )
        wheels = sorted((staging / "wheel").glob("*.whl"))
        if run.returncode or not wheels:
            pytest.fail(
                f"pip could not download {package}=={version} (the test needs the package registry):\n{run.stderr[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(staging / "site")
        (staging / "site" / ".complete").write_text(wheels[0].name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "site", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def extension(site: Path) -> Path:
    return next((site / "tensorrt_bindings").glob("tensorrt*.so"))


def missing_sonames(module: Path) -> tuple[str, ...]:
    """The libraries ``module`` needs that this machine lacks, as ``ldd`` lists them (DEFAULT_SONAMES without it)."""
    if shutil.which("ldd") is None:
        return DEFAULT_SONAMES
    listing = subprocess.run(["ldd", str(module)], check=False, capture_output=True, text=True, timeout=60).stdout
    return tuple(line.split()[0] for line in listing.splitlines() if "not found" in line)


@pytest.fixture(scope="session")
def stub_dir() -> Path:
    """A folder of the stub library, built with cc, under every soname a TensorRT version asks for."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc): it builds the stub of libnvinfer the TensorRT bindings import against")
    folder = CACHE / "stub"
    library = folder / "libtrtstub.so"
    source = folder / "stub.c"
    if not library.is_file() or not source.is_file() or source.read_text() != STUB_C:
        folder.mkdir(parents=True, exist_ok=True)
        source.write_text(STUB_C)
        staging = folder / f".libtrtstub-{os.getpid()}.so"
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(staging), str(source)], check=True, timeout=120)
        os.replace(staging, library)
    return folder


@pytest.fixture(scope="session")
def tensorrt_shim() -> Path:
    """A ``tensorrt`` package that is the bindings' ``tensorrt_bindings`` (what the ``tensorrt`` wheel provides)."""
    package = CACHE / "shim" / "tensorrt"
    package.mkdir(parents=True, exist_ok=True)
    init = package / "__init__.py"
    code = "import sys\n\nimport tensorrt_bindings\n\nsys.modules[__name__] = tensorrt_bindings\n"
    if not init.is_file() or init.read_text() != code:
        init.write_text(code)
    return package.parent


def run_probe(code: str, paths: list[Path], library_path: Path | None, tmp_path: Path) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh Python with ``paths`` first on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["MEDSR_CACHE"] = str(tmp_path / "cache")
    env.pop("LD_LIBRARY_PATH", None)
    if library_path is not None:
        env["LD_LIBRARY_PATH"] = str(library_path)
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


HAS = """
def has(obj, dotted):
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
"""

TENSORRT_PROBE = (
    HAS
    + """
import json, pathlib
from medsr.engine.trt import import_tensorrt, open_trt_sessions
from medsr.engine.trt_build import TRT_API, trt_features, trt_logger
from medsr.errors import BackendError
from trt_fakes import FakeCuda, fake_bundle, fake_tensorrt

trt = import_tensorrt()
features = trt_features(trt.__version__)
every = TRT_API["common"] + TRT_API["weak_typing"]
fake = fake_tensorrt(version=trt.__version__)
logger = trt_logger(trt)
opened = {}
# auto would run its parity probe (plans built): not opened here
for precision in ("fp32", "tf32", "fp16", "bf16"):
    try:
        open_trt_sessions(fake_bundle(pathlib.Path("bundle")), precision, trt=trt, cuda=FakeCuda())
        opened[precision] = None
    except BackendError as exc:
        opened[precision] = str(exc)
print(json.dumps({
    "version": trt.__version__,
    "weak_typing": features.weak_typing,
    "precisions": list(features.precisions),
    "missing": [name for name in features.api_names if not has(trt, name)],
    "real": {name: has(trt, name) for name in every},
    "fake": {name: has(fake, name) for name in every},
    "one_logger": isinstance(logger, trt.Logger) and trt_logger(trt) is logger,
    "opened": opened,
}))
"""
)


@pytest.mark.parametrize("version", TENSORRT)
def test_tensorrt_names_medsr_uses_exist_on_the_path_each_version_takes(version, stub_dir, tensorrt_shim, tmp_path):
    site = install("tensorrt-cu12-bindings", version)
    for soname in missing_sonames(extension(site)):
        link = stub_dir / soname
        if not link.exists():
            link.symlink_to("libtrtstub.so")
    probe = run_probe(TENSORRT_PROBE, [tensorrt_shim, site], stub_dir, tmp_path)
    major = int(version.split(".")[0])
    assert probe["version"] == version
    assert probe["missing"] == [], f"TensorRT {version} lacks names medsr uses on its path"
    assert probe["weak_typing"] == (major == 10)
    weak = [name for name, present in probe["real"].items() if name.startswith(("BuilderFlag.FP16", "ILayer.prec"))]
    assert weak and all(probe["real"][name] == (major == 10) for name in weak)  # removed in 11, as trt_features says
    assert probe["fake"] == probe["real"], "tests/trt_fakes.py models another surface than the real bindings"
    assert probe["one_logger"]
    assert probe["opened"] == dict.fromkeys(probe["opened"])  # every precision opens, 11.x strongly typed
    assert probe["precisions"] == ["fp32", "tf32", "fp16", "fp16-all", "bf16"]


def test_real_bindings_without_their_libraries_say_what_to_install(tensorrt_shim, tmp_path):
    site = install("tensorrt-cu12-bindings", TENSORRT[-1])
    code = """
        import json
        from medsr.engine.trt import import_tensorrt
        from medsr.errors import BackendError
        try:
            import_tensorrt()
            print(json.dumps(None))
        except BackendError as exc:
            print(json.dumps(str(exc)))
    """
    message = run_probe(code, [tensorrt_shim, site], None, tmp_path)
    if message is None:
        pytest.skip("this machine has TensorRT's libraries")
    assert "libnv" in message and "needs TensorRT 10.8 to 11.x" in message and "pip install" in message


CUDA_PROBE = (
    HAS
    + """
import json
from medsr.engine.cuda import CUDART_API, CudaRuntime, import_cudart
from medsr.errors import BackendError
from trt_fakes import FakeCudart

runtime = import_cudart()
try:
    import cuda.cudart  # noqa: F401
    legacy = True
except ImportError:
    legacy = False
import cuda.bindings

status, driver = runtime.cudaDriverGetVersion()
try:
    CudaRuntime()
    message = None
except BackendError as exc:
    message = str(exc)
fake = FakeCudart()
values = ("cudaError_t.cudaErrorNoDevice", "cudaError_t.cudaErrorInsufficientDriver", "cudaStreamNonBlocking")


def value(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return int(obj)


print(json.dumps({
    "version": cuda.bindings.__version__,
    "module": runtime.__name__,
    "legacy_cudart": legacy,
    "missing": [name for name in CUDART_API if not has(runtime, name)],
    "fake_missing": [name for name in CUDART_API if not has(fake, name)],
    "values": {name: value(runtime, name) for name in values},
    "fake_values": {name: value(fake, name) for name in values},
    "driver": driver if int(status) == 0 else None,
    "message": message,
}))
"""
)


@pytest.mark.parametrize("version", CUDA_BINDINGS)
def test_cuda_runtime_names_exist_in_cuda_bindings(version, tmp_path):
    site = install("cuda-bindings", version)
    pathfinder = install("cuda-pathfinder", CUDA_PATHFINDER)
    probe = run_probe(CUDA_PROBE, [site, pathfinder], None, tmp_path)
    major = int(version.split(".")[0])
    assert probe["version"] == version and probe["module"] == "cuda.bindings.runtime"
    assert probe["legacy_cudart"] == (major == 12)  # cuda.cudart is gone in 13
    assert probe["missing"] == [] and probe["fake_missing"] == []
    assert probe["fake_values"] == probe["values"]
    if not probe["driver"]:  # no NVIDIA driver here (CI): the install hint, not cudaErrorInsufficientDriver
        message = probe["message"]
        assert "found no NVIDIA driver" in message and f"cuda-python {major}.x" in message
        assert ("580" if major == 13 else "525") in message and "cudaError" not in message
