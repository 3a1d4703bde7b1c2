"""TensorRT without a GPU: plan cache keys and stale plans, the engine cache, profile choice, builder recipes and
``auto``, the TensorRT versions and the precisions each builds, CUDA-graph replay and capture failures, the CUDA
runtime wrapper, and the errors when TensorRT, a GPU or a driver is missing (fakes of tests/trt_fakes.py stand in
for tensorrt and CUDA; each fake tensorrt has exactly the names of one real version, tests/test_trt_api_surface.py)."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fresh_python import run_python
from trt_fakes import TRT10, TRT11, FakeCuda, FakeCudart, fake_bundle, fake_tensorrt

import medsr.engine.precision as precision_module
import medsr.engine.trt as trt_module
from medsr.engine import trt_build
from medsr.engine.cuda import CudaRuntime, GpuInfo
from medsr.engine.mixed_precision import ISLAND_LEVELS
from medsr.engine.precision import PRECISIONS
from medsr.engine.profiles import ShapeProfile, choose_profile, graph_input_shapes, static_profiles
from medsr.engine.trt import PlanCache, PlanKey, TrtSession, open_trt_sessions
from medsr.engine.trt_build import (
    RECIPES,
    build_plan,
    mixed_paths,
    pin_fp32_layers,
    precision_plan,
    precision_report,
    recipe_id,
    trt_features,
    trt_name,
)
from medsr.errors import BackendError, ShapeError

#: The default model's denoiser, whose manifest (validation inputs) lies beside it.
DEFAULT_DENOISER = Path(__file__).resolve().parents[1] / "medsr" / "models" / "default" / "denoiser.onnx"
KEY = PlanKey(
    "denoiser", "ab" * 32, "fp16", recipe_id("fp16"), "1x3x64x64_1x3x16x16_1", "10.8.0", "NVIDIA H100 80GB HBM3", "9.0"
)


def range_profile(bundle, batches, sizes, graph="denoiser") -> ShapeProfile:
    """A dynamic profile of ``graph`` from (min, opt, max) batches and (min, opt, max) LR (height, width) sizes."""
    corners = [graph_input_shapes(bundle, b, h, w)[graph] for b, (h, w) in zip(batches, sizes)]
    return ShapeProfile(graph, tuple((name, tuple(corner[name] for corner in corners)) for name in corners[0]))


def make_session(tmp_path, cuda=None, trt=None, build=True, profiles=(), builds=None):
    cuda = cuda or FakeCuda()
    trt = trt or fake_tensorrt(cuda)
    bundle = fake_bundle(tmp_path)
    builds = [] if builds is None else builds

    def builder(path, profile, precision):
        builds.append((path.name, profile.tag, precision))
        return b"plan:denoiser"

    session = TrtSession(
        "denoiser",
        bundle.graphs["denoiser"],
        "fp16",
        PlanCache(tmp_path / "engines"),
        trt,
        cuda,
        cuda.gpu(),
        profiles,
        build,
        builder,
    )
    return session, builds


def denoiser_feeds(batch=1, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 3, 64, 64), dtype=np.float32),
        "lr_latent": rng.standard_normal((batch, 3, 16, 16), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
    }


# --- plan cache ---------------------------------------------------------------------------------------------------


def test_plan_cache_hit_miss_and_round_trip(tmp_path):
    cache = PlanCache(tmp_path)
    assert cache.lookup(KEY) == (None, None)
    cache.store(KEY, b"plan:denoiser")
    assert cache.lookup(KEY) == (b"plan:denoiser", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY.stem}.json", f"{KEY.stem}.plan"]


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("tensorrt_version", "10.3.0", "TensorRT version: plan 10.3.0, here 10.8.0"),  # TensorRT upgraded
        ("gpu_name", "NVIDIA A100-SXM4-80GB", "GPU: plan NVIDIA A100-SXM4-80GB"),  # plan copied from another card
        ("compute_capability", "8.0", "compute capability: plan 8.0, here 9.0"),
        ("graph_sha256", "cd" * 32, "graph sha256"),  # bundle re-exported, old plan left behind
        ("recipe", "0" * 12, "build recipe: plan 000000000000"),  # medsr changed how it builds this precision
    ],
)
def test_stale_plan_names_the_mismatch(tmp_path, field, value, named):
    cache = PlanCache(tmp_path)
    cache.store(replace(KEY, **{field: value}), b"plan:x")
    plan, reason = cache.lookup(KEY)
    assert plan is None and named in reason


def test_corrupt_plan_or_missing_key_file_is_stale(tmp_path):
    cache = PlanCache(tmp_path)
    plan_path, meta_path = cache.store(KEY, b"plan:denoiser"), cache.paths(KEY)[1]
    plan_path.write_bytes(b"plan:denoiser-truncated")
    assert "does not match its recorded sha256" in cache.lookup(KEY)[1]
    meta_path.unlink()
    assert "key file" in cache.lookup(KEY)[1]


def test_stale_plan_is_rebuilt_with_a_warning_never_reused(tmp_path):
    session, builds = make_session(tmp_path)
    profile = ShapeProfile("denoiser", (("sample", ((1, 3, 64, 64),) * 3),))
    stale = replace(session.key(profile), tensorrt_version="10.0.1")
    session.cache.store(stale, b"plan:old")
    with pytest.warns(UserWarning, match="stale TensorRT plan rebuilt.*TensorRT version: plan 10.0.1"):
        assert session.plan(profile) == b"plan:denoiser"
    assert len(builds) == 1
    assert session.cache.lookup(session.key(profile)) == (b"plan:denoiser", None)


def test_stale_plan_is_refused_when_building_is_off(tmp_path):
    session, builds = make_session(tmp_path, build=False)
    profile = ShapeProfile("denoiser", (("sample", ((1, 3, 64, 64),) * 3),))
    session.cache.store(replace(session.key(profile), gpu_name="Tesla T4"), b"plan:old")
    with pytest.raises(BackendError, match="stale TensorRT plan refused.*GPU: plan Tesla T4"):
        session.plan(profile)
    assert builds == []


# --- shape profiles ----------------------------------------------------------------------------------------------


def test_graph_input_shapes_follow_the_bundle(tmp_path):
    shapes = graph_input_shapes(fake_bundle(tmp_path), batch=2, lr_height=60, lr_width=64)  # 60 pads to 64
    assert shapes == {
        "vae_encoder": {"image": (2, 3, 64, 64)},
        "vae_decoder": {"latent": (2, 3, 64, 64)},
        "denoiser": {"sample": (2, 3, 64, 64), "lr_latent": (2, 3, 16, 16), "timestep": (2,)},
    }
    with pytest.raises(ShapeError):
        graph_input_shapes(fake_bundle(tmp_path), batch=0, lr_height=64, lr_width=64)


def test_choose_profile_prefers_exact_static_then_narrowest_range(tmp_path):
    bundle = fake_bundle(tmp_path)
    static = static_profiles(bundle, 1, 64, 64)["denoiser"]
    wide = range_profile(bundle, (1, 4, 8), ((32, 32), (64, 64), (128, 128)))
    narrow = range_profile(bundle, (1, 2, 4), ((64, 64), (64, 64), (64, 64)))
    assert static.static and not wide.static and "-" in wide.tag
    shapes_1 = graph_input_shapes(bundle, 1, 64, 64)["denoiser"]
    shapes_2 = graph_input_shapes(bundle, 2, 64, 64)["denoiser"]
    shapes_big = graph_input_shapes(bundle, 2, 96, 128)["denoiser"]
    assert choose_profile([wide, narrow, static], shapes_1) is static
    assert choose_profile([wide, narrow, static], shapes_2) is narrow
    assert choose_profile([wide, narrow, static], shapes_big) is wide
    assert choose_profile([narrow, static], graph_input_shapes(bundle, 16, 64, 64)["denoiser"]) is None


# --- running: executors, CUDA graphs, cache reuse ----------------------------------------------------------------


def test_session_builds_once_per_shape_and_replays_a_cuda_graph(tmp_path):
    cuda = FakeCuda()
    session, builds = make_session(tmp_path, cuda=cuda)
    for seed in range(3):  # first run enqueues and captures; later runs replay the graph with new inputs
        feeds = denoiser_feeds(seed=seed)
        out = session.run(feeds)["model_output"]
        np.testing.assert_allclose(out, 2 * feeds["sample"] + feeds["lr_latent"].mean(), rtol=1e-6)
    assert len(builds) == 1 and cuda.launches == 2  # the capturing run's result is its eager run's
    session.run(denoiser_feeds(batch=2))  # a new shape: its own static plan
    assert [b[1].split("_")[0] for b in builds] == ["1x3x64x64", "2x3x64x64"]
    session.close()
    assert cuda.memory == {} and cuda.graphs == {}


def test_a_new_session_reuses_the_cached_plan(tmp_path):
    first, builds = make_session(tmp_path)
    first.run(denoiser_feeds())
    second, _ = make_session(tmp_path, builds=builds)
    second.run(denoiser_feeds())
    assert len(builds) == 1


def test_a_plan_build_says_it_takes_minutes_and_where_it_is_cached(tmp_path, caplog):
    """A first TensorRT build takes minutes: it is announced (graph, precision, shapes, GPU, cache folder) and
    timed; a cached plan is loaded without a word."""
    caplog.set_level(logging.INFO, logger="medsr.engine.trt")
    first, builds = make_session(tmp_path)
    first.run(denoiser_feeds())
    (building, built) = [record.getMessage() for record in caplog.records if record.name == "medsr.engine.trt"]
    assert building.startswith("building the TensorRT plan of denoiser (fp16, shapes 1x3x64x64")
    assert (
        "for NVIDIA H100 80GB HBM3: this can take minutes, once per GPU model, TensorRT version and shapes (cached in "
        in building
    )
    assert str(first.cache.root) in building and re.fullmatch(r"built the TensorRT plan of denoiser in \d+ s", built)
    caplog.clear()
    second, _ = make_session(tmp_path, builds=builds)
    second.run(denoiser_feeds())
    assert len(builds) == 1 and not [r for r in caplog.records if r.name == "medsr.engine.trt"]


def test_dynamic_profile_runs_without_cuda_graph(tmp_path):
    """Two shapes of one dynamic plan: two execution contexts of one deserialized engine, not two engines."""
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    profile = range_profile(fake_bundle(tmp_path), (1, 2, 4), ((64, 64),) * 3)
    session, builds = make_session(tmp_path, cuda=cuda, trt=trt, profiles=[profile])
    for batch in (1, 3):
        session.run(denoiser_feeds(batch=batch))
    assert len(builds) == 1 and cuda.launches == 0
    assert len(session._executors) == 2 and len(trt._engines) == 1
    executors = list(session._executors.values())
    assert executors[0].engine is executors[1].engine and executors[0].context is not executors[1].context


def test_a_smaller_batch_runs_padded_on_the_plan_of_the_full_batch(tmp_path):
    """Batches 4 then 3 (a volume's last batch): one plan, one engine, one executor and its CUDA graph; the last
    item is repeated to fill the batch and the outputs are cropped, equal to the unpadded run of the same items."""
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    session, builds = make_session(tmp_path / "padded", cuda=cuda, trt=trt)
    full, last = denoiser_feeds(batch=4, seed=1), denoiser_feeds(batch=3, seed=2)
    session.run(full)
    out = session.run(last)["model_output"]
    assert [b[1].split("_")[0] for b in builds] == ["4x3x64x64"] and len(trt._engines) == 1
    assert len(session._executors) == 1 and out.shape == (3, 3, 64, 64)
    unpadded, unpadded_builds = make_session(tmp_path / "unpadded")
    unpadded.pad_batch = False
    unpadded.run(full)
    np.testing.assert_array_equal(out, unpadded.run(last)["model_output"])
    assert [b[1].split("_")[0] for b in unpadded_builds] == ["4x3x64x64", "3x3x64x64"]
    session.run(denoiser_feeds(batch=8))  # larger than every plan: a plan of its own, never split
    assert [b[1].split("_")[0] for b in builds] == ["4x3x64x64", "8x3x64x64"]
    session.run(denoiser_feeds(batch=5))  # the smallest larger plan
    assert len(builds) == 2 and len(session._executors) == 2


def test_a_small_first_batch_pads_to_a_cached_plan(tmp_path):
    """A new session whose first batch is small (a 2D image, a short volume) pads to the static plan of the same
    plane size already in the cache (an earlier run's, or medsr-export --trt-precision's), not another build."""
    first, builds = make_session(tmp_path)
    first.run(denoiser_feeds(batch=4))
    (tmp_path / "engines" / "denoiser-fp16-junk.plan").write_bytes(b"not a plan")  # ignored: no shapes in its name
    second, _ = make_session(tmp_path, builds=builds)
    feeds = denoiser_feeds(batch=1, seed=3)
    out = second.run(feeds)["model_output"]
    assert len(builds) == 1 and out.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(out, 2 * feeds["sample"] + feeds["lr_latent"].mean(), rtol=1e-6)
    other_size = denoiser_feeds(batch=1)
    other_size["sample"] = np.zeros((1, 3, 32, 32), np.float32)
    other_size["lr_latent"] = np.zeros((1, 3, 8, 8), np.float32)
    second.run(other_size)  # another plane size: its own plan
    assert [b[1].split("_")[0] for b in builds] == ["4x3x64x64", "1x3x32x32"]
    third, _ = make_session(tmp_path, builds=builds)
    third.run(other_size)  # its own plan is in the cache now: used as it is, not padded to another
    assert len(builds) == 2 and list(third._executors) == [tuple(other_size[n].shape for n in third.input_names)]


def test_a_volume_builds_one_plan_per_graph_and_padding_changes_nothing(tiny_bundle, tmp_path, monkeypatch):
    """7 planes at batch 3 (3 + 3 + 1) through the pipeline on TensorRT: exactly one plan per graph (and one
    engine each), and the SR volume equals that of the run that builds a plan for the last batch."""
    from medsr.bundle import load_bundle
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
    from medsr.engine.volume import NetworkInput, super_resolve_volume
    from medsr.io.normalize import IntensityWindow

    bundle = load_bundle(tiny_bundle)
    data = np.random.default_rng(0).uniform(0, 100, (16, 16, 7)).astype(np.float32)
    prepared = NetworkInput(tmp_path / "in.nii", data, IntensityWindow(0.0, 100.0), display=False)

    def run(pad: bool):
        monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / f"cache-{pad}"))
        cuda = FakeCuda()
        trt = fake_tensorrt(cuda)
        sessions = open_trt_sessions(bundle, "fp32", trt=trt, cuda=cuda, pad_batch=pad)
        builds = []
        for graph, session in sessions.items():
            session.builder = lambda path, profile, precision, g=graph: builds.append(g) or f"plan:{g}".encode()
        options = SamplingOptions(steps=2, batch_size=3, seed=5)
        result = super_resolve_volume(prepared, np.eye(4), LatentSRPipeline(bundle, sessions), 2, options)
        return result, builds, trt

    padded, builds, trt = run(True)
    assert sorted(builds) == sorted(bundle.graphs) and len(trt._engines) == len(bundle.graphs)
    unpadded, unpadded_builds, _ = run(False)
    assert len(unpadded_builds) == 2 * len(bundle.graphs)
    assert padded.data.shape == (64, 64, 7) and np.isfinite(padded.data).all()
    np.testing.assert_array_equal(padded.data, unpadded.data)
    np.testing.assert_array_equal(padded.residuals, unpadded.residuals)


def test_missing_input_is_a_shape_error(tmp_path):
    session, _ = make_session(tmp_path)
    with pytest.raises(ShapeError, match="missing input"):
        session.run({"sample": np.zeros((1, 3, 64, 64), np.float32)})


def test_open_trt_sessions_shares_the_engine_cache_and_checks_precision(tmp_path, monkeypatch):
    from medsr.bundle.cache import manifest_digest

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    cuda = FakeCuda()
    bundle = fake_bundle(tmp_path / "bundle")
    sessions = open_trt_sessions(
        bundle, {"vae_encoder": "fp32", "vae_decoder": "fp32", "denoiser": "fp16"}, trt=fake_tensorrt(cuda), cuda=cuda
    )
    assert sessions["denoiser"].providers == (f"TensorRT-{TRT10}-fp16",)
    plans = (
        tmp_path / "cache" / "engines" / manifest_digest(bundle) / f"tensorrt-{TRT10}" / "NVIDIA_H100_80GB_HBM3-sm9.0"
    )
    assert sessions["vae_decoder"].cache.root == plans and sessions["denoiser"].cache is sessions["vae_decoder"].cache
    timings = tmp_path / "cache" / "runtimes" / f"tensorrt-{TRT10}" / "NVIDIA_H100_80GB_HBM3-sm9.0" / "timing.cache"
    assert sessions["denoiser"].timing_cache == timings
    sessions["denoiser"].builder = lambda path, profile, precision: b"plan:denoiser"
    sessions["denoiser"].run(denoiser_feeds())
    stem = "denoiser-fp16-1x3x64x64_1x3x16x16_1"
    assert sorted(p.name for p in plans.iterdir()) == [f"{stem}.json", f"{stem}.plan"]
    assert not any((tmp_path / "bundle").rglob("*.plan"))
    with pytest.raises(BackendError, match="precision must be one of"):
        open_trt_sessions(bundle, "int4", trt=fake_tensorrt(cuda), cuda=cuda)


def test_an_unwritable_cache_runs_uncached_with_one_warning(tmp_path, monkeypatch):
    """A cache path that cannot be a folder (fails even for root): the plans are built in memory and run, with a
    single warning naming the folder and MEDSR_CACHE, instead of a PermissionError/NotADirectoryError."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MEDSR_CACHE", str(blocker))
    cuda = FakeCuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sessions = open_trt_sessions(fake_bundle(tmp_path / "bundle"), "fp16", trt=fake_tensorrt(cuda), cuda=cuda)
        builds = []
        sessions["denoiser"].builder = lambda path, profile, precision: builds.append(profile) or b"plan:denoiser"
        feeds = denoiser_feeds()
        out = sessions["denoiser"].run(feeds)["model_output"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "TensorRT plan cache disabled" in messages[0] and "MEDSR_CACHE" in messages[0]
    assert "a-file" in messages[0]
    np.testing.assert_allclose(out, 2 * feeds["sample"] + feeds["lr_latent"].mean(), rtol=1e-6)
    assert len(builds) == 1 and sessions["denoiser"].cache.root is None and sessions["denoiser"].timing_cache is None
    assert blocker.read_text() == "not a folder"


def test_auto_keeps_fp16_only_where_the_end_to_end_probe_passes(tmp_path, monkeypatch):
    """``auto`` on TensorRT goes through the engine's one precision policy (medsr.engine.precision): here the probe
    output moves by 1e-4 per fp16 graph (74 dB: passes) and by 0.01 when the decoder runs fp16 (40 dB: below 40 + 3),
    so the decoder stays fp32 and the rest is fp16."""
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))

    def probe(bundle, sessions):
        reduced = [graph for graph, session in sessions.items() if session.precision == "fp16"]
        return np.linspace(0, 1, 64) + 1e-4 * len(reduced) + (0.01 if "vae_decoder" in reduced else 0.0)

    monkeypatch.setattr(precision_module, "probe_output", probe)
    cuda = FakeCuda()
    sessions = open_trt_sessions(fake_bundle(tmp_path / "bundle"), "auto", trt=fake_tensorrt(cuda), cuda=cuda)
    chosen = {graph: session.precision for graph, session in sessions.items()}
    assert chosen == {"denoiser": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp16"}
    assert sessions["denoiser"].providers == (f"TensorRT-{TRT10}-fp16 (auto: 74.0 dB vs fp32 on the probe)",)
    mixed = {"denoiser": "auto", "vae_encoder": "fp32", "vae_decoder": "fp32"}
    with pytest.raises(BackendError, match="auto applies to every graph or none"):
        open_trt_sessions(fake_bundle(tmp_path / "bundle"), mixed, trt=fake_tensorrt(cuda), cuda=cuda)


# --- precision policy --------------------------------------------------------------------------------------------


def test_precision_plans():
    assert precision_plan("fp32").clear_flags == ("TF32",)
    assert precision_plan("fp16").weak_flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert precision_plan("fp16").island_levels == ISLAND_LEVELS and precision_plan("bf16").reduced == "bf16"
    assert precision_plan("fp16-all").island_levels == () and precision_plan("fp16-all").weak_flags == ("FP16",)
    with pytest.raises(BackendError, match="must be one of"):
        precision_plan("int8")
    assert (*RECIPES, "auto") == PRECISIONS["trt"]  # one list: every precision but auto has a builder recipe
    assert len({recipe_id(p) for p in RECIPES}) == len(RECIPES)


def fake_network(version=TRT10):
    """The fake network of a fake build on ``version`` and its layers (FAKE_LAYERS)."""
    trt = fake_tensorrt(version=version)
    network = trt.Builder(trt.Logger(trt.Logger.WARNING)).create_network(0)
    return trt, network, [network.get_layer(i) for i in range(network.num_layers)]


def test_the_timestep_embedding_layers_are_pinned_not_the_norms():
    """Layers are the islands' by node name or by the tensor they write (a constant layer of the frequencies)."""
    trt, network, layers = fake_network()
    nodes = ("/unet/time_proj/Mul", "/unet/time_proj/Sin")
    tensors = ("/unet/time_proj/Constant_1_output_0", "/unet/time_proj/Mul_output_0")
    assert pin_fp32_layers(trt, network, nodes, tensors) == [
        "constant_17",
        "/unet/time_proj/Mul",
        "/unet/time_proj/Sin",
    ]
    assert [layer._state["precision"] for layer in layers] == [trt.float32] * 3 + [None, None]
    assert layers[2]._state["output_types"] == {0: trt.float32, 1: trt.float32}
    assert pin_fp32_layers(trt, network, ()) == []


def test_the_fake_of_tensorrt_11_has_no_weak_typing():
    """As in the real 11.x bindings: no fp16/bf16 builder flags, no per-layer precision (so pinning would fail)."""
    trt, network, layers = fake_network(TRT11)
    for missing in ("FP16", "BF16", "OBEY_PRECISION_CONSTRAINTS"):
        assert not hasattr(trt.BuilderFlag, missing)
    assert hasattr(trt.BuilderFlag, "TF32") and not hasattr(layers[1], "precision")
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    with pytest.raises(AttributeError):
        layers[1].set_output_type(0, trt.float32)
    with pytest.raises(AttributeError, match="ILayer"):
        pin_fp32_layers(trt, network, ("/unet/time_proj/Mul",))


@pytest.mark.parametrize(
    "version, ok",
    [
        ("9.3.0", False),
        ("10.7.0", False),
        ("10.8.0.43", True),
        ("10.16.1.11", True),
        ("11.4.0.106", True),
        ("12.0", False),
    ],
)
def test_supported_tensorrt_versions(version, ok):
    if ok:
        assert trt_features(version).version == version
        return
    with pytest.raises(BackendError) as caught:
        trt_features(version)
    message = str(caught.value)
    assert "\n" not in message and version in message and "10.8 to 11.x" in message
    assert "pip install 'tensorrt>=10.8,<12'" in message


def test_each_version_builds_every_precision():
    assert trt_features(TRT10).precisions == tuple(RECIPES) and trt_features(TRT10).weak_typing
    assert trt_features(TRT11).precisions == tuple(RECIPES) and not trt_features(TRT11).weak_typing
    assert set(trt_features(TRT11).api_names) < set(trt_features(TRT10).api_names)


def test_a_missing_tensorrt_name_is_one_line_naming_the_version():
    trt = fake_tensorrt(version=TRT11)
    assert trt_name(trt, "BuilderFlag.TF32") == "TF32"
    with pytest.raises(BackendError) as caught:
        trt_name(trt, "BuilderFlag.FP16")
    message = str(caught.value)
    assert message == f"TensorRT {TRT11} has no BuilderFlag.FP16: pip install 'tensorrt>=10.8,<12'"


def test_import_tensorrt_refuses_an_unsupported_version(monkeypatch):
    import sys

    from medsr.engine.trt import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0"))
    with pytest.raises(BackendError, match=r"supports TensorRT 10.8 to 11.x, found 10.3.0: pip install"):
        import_tensorrt()
    real_like = fake_tensorrt(version=TRT11)
    monkeypatch.setitem(sys.modules, "tensorrt", real_like)
    assert import_tensorrt() is real_like


@pytest.mark.parametrize(
    "version, precision, flags, cleared, pinned, strong",
    [
        (TRT10, "fp16", ["FP16", "OBEY_PRECISION_CONSTRAINTS"], [], 3, False),  # the timestep embedding only
        (TRT10, "fp16-all", ["FP16"], [], 0, False),
        (TRT10, "bf16", ["BF16", "OBEY_PRECISION_CONSTRAINTS"], [], 3, False),
        (TRT10, "fp32", [], ["TF32"], 0, False),
        (TRT11, "fp32", [], ["TF32"], 0, False),
        (TRT11, "tf32", ["TF32"], [], 0, False),
        (TRT11, "fp16", [], [], 0, True),
        (TRT11, "bf16", [], [], 0, True),
        (TRT11, "fp16-all", [], [], 0, True),
    ],
)
def test_build_plan_sets_flags_profile_and_timing_cache(tmp_path, version, precision, flags, cleared, pinned, strong):
    """10.x: weak typing, the fp32 graph parsed and the islands' layers pinned; 11.x: the mixed graph parsed into a
    STRONGLY_TYPED network, no weak-typing name touched (the fake has none). The decision is kept beside the plans."""
    trt = fake_tensorrt(version=version)
    profile = static_profiles(fake_bundle(tmp_path), 1, 64, 64)["denoiser"]
    cache = tmp_path / "engines" / "timing.cache"
    mixed_dir = tmp_path / "plans"
    plan = build_plan(
        trt, DEFAULT_DENOISER, profile, precision, timing_cache=cache, workspace_bytes=1 << 30, mixed_dir=mixed_dir
    )
    assert plan == b"plan:denoiser"
    (build,) = trt._builds
    assert build["flags"] == flags and build["cleared"] == cleared
    assert build["network_flags"] == (1 << 1 if strong else 0)
    assert build["parsed"] == str(
        mixed_paths(mixed_dir, DEFAULT_DENOISER, precision)[0] if strong else DEFAULT_DENOISER
    )
    assert build["pool"] == (trt.MemoryPoolType.WORKSPACE, 1 << 30)
    assert sum(layer._state["precision"] is not None for layer in build["layers"]) == pinned
    assert build["cache_in"] == [b""] and cache.read_bytes() == b"timings" and build["profiles"] == 1
    assert build["shapes"][0] == ("sample", (1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64))
    report = precision_report(mixed_dir, DEFAULT_DENOISER, precision)
    if precision in ("fp16", "bf16"):
        assert report["precision"] == precision and report["level"] == "timestep-embedding"
        assert "/unet/time_proj/Sin" in report["fp32_nodes"]
    trt.OnnxParser.errors = ("Unsupported operator GridSample",)
    with pytest.raises(BackendError, match="could not parse denoiser.*onnx: Unsupported operator GridSample"):
        build_plan(trt, DEFAULT_DENOISER, profile, precision, mixed_dir=mixed_dir)
    trt.OnnxParser.errors = ()


def test_a_graph_that_fails_every_island_builds_as_fp32(tmp_path, monkeypatch):
    """The gate's fp32 fallback (a threshold nothing reaches): no reduced flag, TF32 cleared, the fp32 graph parsed
    weakly typed on both versions, and the report says fp32 with every level measured."""
    from medsr.engine import mixed_precision

    real = mixed_precision.decide_islands
    monkeypatch.setattr(trt_build, "decide_islands", lambda *a: real(*a, threshold_db=500.0))
    profile = static_profiles(fake_bundle(tmp_path), 1, 64, 64)["denoiser"]
    for version in (TRT10, TRT11):
        trt = fake_tensorrt(version=version)
        build_plan(trt, DEFAULT_DENOISER, profile, "fp16", mixed_dir=tmp_path / version)
        (build,) = trt._builds
        assert build["flags"] == [] and build["cleared"] == ["TF32"] and build["network_flags"] == 0
        assert build["parsed"] == str(DEFAULT_DENOISER)
        report = precision_report(tmp_path / version, DEFAULT_DENOISER, "fp16")
        assert report["precision"] == "fp32" and report["fp32_nodes"] == [] and len(report["parity_db"]) == 3


def test_a_refused_timing_cache_is_replaced_with_a_warning(tmp_path):
    """set_timing_cache returns False for a cache from another GPU or TensorRT: build with a new cache (one warning)
    and write it over the old file; a new cache refused too builds without one and leaves the file alone."""
    profile = static_profiles(fake_bundle(tmp_path), 1, 64, 64)["denoiser"]
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    trt = fake_tensorrt(refuse_timing_cache=1)
    with pytest.warns(UserWarning, match="refused the timing cache .*timing.cache.*building with a new one"):
        build_plan(trt, tmp_path / "denoiser.onnx", profile, "fp32", timing_cache=cache)
    assert trt._builds[0]["cache_in"] == [b"from another GPU", b""] and cache.read_bytes() == b"timings"
    cache.write_bytes(b"from another GPU")
    trt = fake_tensorrt(refuse_timing_cache=2)
    with pytest.warns(UserWarning) as caught:
        assert build_plan(trt, tmp_path / "denoiser.onnx", profile, "fp32", timing_cache=cache) == b"plan:denoiser"
    assert "building without one" in str(caught[-1].message) and cache.read_bytes() == b"from another GPU"


def test_one_logger_serves_every_build_and_runtime(tmp_path):
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    profile = static_profiles(fake_bundle(tmp_path), 1, 64, 64)["denoiser"]
    for _ in range(2):
        build_plan(trt, tmp_path / "denoiser.onnx", profile, "fp32")
    session, _ = make_session(tmp_path, cuda=cuda, trt=trt)
    session.run(denoiser_feeds())
    session.run(denoiser_feeds(batch=2))
    assert len(trt._loggers) == 1 and len(trt._builds) == 2 and len(trt._engines) == 2


def test_a_failed_capture_ends_the_capture(tmp_path):
    """An error while a CUDA graph is captured ends the capture (else the stream stays in capture mode and every
    later call fails); the error reaches the caller and the next run captures again."""
    cuda = FakeCuda()
    trt = fake_tensorrt(cuda)
    session, _ = make_session(tmp_path, cuda=cuda, trt=trt)
    feeds = denoiser_feeds()
    executor = session.executor({name: feeds[name].shape for name in session.input_names})
    executor.engine._fail_executions = 0
    real_enqueue = executor._enqueue
    calls = []

    def enqueue():
        calls.append(cuda.capturing)
        if cuda.capturing and len(calls) == 2:
            raise RuntimeError("copy failed during capture")
        real_enqueue()

    executor._enqueue = enqueue
    with pytest.raises(RuntimeError, match="during capture"):
        session.run(feeds)
    assert cuda.aborted == 1 and not cuda.capturing and executor.graph is None
    out = session.run(feeds)["model_output"]  # eager run, then a capture that succeeds
    np.testing.assert_allclose(out, 2 * feeds["sample"] + feeds["lr_latent"].mean(), rtol=1e-6)
    assert executor.graph is not None and cuda.launches == 0
    session.run(feeds)
    assert cuda.launches == 1


def test_a_capture_cuda_refuses_warns_once_and_the_executor_runs_without_graphs(tmp_path, monkeypatch):
    """A CUDA or TensorRT refusal while capturing (a BackendError) is not fatal: the run's eager result stands,
    one warning gives the reason, and the executor never tries to capture again (on the host path and the device
    path alike)."""
    cuda = FakeCuda()
    session, _ = make_session(tmp_path, cuda=cuda, trt=fake_tensorrt(cuda))
    feeds = denoiser_feeds()
    executor = session.executor({name: feeds[name].shape for name in session.input_names})
    executor.engine._fail_executions = 0
    execute, attempts = executor.execute, []

    def refusing_execute():
        if cuda.capturing:
            attempts.append(1)
            raise BackendError("TensorRT execution failed (execute_async_v3 returned False)")
        execute()

    monkeypatch.setattr(executor, "execute", refusing_execute)
    trt_module._warn_without_graphs.cache_clear()
    with pytest.warns(UserWarning, match=r"could not be captured as a CUDA graph \(TensorRT execution failed"):
        out = session.run(feeds)["model_output"]
    np.testing.assert_allclose(out, 2 * feeds["sample"] + feeds["lr_latent"].mean(), rtol=1e-6)
    assert cuda.aborted == 1 and not cuda.capturing and executor.graph is None and not executor.use_graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            session.run(feeds)
            executor.execute_device()
    assert attempts == [1] and cuda.launches == 0 and executor.device_graph is None
    host_views = SimpleNamespace(
        active=contextlib.nullcontext, view=lambda address, shape, dtype: np.zeros(shape, dtype)
    )
    binding = trt_module.TrtBinding(executor, host_views, 1, ())
    assert not binding.capturable  # the denoising loop does not try to capture what the executor could not


# --- missing TensorRT, missing GPU -------------------------------------------------------------------------------


def test_missing_tensorrt_names_what_to_install():
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "from medsr.engine.trt import import_tensorrt\n"
        "from medsr.errors import BackendError\n"
        "try:\n    import_tensorrt()\nexcept BackendError as exc:\n    print(exc)\n"
    )
    run = run_python(code)
    assert "needs TensorRT 10.8 to 11.x" in run.stdout, run.stderr
    assert "pip install 'medsr[gpu-cu12]' (driver >= 525)" in run.stdout and "'medsr[gpu-cu13]'" in run.stdout
    assert "pip install 'tensorrt>=10.8,<12'" in run.stdout


