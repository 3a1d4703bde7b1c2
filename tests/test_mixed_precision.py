"""Mixed-precision ONNX graphs (medsr.engine.mixed_precision) on the default model and the tiny random-weight one:
the timestep-embedding island is what keeps fp16 exact at t = 999, Casts sit only at island borders, the graph's
inputs and outputs stay float32, bf16 has the fp16 structure, and the parity gate widens the islands and then
falls back to fp32 deterministically, recording what it chose (TensorRT's use of them: tests/test_trt.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from medsr.bundle.load import read_manifest
from medsr.engine import mixed_precision, trt_build
from medsr.engine.mixed_precision import (
    BFLOAT16,
    FLOAT,
    FLOAT16,
    ISLAND_LEVELS,
    decide_islands,
    islands,
    run_cpu,
    validation_feeds,
    write_mixed,
)
from medsr.engine.precision import AUTO_MARGIN_DB

DEFAULT = Path(__file__).resolve().parents[1] / "medsr" / "models" / "default"


@pytest.fixture(params=["default", "tiny"])
def bundle_root(request) -> Path:
    return DEFAULT if request.param == "default" else request.getfixturevalue("tiny_bundle")


def load(root: Path, graph: str = "denoiser"):
    return onnx.load(str(root / f"{graph}.onnx"))


def probed(model, tensor: str):
    """``model`` with ``tensor`` also a graph output (``probe``, through an Identity node named ``probe``)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.node.append(helper.make_node("Identity", [tensor], ["probe"], name="probe"))
    model.graph.output.append(helper.make_tensor_value_info("probe", FLOAT, None))
    return model


def test_the_island_keeps_the_timestep_embedding_exact_where_fp16_is_not(bundle_root):
    """At t = 999 the sin/cos embedding (the input of the time MLP's first Gemm) of the all-fp16 graph is off by
    more than 0.01 (0.14 on the default model); with the island it equals fp32 exactly."""
    model = load(bundle_root)
    island = islands(model, "timestep-embedding")
    by_name = {node.name: node for node in model.graph.node}
    assert by_name[island[-1]].op_type in ("Gemm", "MatMul")
    assert {"Sin", "Cos", "Concat"} <= {by_name[name].op_type for name in island}
    embedding = by_name[island[-1]].input[0]
    feeds = validation_feeds(read_manifest(bundle_root / "medsr.json"), "denoiser")[0]
    feeds["timestep"] = np.full_like(feeds["timestep"], 999.0)
    fp32 = run_cpu(probed(model, embedding), feeds)[1]
    naive = run_cpu(write_mixed(probed(model, embedding), (), "fp16"), feeds)[1]
    mixed = run_cpu(write_mixed(probed(model, embedding), (*island, "probe"), "fp16"), feeds)[1]
    assert np.abs(fp32).max() <= 1.0 + 1e-6
    assert np.abs(naive - fp32).max() > 0.01
    np.testing.assert_allclose(mixed, fp32, rtol=0, atol=1e-6)


def _types(model) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    return types | {t.name: t.data_type for t in graph.initializer}


@pytest.mark.parametrize("graph", ["denoiser", "vae_decoder"])
def test_casts_only_at_island_borders_and_float32_io(graph):
    model = load(DEFAULT, graph)
    island = set(islands(model, "normalization"))
    original = {node.name for node in model.graph.node}
    mixed = write_mixed(load(DEFAULT, graph), island, "fp16")
    producer = {out: node.name for node in mixed.graph.node for out in node.output}
    consumers: dict[str, set[str]] = {}
    for node in mixed.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.name)
    inputs, outputs = {i.name for i in mixed.graph.input}, {o.name for o in mixed.graph.output}
    added = [node for node in mixed.graph.node if node.name not in original]
    assert added and all(node.op_type == "Cast" for node in added)
    for cast in added:
        source, target = cast.input[0], cast.output[0]
        if source in inputs or target in outputs:
            continue
        sides = {producer[source] in island} | {name in island for name in consumers[target]}
        assert sides == {True, False}, cast.name  # one side an island node, the other a reduced one
    types = _types(mixed)
    assert all(types[name] == FLOAT for name in inputs | outputs)
    for node in mixed.graph.node:
        if node.name in original and node.name in island:
            assert all(types.get(name) != FLOAT16 for name in node.input if name)  # fp32 inside, no casts
        elif node.name in original:
            assert all(types.get(name) != FLOAT for name in node.output)
    assert sum(types.get(out) == FLOAT16 for node in mixed.graph.node for out in node.output) > 20


