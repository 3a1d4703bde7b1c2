"""Shared fixtures: one tiny exported bundle per test session, and the real volumes that ship with packages."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _fakes_never_meet_real_cupy(request, monkeypatch):
    """The TensorRT fakes (tests/trt_fakes.py) keep "device" memory in NumPy arrays at made-up addresses, which CuPy
    must never view: on a machine with CuPy (benchmarks/gpu.sh runs these tests on a GPU) the TensorRT session would
    bind them. Tests marked ``gpu`` run real TensorRT and CuPy and keep the real import."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr("medsr.engine.trt.import_cupy", lambda: None)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle of the ``tiny`` preset with random weights (seed 0), exported once per session (~7 s)."""
    pytest.importorskip("torch")
    from medsr.export.builder import build_models
    from medsr.export.onnx import export_bundle
    from medsr.export.presets import get_preset

    preset = get_preset("tiny")
    vae, unet, provenance = build_models(preset, seed=0)
    return export_bundle(vae, unet, preset, tmp_path_factory.mktemp("bundles") / "tiny", provenance)


@pytest.fixture(scope="session")
def through_bundle(tmp_path_factory) -> Path:
    """The ``tiny-through-plane`` preset (x4, Gaussian FWHM 4) exported with random weights by medsr-export, once
    per session; the tests only read it."""
    pytest.importorskip("torch")
    from click.testing import CliRunner

    from medsr.cli.export import export

    root = tmp_path_factory.mktemp("bundles") / "tiny-through-plane"
    result = CliRunner().invoke(export, ["--preset", "tiny-through-plane", "--random-init", "-o", str(root)])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="session")
def example4d_path() -> Path:
    """nibabel's real EPI volume: 128x96x24x2, 2 x 2 x 2.2 mm, int16 with an oblique affine (MIT licence)."""
    from nibabel.testing import data_path

    return Path(data_path) / "example4d.nii.gz"