def test_trt_needs_cuda_device_and_a_visible_gpu(tmp_path):
    from medsr.engine.sessions import open_sessions

    with pytest.raises(BackendError, match="pass --device cuda"):
        open_sessions(fake_bundle(tmp_path), "trt", device="cpu")
    with pytest.raises(BackendError, match="needs a CUDA GPU and none is visible"):
        CudaRuntime(FakeCudart(devices=0))
    with pytest.raises(BackendError, match="cudaGetDeviceCount failed"):
        CudaRuntime(FakeCudart(fail={"cudaGetDeviceCount": 999}))  # cudaErrorUnknown


def test_no_driver_or_an_old_one_gets_an_install_hint():
    """cudaErrorInsufficientDriver becomes what to install: the driver when there is none (the real cuda-bindings
    12 and 13 without libcuda report this, tests/test_trt_api_surface.py), a newer one or a matching cuda-python
    when it is older than the runtime (cuda-python 13 needs a driver >= 580)."""
    with pytest.raises(BackendError) as caught:
        CudaRuntime(FakeCudart(driver=0, runtime=13000))
    assert "found no NVIDIA driver" in str(caught.value) and ">= 580" in str(caught.value)
    with pytest.raises(BackendError, match=">= 525 for the installed cuda-python 12.x"):
        CudaRuntime(FakeCudart(driver=0, runtime=12090))
    with pytest.raises(BackendError) as caught:
        CudaRuntime(FakeCudart(driver=12040, runtime=13000))
    message = str(caught.value)
    assert "supports CUDA 12.4" in message and "driver >= 580" in message and "'cuda-python>=12,<13'" in message
    assert "cudaErrorInsufficientDriver" not in message and "\n" not in message


