"""The OpenVINO engine: fp32 matches ONNX Runtime, bf16 and auto under the parity gate, the model cache, the errors."""

from __future__ import annotations

import numpy as np
import pytest
from fresh_python import run_python

ov = pytest.importorskip("openvino")

from medsr.bundle import load_bundle
from medsr.bundle.cache import manifest_digest
from medsr.engine.compare import compare_arrays
from medsr.engine.openvino import OpenVinoSession, open_openvino_sessions
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.profiles import graph_input_shapes
from medsr.engine.sessions import open_ort_sessions
from medsr.errors import BackendError
from medsr.eval.parity import compare_pipelines


class NoBf16Core:
    """A real ov.Core that reports a CPU without bf16 units."""

    def __init__(self):
        self.core = ov.Core()

    def get_property(self, device, name):
        if name == "OPTIMIZATION_CAPABILITIES":
            return ["FP32", "INT8"]
        return self.core.get_property(device, name)

    def __getattr__(self, name):
        return getattr(self.core, name)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


def _feeds(bundle, batch=2):
    rng = np.random.default_rng(1)
    shapes = graph_input_shapes(bundle, batch, 24, 16)
    return {
        graph: {n: rng.standard_normal(s, dtype=np.float32) for n, s in inputs.items()}
        for graph, inputs in shapes.items()
    }


def test_fp32_matches_onnxruntime_on_every_graph(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    sessions, reference = open_openvino_sessions(bundle, "fp32", threads=2), open_ort_sessions(bundle)
    for graph, feeds in _feeds(bundle).items():
        expected = reference[graph].run(feeds)
        for name, array in sessions[graph].run(feeds).items():
            assert compare_arrays(array, expected[name])["psnr_db"] > 80, (graph, name)
    assert sessions["denoiser"].providers[0].endswith("CPU-fp32")
    blobs = list((tmp_path / "engines" / manifest_digest(bundle)).glob("openvino-*/cpu-*/fp32/*.blob"))
    assert blobs, "compiled models were not cached"
    assert not (bundle.root / "engines").exists()


def test_an_unwritable_cache_runs_uncached_and_says_so(bundle, tmp_path, monkeypatch):
    """A cache that cannot be written (here a path that cannot be a folder, which fails even for root) must not stop
    inference: the sessions run without a model cache, with one warning naming the folder and the way out."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEDSR_CACHE", str(blocker))
    with pytest.warns(UserWarning, match=r"model cache disabled, .*a-file.* is not writable .*MEDSR_CACHE") as caught:
        sessions = open_openvino_sessions(bundle, "fp32", threads=1)
    assert len(caught) == 1
    feeds = _feeds(bundle, batch=1)["vae_decoder"]
    expected = open_ort_sessions(bundle)["vae_decoder"].run(feeds)["image"]
    assert compare_arrays(sessions["vae_decoder"].run(feeds)["image"], expected)["psnr_db"] > 80
    assert blocker.read_text() == "not a folder"


def _has_bf16():
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _stage_parity(bundle, sessions):
    lr = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16)).astype(np.float32)
    reference = LatentSRPipeline(bundle, open_ort_sessions(bundle))
    options = SamplingOptions(steps=2, batch_size=2, consistency="none")
    return compare_pipelines(LatentSRPipeline(bundle, sessions), reference, lr, options, threshold_db=40.0)


@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no bf16 units")
def test_bf16_everywhere_drifts_and_auto_keeps_the_pipeline_above_40_db(bundle, tmp_path, monkeypatch):
    """Per stage against fp32 ONNX Runtime. Random weights are harsh: bf16 in every graph of the tiny model loses
    the 40 dB gate at the decoded image (about 36 dB), so ``auto`` keeps only the graphs that hold it."""
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    everywhere = _stage_parity(bundle, open_openvino_sessions(bundle, "bf16"))
    assert everywhere.stages[0].psnr_db > 45 and everywhere.final.psnr_db > 30
    auto = open_openvino_sessions(bundle, "auto")
    report = _stage_parity(bundle, auto)
    assert report.passed, report.to_dict()
    precisions = {name: session.precision for name, session in auto.items()}
    assert "fp32" in precisions.values() and "auto:" in auto["denoiser"].providers[0], precisions


def test_without_bf16_units_auto_is_fp32_and_bf16_is_refused(bundle):
    path = bundle.graph_path("denoiser")
    with pytest.raises(BackendError, match="no bf16 units"):
        OpenVinoSession("denoiser", path, "bf16", core=NoBf16Core())
    with pytest.raises(BackendError, match="must be one of fp32, bf16, auto"):
        OpenVinoSession("denoiser", path, "fp16")
    with pytest.raises(BackendError, match="must be one of fp32, bf16, auto"):
        open_openvino_sessions(bundle, "int8")


def test_auto_on_a_cpu_without_bf16_is_fp32(bundle, tmp_path, monkeypatch):
    import medsr.engine.openvino as module

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    monkeypatch.setattr(module, "has_bf16_units", lambda core: False)
    sessions = open_openvino_sessions(bundle, "auto")
    assert {session.precision for session in sessions.values()} == {"fp32"}


def test_missing_openvino_names_the_extra():

    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from medsr.engine.openvino import import_openvino\n"
        "from medsr.errors import BackendError\n"
        "try:\n    import_openvino()\nexcept BackendError as exc:\n    print(exc)\n"
    )
    run = run_python(code)
    assert "pip install 'medsr[openvino]'" in run.stdout, run.stderr
