"""A volume's last batch on real TensorRT (skipped without TensorRT, cuda-python and a GPU): padded onto the plan
of the full batch, one deserialized engine per plan shared by its execution contexts, and the real items' results
those of the same plan run at full batch (tests/test_trt.py checks the same with the fakes, on every machine)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda-bindings) is not installed")
pytest.importorskip("tensorrt", reason="TensorRT is not installed")
pytestmark = pytest.mark.gpu  # real CuPy and GPU engines (tests/conftest.py)


def test_the_last_batch_runs_padded_on_the_full_batch_plan(tiny_bundle, tmp_path, monkeypatch):
    from medsr.bundle import load_bundle
    from medsr.engine.profiles import graph_input_shapes
    from medsr.engine.trt import open_trt_sessions
    from medsr.errors import BackendError

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    bundle = load_bundle(tiny_bundle)
    try:
        sessions = open_trt_sessions(bundle, "fp32")
    except BackendError as exc:
        pytest.skip(str(exc))
    rng = np.random.default_rng(0)
    for graph, shapes in graph_input_shapes(bundle, 4, 32, 32).items():
        session = sessions[graph]
        full = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
        last = {name: array[:3].copy() for name, array in full.items()}
        padded_by_hand = {name: np.concatenate([array, array[-1:]]) for name, array in last.items()}
        session.run(full)
        expected = session.run(padded_by_hand)
        actual = session.run(last)
        assert len(session._loaded) == 1 and len(session._executors) == 1, graph  # one plan, one engine
        for name, array in actual.items():
            assert array.shape[0] == 3
            np.testing.assert_allclose(array, expected[name][:3], rtol=1e-6, atol=1e-6, err_msg=f"{graph} {name}")
    for session in sessions.values():
        session.close()