def test_cuda_runtime_uses_a_non_blocking_stream_and_reads_the_gpu():
    cudart = FakeCudart()
    cuda = CudaRuntime(cudart)
    assert ("cudaStreamCreateWithFlags", cudart.cudaStreamNonBlocking) in cudart.calls
    assert cuda.gpu() == GpuInfo("NVIDIA H200", "9.0") and cuda.stream_handle == int(cuda.stream)
    stream = cuda.stream
    cuda.close()
    assert cudart.calls[-1] == ("cudaStreamDestroy", stream) and cuda.stream is None


def test_cuda_runtime_round_trip_and_capture_bookkeeping():
    cudart = FakeCudart()
    cuda = CudaRuntime(cudart)
    address, host = cuda.pinned((2, 3), np.float32)
    host[...] = 1.5
    assert host.shape == (2, 3) and cudart._host[address].view(np.float32).tolist() == [1.5] * 6
    cuda.begin_capture()
    cuda.copy_to_device(cuda.malloc(host.nbytes), address, host.nbytes)
    graph = cuda.end_capture()
    names = [call[0] for call in cudart.calls]
    assert names[-3:] == ["cudaStreamEndCapture", "cudaGraphInstantiate", "cudaGraphDestroy"]
    cuda.begin_capture()
    cuda.abort_capture()  # ends the capture and frees what it recorded, whatever the statuses
    assert [call[0] for call in cudart.calls][-2:] == ["cudaStreamEndCapture", "cudaGraphDestroy"]
    cudart._fail["cudaGraphInstantiate"] = 1
    cuda.begin_capture()
    with pytest.raises(BackendError, match="cudaGraphInstantiate failed"):
        cuda.end_capture()
    assert cudart.calls[-1][0] == "cudaGraphDestroy"  # the captured graph is freed even when instantiation fails
    cuda.destroy_graph(graph)
    cuda.free_pinned(address)
    assert cudart._host == {}


