"""Mixed-precision ONNX graphs (medsr.engine.mixed_precision) on the default model and the tiny random-weight one:
the timestep-embedding island is what keeps fp16 and bf16 exact at t = 999, Casts sit only at island borders, the
graph's inputs and outputs stay float32, bf16 has the fp16 structure, the emulation (reduced storage, fp32
arithmetic) rounds as ONNX Runtime's Cast and where the mixed graph stores reduced tensors, and the parity gate
measures both precisions through it, widens the islands and then falls back to fp32 deterministically, recording
what it chose (TensorRT's use of them: tests/test_trt.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from medsr.bundle.load import read_manifest
from medsr.engine import mixed_precision, trt_build
from medsr.engine.compare import compare_arrays
from medsr.engine.mixed_precision import (
    BFLOAT16,
    FLOAT,
    FLOAT16,
    ISLAND_LEVELS,
    bf16_bits,
    decide_islands,
    emulate,
    islands,
    run_cpu,
    validation_feeds,
    write_mixed,
)
from medsr.engine.precision import AUTO_MARGIN_DB, AUTO_THRESHOLD_DB

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


def embedding_errors(root: Path, reduced: str, runnable) -> tuple[float, float]:
    """Max |error| against fp32, at t = 999, of the sin/cos embedding (the input of the time MLP's first Gemm) of
    the all-``reduced`` graph and of the one with the timestep-embedding island, each mixed graph run by ONNX
    Runtime as ``runnable(mixed)``."""
    model = load(root)
    island = islands(model, "timestep-embedding")
    embedding = {node.name: node for node in model.graph.node}[island[-1]].input[0]
    feeds = validation_feeds(read_manifest(root / "medsr.json"), "denoiser")[0]
    feeds["timestep"] = np.full_like(feeds["timestep"], 999.0)
    fp32 = run_cpu(probed(model, embedding), feeds)[1]
    assert np.abs(fp32).max() <= 1.0 + 1e-6
    errors = []
    for fp32_nodes in ((), (*island, "probe")):
        mixed = write_mixed(probed(model, embedding), fp32_nodes, reduced)
        errors.append(float(np.abs(run_cpu(runnable(mixed), feeds)[1] - fp32).max()))
    return errors[0], errors[1]


def test_the_island_keeps_the_timestep_embedding_exact_where_fp16_is_not(bundle_root):
    """ONNX Runtime's own fp16 run: at t = 999 the embedding of the all-fp16 graph is off by more than 0.01 (0.14
    on the default model); with the island it equals fp32 exactly."""
    model = load(bundle_root)
    island = islands(model, "timestep-embedding")
    by_name = {node.name: node for node in model.graph.node}
    assert by_name[island[-1]].op_type in ("Gemm", "MatMul")
    assert {"Sin", "Cos", "Concat"} <= {by_name[name].op_type for name in island}
    naive, kept = embedding_errors(bundle_root, "fp16", lambda mixed: mixed)
    assert naive > 0.01 and kept <= 1e-6


def test_the_island_keeps_the_emulated_embedding_exact_in_bf16_and_fp16(bundle_root):
    """Emulated, as the gate measures: at t = 999 the naive embedding is off by more than 0.05 in fp16 and 0.5 in
    bf16 (0.20 and 1.53 on the default model, 0.16 and 0.85 on the tiny one; 999 itself rounds to 1000 in bf16);
    with the island it equals fp32 in both."""
    fp16 = embedding_errors(bundle_root, "fp16", lambda mixed: emulate(mixed, "fp16"))
    bf16 = embedding_errors(bundle_root, "bf16", lambda mixed: emulate(mixed, "bf16"))
    assert bf16[0] > 0.5 and bf16[0] > fp16[0] > 0.05
    assert bf16[1] <= 1e-6 and fp16[1] <= 1e-6


def bf16_round_trip():
    """y = Cast(Cast(x, to=BFLOAT16), to=FLOAT), x float32 of any length."""
    nodes = [helper.make_node("Cast", ["x"], ["b"], to=BFLOAT16), helper.make_node("Cast", ["b"], ["y"], to=FLOAT)]
    io = [helper.make_tensor_value_info(name, FLOAT, [None]) for name in ("x", "y")]
    graph = helper.make_graph(nodes, "bf16_round_trip", io[:1], io[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bf16_rounding_is_onnx_runtimes_cast():
    """Bitwise, on random bit patterns, ties (both parities), overflow, subnormals, infinities and NaNs: nearest,
    ties to even, NaN a quiet NaN of its sign."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    ties = (random & 0xFFFF0000) | 0x8000
    special = [0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x00018000, 0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF]
    values = np.concatenate([random, ties, np.uint32(special)]).view(np.float32)
    with np.errstate(invalid="ignore"):
        cast = run_cpu(bf16_round_trip(), {"x": values})[0]
    np.testing.assert_array_equal(bf16_bits(values).astype(np.uint32) << 16, cast.view(np.uint32))


