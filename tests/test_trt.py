"""TensorRT without a GPU: plan cache keys and stale plans, the engine cache, profile choice, builder recipes and
``auto``, CUDA-graph replay and the errors when TensorRT or a GPU is missing (fakes of tests/trt_fakes.py stand in
for tensorrt and CUDA)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from fresh_python import run_python
from trt_fakes import FakeCuda, fake_bundle, fake_tensorrt

import medsr.engine.precision as precision_module
from medsr.engine.cuda import CudaRuntime, GpuInfo
from medsr.engine.precision import PRECISIONS
from medsr.engine.profiles import ShapeProfile, choose_profile, graph_input_shapes, static_profiles
from medsr.engine.trt import PlanCache, PlanKey, TrtSession, open_trt_sessions
from medsr.engine.trt_build import RECIPES, build_plan, pin_fp32_layers, precision_plan, recipe_id
from medsr.errors import BackendError, ShapeError

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
    assert len(builds) == 1 and cuda.launches == 3
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


def test_dynamic_profile_runs_without_cuda_graph(tmp_path):
    cuda = FakeCuda()
    profile = range_profile(fake_bundle(tmp_path), (1, 2, 4), ((64, 64),) * 3)
    session, builds = make_session(tmp_path, cuda=cuda, profiles=[profile])
    for batch in (1, 3):
        session.run(denoiser_feeds(batch=batch))
    assert len(builds) == 1 and cuda.launches == 0


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
    assert sessions["denoiser"].providers == ("TensorRT-10.8.0-fp16",)
    plans = tmp_path / "cache" / "engines" / manifest_digest(bundle) / "tensorrt-10.8.0" / "NVIDIA_H100_80GB_HBM3-sm9.0"
    assert sessions["vae_decoder"].cache.root == plans and sessions["denoiser"].cache is sessions["vae_decoder"].cache
    timings = tmp_path / "cache" / "runtimes" / "tensorrt-10.8.0" / "NVIDIA_H100_80GB_HBM3-sm9.0" / "timing.cache"
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
    assert sessions["denoiser"].providers == ("TensorRT-10.8.0-fp16 (auto: 74.0 dB vs fp32 on the probe)",)
    mixed = {"denoiser": "auto", "vae_encoder": "fp32", "vae_decoder": "fp32"}
    with pytest.raises(BackendError, match="auto applies to every graph or none"):
        open_trt_sessions(fake_bundle(tmp_path / "bundle"), mixed, trt=fake_tensorrt(cuda), cuda=cuda)


# --- precision policy --------------------------------------------------------------------------------------------


def test_precision_plans():
    assert precision_plan("fp32").clear_flags == ("TF32",)
    assert "OBEY_PRECISION_CONSTRAINTS" in precision_plan("fp16").set_flags
    assert set(precision_plan("fp16").fp32_layer_types) == {"NORMALIZATION", "SOFTMAX", "REDUCE"}
    assert precision_plan("fp16-all").fp32_layer_types == () and precision_plan("bf16").set_flags == ("BF16",)
    with pytest.raises(BackendError, match="must be one of"):
        precision_plan("int8")
    assert (*RECIPES, "auto") == PRECISIONS["trt"]  # one list: every precision but auto has a builder recipe
    assert len({recipe_id(p) for p in RECIPES}) == len(RECIPES)


class _Layer:
    def __init__(self, name, kind, outputs=1):
        self.name, self.type, self.num_outputs, self.precision, self.output_types = name, kind, outputs, None, {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


def _fake_network():
    layers = [
        _Layer("conv", "CONVOLUTION"),
        _Layer("groupnorm", "NORMALIZATION"),
        _Layer("softmax", "SOFTMAX"),
        _Layer("mean", "REDUCE", 2),
    ]
    return SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__), layers


def test_norms_and_softmax_are_pinned_to_fp32():
    trt = SimpleNamespace(
        LayerType=SimpleNamespace(NORMALIZATION="NORMALIZATION", SOFTMAX="SOFTMAX", REDUCE="REDUCE"), float32="f32"
    )
    network, layers = _fake_network()
    assert pin_fp32_layers(trt, network, precision_plan("fp16").fp32_layer_types) == ["groupnorm", "softmax", "mean"]
    assert (
        layers[0].precision is None and layers[1].precision == "f32" and layers[3].output_types == {0: "f32", 1: "f32"}
    )
    assert pin_fp32_layers(trt, network, precision_plan("fp16-all").fp32_layer_types) == []


def test_build_plan_sets_flags_profile_and_timing_cache(tmp_path):
    recorded = {"set": [], "clear": [], "shapes": []}
    network, _ = _fake_network()

    class Config:
        def set_flag(self, flag):
            recorded["set"].append(flag)

        def clear_flag(self, flag):
            recorded["clear"].append(flag)

        def add_optimization_profile(self, profile):
            pass

        def create_timing_cache(self, data):
            recorded["cache_in"] = data
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return SimpleNamespace(serialize=lambda: b"timings")

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return network

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *args: recorded["shapes"].append(args))

        def build_serialized_network(self, net, config):
            return b"plan:denoiser"

    parser = SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
    trt = SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=Builder,
        OnnxParser=lambda net, logger: parser,
        BuilderFlag=SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY"),
        LayerType=SimpleNamespace(NORMALIZATION="NORMALIZATION", SOFTMAX="SOFTMAX", REDUCE="REDUCE"),
        float32="f32",
    )
    profile = static_profiles(fake_bundle(tmp_path), 1, 64, 64)["denoiser"]
    cache = tmp_path / "engines" / "timing.cache"
    assert build_plan(trt, tmp_path / "denoiser.onnx", profile, "fp16", timing_cache=cache) == b"plan:denoiser"
    assert recorded["set"] == ["FP16", "OBEY"] and recorded["cache_in"] == b"" and cache.read_bytes() == b"timings"
    assert recorded["shapes"][0] == ("sample", (1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 64, 64))
    parser.parse_from_file = lambda path: False
    parser.get_error = lambda i: "Unsupported operator GridSample"
    parser.num_errors = 1
    with pytest.raises(BackendError, match="could not parse denoiser.onnx: Unsupported operator GridSample"):
        build_plan(trt, tmp_path / "denoiser.onnx", profile, "fp16")


# --- missing TensorRT, missing GPU -------------------------------------------------------------------------------


def test_missing_tensorrt_names_the_extra():
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "from medsr.engine.trt import import_tensorrt\n"
        "from medsr.errors import BackendError\n"
        "try:\n    import_tensorrt()\nexcept BackendError as exc:\n    print(exc)\n"
    )
    run = run_python(code)
    assert "needs TensorRT >= 10" in run.stdout and "pip install 'medsr[gpu]'" in run.stdout, run.stderr


def test_trt_needs_cuda_device_and_a_visible_gpu(tmp_path):
    from medsr.engine.sessions import open_sessions

    with pytest.raises(BackendError, match="pass --device cuda"):
        open_sessions(fake_bundle(tmp_path), "trt", device="cpu")
    no_gpu = SimpleNamespace(cudaGetDeviceCount=lambda: (0, 0))
    with pytest.raises(BackendError, match="needs a CUDA GPU and none is visible"):
        CudaRuntime(no_gpu)
    broken = SimpleNamespace(cudaGetDeviceCount=lambda: (100, 0))  # cudaErrorNoDevice
    with pytest.raises(BackendError, match="cudaGetDeviceCount failed"):
        CudaRuntime(broken)


def test_cuda_runtime_reads_the_gpu_name_and_capability():
    props = SimpleNamespace(name=b"NVIDIA H200\x00\x00", major=9, minor=0)
    cudart = SimpleNamespace(
        cudaGetDeviceCount=lambda: (0, 1), cudaStreamCreate=lambda: (0, 5), cudaGetDeviceProperties=lambda i: (0, props)
    )
    assert CudaRuntime(cudart).gpu() == GpuInfo("NVIDIA H200", "9.0")