def test_each_graphs_precision_decision_reaches_the_provenance(tmp_path, monkeypatch):
    """A TensorRT session reports what its graph runs as (precision, fp32 islands, parity), and the provenance of
    every output carries the report of each graph; a graph with no decision yet reports its precision alone."""
    import json as json_module

    from medsr.engine.jobs import _precision_reports
    from medsr.engine.trt_build import mixed_paths

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    cuda = FakeCuda()
    bundle = fake_bundle(tmp_path / "bundle")
    sessions = open_trt_sessions(
        bundle, {"vae_encoder": "fp32", "vae_decoder": "fp32", "denoiser": "fp16"}, trt=fake_tensorrt(cuda), cuda=cuda
    )
    assert sessions["vae_encoder"].precision_report["precision"] == "fp32"
    assert sessions["denoiser"].precision_report["fp32_nodes"] == []
    denoiser = sessions["denoiser"]
    decision = {"precision": "fp16", "level": "embedding", "fp32_nodes": ["/unet/time_proj/Sin"]}
    decision |= {"parity_db": {"embedding": 88.1}, "note": "measured"}
    path = mixed_paths(denoiser.cache.root, denoiser.entry.path, "fp16")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json_module.dumps(decision))
    reports = _precision_reports(type("Pipeline", (), {"sessions": sessions})())
    assert reports["denoiser"] == decision and set(reports) == set(sessions)
