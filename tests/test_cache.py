"""The one cache of compiled engines (medsr.bundle.cache): where it is, how entries are keyed (manifest digest and
runtime, never the bundle's name), an unwritable cache, and that no engine writes into the bundle or the package."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from trt_fakes import FakeCuda, fake_bundle, fake_tensorrt

from medsr.bundle import load_bundle
from medsr.bundle.cache import cache_root, engine_dir, manifest_digest, path_part, runtime_dir, usable_dir
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_sessions
from medsr.models import DEFAULT_BUNDLE


def test_root_is_medsr_cache_else_xdg_else_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("MEDSR_CACHE")
    assert cache_root() == tmp_path / "xdg" / "medsr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "medsr"
    monkeypatch.setenv("MEDSR_CACHE", "")  # empty counts as unset
    assert cache_root() == tmp_path / "home" / ".cache" / "medsr"


def test_entries_are_keyed_by_the_manifest_bytes_and_the_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    bundle = fake_bundle(tmp_path / "a")
    digest = hashlib.sha256((tmp_path / "a" / "medsr.json").read_bytes()).hexdigest()
    assert manifest_digest(bundle) == digest
    folder = engine_dir(bundle, "tensorrt", "10.8.0", "NVIDIA H100 80GB HBM3-sm9.0", "fp16")
    assert folder == tmp_path / "cache/engines" / digest / "tensorrt-10.8.0/NVIDIA_H100_80GB_HBM3-sm9.0/fp16"
    assert engine_dir(bundle, "tensorrt", "10.9.0", "x") != engine_dir(bundle, "tensorrt", "10.8.0", "x")
    assert runtime_dir("tensorrt", "10.8.0", "x") == tmp_path / "cache" / "runtimes" / "tensorrt-10.8.0" / "x"
    assert path_part("../../etc") == ".._.._etc" and path_part("..") == "_" and path_part("a/b") == "a_b"


def test_two_bundles_with_the_same_name_get_their_own_plans(tmp_path, monkeypatch):
    """Keyed by bundle name, the second ``default`` found the first one's plan, called it stale and overwrote it; so
    two models of one name rebuilt each other's plans on every alternate run. Keyed by the manifest digest, each
    keeps its own."""
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    cuda = FakeCuda()
    feeds = {
        "sample": np.ones((1, 3, 64, 64), np.float32),
        "lr_latent": np.ones((1, 3, 16, 16), np.float32),
        "timestep": np.full((1,), 500.0, np.float32),
    }
    builds, folders = [], []
    for root, sha in ((tmp_path / "one", "ab" * 32), (tmp_path / "two", "cd" * 32)):
        bundle = fake_bundle(root, sha=sha, name="default")
        session = open_sessions_trt(bundle, cuda)["denoiser"]
        session.builder = lambda path, profile, precision, root=root: builds.append(root) or b"plan:denoiser"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "stale plan rebuilt"
            session.run(feeds)
        folders.append(session.cache.root)
    assert folders[0] != folders[1] and builds == [tmp_path / "one", tmp_path / "two"]
    assert all(len(list(folder.glob("*.plan"))) == 1 for folder in folders)
    again = open_sessions_trt(fake_bundle(tmp_path / "one", sha="ab" * 32, name="default"), cuda)["denoiser"]
    again.builder = lambda *args: pytest.fail("the first bundle's plan was not reused")
    again.run(feeds)


def open_sessions_trt(bundle, cuda):
    from medsr.engine.trt import open_trt_sessions

    return open_trt_sessions(bundle, "fp16", trt=fake_tensorrt(cuda), cuda=cuda)


def test_an_unusable_folder_is_one_warning_and_none(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match=r"^plan cache disabled, .*a-file/sub is not writable .*set MEDSR_CACHE"):
        assert usable_dir(blocker / "sub", "plan cache") is None
    assert usable_dir(tmp_path / "new" / "deep", "plan cache") == tmp_path / "new" / "deep"
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the write probe leaves nothing behind


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: relative path -> sha256 of a file, or "dir"."""
    return {
        str(path.relative_to(folder)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
    }


def available_engines() -> list[str]:
    engines = ["ort"]
    if importlib.util.find_spec("openvino"):
        engines.append("openvino")
    if importlib.util.find_spec("torch"):
        import medsr.export.reference  # noqa: F401  registers the torch backend, as the CLI does

        engines.append("torch")
    return engines


def test_no_engine_writes_into_the_shipped_default_bundle(tmp_path, monkeypatch):
    """The default model sits in site-packages: every engine available here runs it with MEDSR_CACHE unset and
    the user cache in tmp_path; the package folder is byte-identical afterwards, and the compiled engines are in
    the user cache."""
    monkeypatch.delenv("MEDSR_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = snapshot(DEFAULT_BUNDLE)
    bundle = load_bundle(DEFAULT_BUNDLE)
    lr = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16)).astype(np.float32)
    engines = available_engines()
    for engine in engines:
        sessions = open_sessions(bundle, engine, threads=2)
        images = LatentSRPipeline(bundle, sessions).super_resolve(lr, SamplingOptions(steps=1, batch_size=1)).images
        assert images.shape == (1, 16 * bundle.scale, 16 * bundle.scale) and np.isfinite(images).all(), engine
    assert snapshot(DEFAULT_BUNDLE) == before
    root = tmp_path / "xdg" / "medsr"
    if "openvino" in engines:
        blobs = list((root / "engines" / manifest_digest(bundle)).glob("openvino-*/cpu-*/fp32/*.blob"))
        assert blobs, sorted(snapshot(tmp_path))
    assert not (tmp_path / "home" / ".cache").exists()  # XDG_CACHE_HOME wins over HOME