def test_bf16_has_the_structure_of_fp16():
    """Valid for onnx.checker; its full check (operator type constraints) refuses it, as ONNX Runtime does: opset
    17's Conv takes no bfloat16 (opset 22's does). TensorRT's parser reads the types without that check."""
    island = islands(load(DEFAULT), "timestep-embedding")
    fp16 = write_mixed(load(DEFAULT), island, "fp16")
    bf16 = write_mixed(load(DEFAULT), island, "bf16")
    onnx.checker.check_model(bf16)
    onnx.checker.check_model(fp16, full_check=True)
    with pytest.raises(onnx.shape_inference.InferenceError, match="Conv.*bfloat16"):
        onnx.checker.check_model(bf16, full_check=True)
    structure = [(n.op_type, n.name.replace(".bf16", ".fp16")) for n in bf16.graph.node]
    assert structure == [(n.op_type, n.name) for n in fp16.graph.node]
    swap = {FLOAT16: BFLOAT16}
    fp16_types, bf16_types = _types(fp16), _types(bf16)
    assert {swap.get(t, t) for t in fp16_types.values()} == set(bf16_types.values())
    assert all(bf16_types[name.replace(".fp16", ".bf16")] == swap.get(t, t) for name, t in fp16_types.items())


def test_the_gate_keeps_the_embedding_island_then_widens_and_falls_back_deterministically():
    model, manifest = load(DEFAULT), read_manifest(DEFAULT / "medsr.json")
    feeds = validation_feeds(manifest, "denoiser")
    assert [f["timestep"].tolist() for f in feeds] == [[999.0], [999.0, 0.0]]
    decision = decide_islands(model, "fp16", feeds)
    assert decision.precision == "fp16" and decision.level == "timestep-embedding"
    assert decision.fp32_nodes == islands(model, "timestep-embedding") and "ONNX Runtime CPU" in decision.note
    first = decision.parity_db["timestep-embedding"]
    tight = decide_islands(model, "fp16", feeds, threshold_db=first - AUTO_MARGIN_DB + 1e-3)
    assert next(iter(tight.parity_db)) == "timestep-embedding" and tight.level != "timestep-embedding"
    never = [decide_islands(model, "fp16", feeds, threshold_db=500.0) for _ in range(2)]
    assert never[0] == never[1] and never[0].precision == "fp32" and never[0].fp32_nodes == ()
    assert list(never[0].parity_db) == list(ISLAND_LEVELS)
    bf16 = decide_islands(model, "bf16", feeds)
    assert bf16.precision == "bf16" and bf16.level == "timestep-embedding" and bf16.parity_db == {}
    assert bf16.note.startswith("not measured: ONNX Runtime CPU cannot run the bf16 graph")


def test_the_decision_is_kept_beside_the_plans_and_reused(tmp_path, monkeypatch):
    graph = DEFAULT / "denoiser.onnx"
    path, report = trt_build.mixed_graph(graph, "fp16", tmp_path)
    assert path == trt_build.mixed_paths(tmp_path, graph, "fp16")[0] and path.is_file()
    assert report["precision"] == "fp16" and report["fp32_nodes"] == list(islands(load(DEFAULT), ISLAND_LEVELS[0]))
    monkeypatch.setattr(trt_build, "decide_islands", lambda *a: pytest.fail("decided again"))
    assert trt_build.mixed_graph(graph, "fp16", tmp_path) == (path, report)
    shown = trt_build.precision_report(tmp_path, graph, "fp16")
    assert shown == {key: report[key] for key in ("precision", "level", "fp32_nodes", "parity_db", "note")}
    assert trt_build.precision_report(tmp_path, graph, "fp32")["fp32_nodes"] == []
    assert mixed_precision.IslandDecision(**{k: shown[k] for k in shown}).to_dict() == shown