def scaled_chain():
    """y = x * 2^9 * 2^9 * 2^-9 * 2^-9 (nodes m1 to m4): exact in fp32; x * 2^18, m2's output, is past fp16's
    largest value (65504) for |x| > 0.25."""
    scales = [np.float32(2.0**9)] * 2 + [np.float32(2.0**-9)] * 2
    names = ["x", "a", "b", "c", "y"]
    nodes = [helper.make_node("Mul", [names[i], f"k{i}"], [names[i + 1]], name=f"m{i + 1}") for i in range(4)]
    initializers = [onnx.numpy_helper.from_array(np.array([k]), f"k{i}") for i, k in enumerate(scales)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", FLOAT, [4])],
        [helper.make_tensor_value_info("y", FLOAT, [4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_emulation_stores_every_reduced_tensor_where_onnx_runtimes_fp16_run_does_not():
    """ONNX Runtime's fp16 run of the chain rounds nothing (it computes in fp32 and drops the Casts between); the
    emulation rounds the input and overflows x * 2^18 to inf in fp16, not inside an fp32 island nor in bf16."""
    x = np.float32([0.1, 0.3, -1.0, 1e-3])
    fp16 = x.astype(np.float16).astype(np.float32)
    bf16 = (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)

    def emulated(fp32_nodes, reduced):
        return run_cpu(emulate(write_mixed(scaled_chain(), fp32_nodes, reduced), reduced), {"x": x})[0]

    np.testing.assert_array_equal(run_cpu(write_mixed(scaled_chain(), (), "fp16"), {"x": x})[0], x)
    overflown = np.where(np.abs(fp16) * 2.0**18 > 65504, np.copysign(np.inf, x), fp16)
    np.testing.assert_array_equal(emulated((), "fp16"), overflown)
    np.testing.assert_array_equal(emulated(("m2", "m3"), "fp16"), fp16)
    np.testing.assert_array_equal(emulated((), "bf16"), bf16)


def test_the_emulated_fp16_denoiser_agrees_with_onnx_runtimes_fp16_run(bundle_root):
    """With its timestep-embedding islands, lowest PSNR over outputs and validation inputs: the emulation and ONNX
    Runtime's own fp16 run agree to more than 65 dB (81.7 dB on the default model, 73.6 on the tiny one); rounding
    every tensor where that run keeps most in fp32, the emulation is further from fp32, by less than 12 dB (81.0 vs
    88.1 dB on the default model, 73.1 vs 77.8 on the tiny one)."""
    model = load(bundle_root)
    mixed = write_mixed(load(bundle_root), islands(model, "timestep-embedding"), "fp16")
    emulated = emulate(mixed, "fp16")
    scores = {"emulated-real": [], "real-fp32": [], "emulated-fp32": []}
    for feed in validation_feeds(read_manifest(bundle_root / "medsr.json"), "denoiser"):
        fp32, real, emu = (run_cpu(graph, feed)[0] for graph in (model, mixed, emulated))
        for key, (a, b) in zip(scores, ((emu, real), (real, fp32), (emu, fp32))):
            scores[key].append(compare_arrays(a, b)["psnr_db"])
    worst = {key: min(values) for key, values in scores.items()}
    assert worst["emulated-real"] > 65.0
    assert worst["real-fp32"] - 12.0 < worst["emulated-fp32"] < worst["real-fp32"]


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
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    island = islands(load(DEFAULT), "timestep-embedding")
    fp16 = write_mixed(load(DEFAULT), island, "fp16")
    bf16 = write_mixed(load(DEFAULT), island, "bf16")
    onnx.checker.check_model(bf16)
    onnx.checker.check_model(fp16, full_check=True)
    with pytest.raises(onnx.shape_inference.InferenceError, match="Conv.*bfloat16"):
        onnx.checker.check_model(bf16, full_check=True)
    with pytest.raises(InvalidGraph, match="bfloat16"):
        run_cpu(bf16, {})
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
    assert decision.note.startswith("emulated: fp16 storage, fp32 arithmetic, ONNX Runtime CPU")
    bf16 = decide_islands(model, "bf16", feeds)
    assert bf16.precision == "bf16" and bf16.level == "timestep-embedding" and bf16.fp32_nodes == decision.fp32_nodes
    assert AUTO_THRESHOLD_DB + AUTO_MARGIN_DB <= bf16.parity_db["timestep-embedding"] < first
    assert bf16.note.startswith("emulated: bf16 storage, fp32 arithmetic, ONNX Runtime CPU")


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


def test_a_decision_by_an_older_method_is_made_again(tmp_path, monkeypatch):
    """A kept decision records the recipe it was made under (builder settings, the island-deciding method, the medsr
    version); when the method changes, the next build decides again instead of reusing its figures."""
    graph = DEFAULT / "denoiser.onnx"
    _, report = trt_build.mixed_graph(graph, "fp16", tmp_path)
    assert report["recipe"] == trt_build.recipe_id("fp16")
    monkeypatch.setattr(trt_build, "DECISION_METHOD", "a-later-method")
    decided = []
    decide = trt_build.decide_islands
    monkeypatch.setattr(trt_build, "decide_islands", lambda *a: decided.append(1) or decide(*a))
    _, again = trt_build.mixed_graph(graph, "fp16", tmp_path)
    assert decided == [1] and again["recipe"] == trt_build.recipe_id("fp16") != report["recipe"]
    monkeypatch.setattr(trt_build, "__version__", "99.0")
    assert trt_build.recipe_id("fp16") != again["recipe"]  # a new medsr version rebuilds plans and decisions too
