"""The device-resident denoising loop (medsr.engine.device_loop) against the host loop, on the CPU.

ONNX Runtime's CPU IOBinding is the "device" here: its OrtValues wrap NumPy arrays, so the loop keeps its latents in
bound buffers and applies each step's coefficients with NumPy, exactly as it does with CuPy on a GPU. The host loop
runs the same ORT session through a wrapper without ``bind``. Both loops do the step arithmetic in float64 and round
to float32 once per step, so the denoiser sees the same float32 samples and the final latents are compared bit for
bit (any drift would be amplified by the network step after step, which a tolerance would hide). TensorRT's device
path runs on the fakes of tests/trt_fakes.py, whose device memory is NumPy too.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from samplers import SAMPLERS
from trt_fakes import FakeCuda, fake_tensorrt

import medsr.engine.pipeline as pipeline_module
import medsr.engine.sessions as sessions_module
import medsr.engine.trt as trt_module
from medsr.bench.loop_variants import HostOnly, StepByStep
from medsr.bundle import load_bundle
from medsr.engine import device_loop
from medsr.engine.device_loop import HostArrays
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import cuda_provider_options, open_ort_sessions
from medsr.errors import BackendError, NonFiniteError

LR = np.random.default_rng(1).uniform(-1, 1, (3, 8, 12)).astype(np.float32)
#: 3 slices at batch 2: two batches of different shapes, so the loop binds two shapes
OPTIONS = SamplingOptions(steps=4, seed=3, batch_size=2, tile_size=None)


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return bundle, open_ort_sessions(bundle, threads=1)


def traced(pipeline, lr=LR, options=OPTIONS):
    """(SR images, {stage: [arrays of each batch]}) of one run."""
    stages = {}
    images = pipeline.super_resolve(lr, options, trace=lambda s, i, a: stages.setdefault(s, []).append(a)).images
    return images, stages


@pytest.mark.parametrize("name", SAMPLERS)
def test_device_loop_equals_the_host_loop_bit_for_bit(tiny, name):
    bundle, sessions = tiny
    device = LatentSRPipeline(bundle, sessions, SAMPLERS[name])
    host = LatentSRPipeline(bundle, {**sessions, "denoiser": HostOnly(sessions["denoiser"])}, SAMPLERS[name])
    images, stages = traced(device)
    host_images, host_stages = traced(host)
    assert set(stages) == set(host_stages)  # tracing still sees every step's output
    for stage in ("final_latent", "denoiser_output[3]"):
        for a, b in zip(stages[stage], host_stages[stage], strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(images, host_images)
    assert sessions["denoiser"]._bindings, "the device loop did not run"


@pytest.mark.parametrize("name", ["ddpm-stochastic", "dpmsolver++"])
def test_chunks_share_a_binding_and_give_the_same_latents(tiny, name):
    """5 items denoised 2 at a time (2 + 2 + 1, as tiles are): chunks of one shape share one binding, the stack
    stays in loop-owned arrays, and the result is the host loop's."""
    bundle, sessions = tiny
    shape = (5, 4, 8, 8)
    z_lr = np.random.default_rng(2).standard_normal((5, 4, 2, 2), dtype=np.float32)
    noise = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)

    def latents(pipeline):
        rng = np.random.default_rng(4)
        return pipeline.sample_latents(
            z_lr, noise, lambda: rng.standard_normal(shape, dtype=np.float32), steps=3, chunk=2
        )

    device = LatentSRPipeline(bundle, sessions, SAMPLERS[name])
    host = LatentSRPipeline(bundle, {**sessions, "denoiser": HostOnly(sessions["denoiser"])}, SAMPLERS[name])
    np.testing.assert_array_equal(latents(device), latents(host))


@pytest.fixture
def counted(tiny):
    """Fresh ORT sessions whose denoiser counts OrtValue allocations, uploads (into the LR-latent buffers and in
    all) and host runs."""
    bundle, _ = tiny
    sessions = open_ort_sessions(bundle, threads=1)
    denoiser = sessions["denoiser"]
    counts = {"allocations": 0, "uploads": 0, "lr_uploads": 0, "host_runs": 0}
    allocate, upload, run = denoiser.allocate, denoiser.arrays.upload, denoiser.run

    def counting_allocate(shape, dtype=np.float32):
        counts["allocations"] += 1
        return allocate(shape, dtype)

    def counting_upload(host, device):
        counts["uploads"] += 1
        counts["lr_uploads"] += any(device is b.inputs["lr_latent"] for b in denoiser._bindings.values())
        upload(host, device)

    def counting_run(feeds):
        counts["host_runs"] += 1
        return run(feeds)

    denoiser.allocate, denoiser.arrays.upload, denoiser.run = counting_allocate, counting_upload, counting_run
    return LatentSRPipeline(bundle, sessions), denoiser, counts


def test_ortvalues_are_allocated_once_per_shape_and_reused(counted):
    """4 slices at batch 2, twice: 4 OrtValues (sample, lr_latent, timestep, model_output) for the one shape,
    reused by every step of both batches of both calls; a new shape (batch 1) allocates its own 4, once."""
    pipeline, denoiser, counts = counted
    options = SamplingOptions(steps=3, batch_size=2, tile_size=None)
    lr = np.tile(LR, (2, 1, 1))[:4]
    pipeline.super_resolve(lr, options)
    pipeline.super_resolve(lr, options)
    assert counts["allocations"] == 4 and len(denoiser._bindings) == 1
    pipeline.super_resolve(lr[:3], options)  # 2 + 1
    assert counts["allocations"] == 8 and len(denoiser._bindings) == 2
    assert counts["host_runs"] == 0


def test_the_lr_latent_is_uploaded_once_per_batch(counted):
    """DDIM (deterministic), 6 steps, 3 batches: per batch one LR-latent upload and one initial sample, nothing
    per step."""
    pipeline, _, counts = counted
    pipeline.super_resolve(np.tile(LR, (2, 1, 1))[:5], SamplingOptions(steps=6, batch_size=2, tile_size=None))
    assert counts["lr_uploads"] == 3
    assert counts["uploads"] == 2 * 3


def test_stochastic_noise_is_uploaded_only_where_a_step_adds_it(counted, tiny):
    """DDPM draws noise at each of its 4 steps (the seeds' stream) and adds it at the first 3 (none at t = 0)."""
    bundle, _ = tiny
    pipeline, _, counts = counted
    pipeline = LatentSRPipeline(bundle, pipeline.sessions, SAMPLERS["ddpm-stochastic"])
    pipeline.super_resolve(LR[:2], SamplingOptions(steps=4, batch_size=2, tile_size=None))
    assert counts["lr_uploads"] == 1 and counts["uploads"] == 2 + 3


@pytest.mark.parametrize("budget", [device_loop.NOISE_BUDGET_BYTES, 0], ids=["up-front", "per-step"])
def test_noise_is_uploaded_before_the_loop_within_the_budget(tiny, monkeypatch, budget):
    """Within NOISE_BUDGET_BYTES every step's noise is uploaded before the first denoiser run (one host call per
    batch, not one per step); beyond it, at each step. Both give the host loop's images."""
    bundle, _ = tiny
    sessions = open_ort_sessions(bundle, threads=1)
    events = []
    upload, run = sessions["denoiser"].arrays.upload, sessions_module.OrtBinding.run
    monkeypatch.setattr(sessions["denoiser"].arrays, "upload", lambda h, d: events.append("upload") or upload(h, d))
    monkeypatch.setattr(sessions_module.OrtBinding, "run", lambda self: events.append("run") or run(self))
    monkeypatch.setattr(device_loop, "NOISE_BUDGET_BYTES", budget)
    config = SAMPLERS["ddpm-stochastic"]
    options = SamplingOptions(steps=4, seed=1, batch_size=2, tile_size=None)
    images = LatentSRPipeline(bundle, sessions, config).super_resolve(LR[:2], options).images
    expected = ["upload"] * 5 + ["run"] * 4 if budget else ["upload"] * 2 + ["run", "upload"] * 3 + ["run"]
    assert events == expected  # sample and LR latent, then noise at the 3 steps that add it (not at t = 0)
    host = LatentSRPipeline(bundle, {**sessions, "denoiser": HostOnly(sessions["denoiser"])}, config)
    np.testing.assert_array_equal(images, host.super_resolve(LR[:2], options).images)


class NaNAtStep:
    """A denoiser whose bindings write NaN into the model output at step ``step``."""

    def __init__(self, session, step):
        self.session, self.step, self.runs = session, step, 0
        self.input_names, self.output_names, self.providers = session.input_names, session.output_names, ("nan",)

    def run(self, feeds):
        return self.session.run(feeds)

    def bind(self, inputs, outputs):
        bound = self.session.bind(inputs, outputs)
        wrapper = self

        class Poisoned:
            arrays, inputs, outputs = bound.arrays, bound.inputs, bound.outputs

            def run(self):
                bound.run()
                if wrapper.runs == wrapper.step:
                    bound.outputs["model_output"][0, 0, 0, 0] = np.nan
                wrapper.runs += 1

        return Poisoned()


def test_a_nan_in_the_model_output_raises_once_naming_the_loop(tiny, monkeypatch):
    bundle, sessions = tiny
    checks = []
    check = pipeline_module._check_finite
    monkeypatch.setattr(pipeline_module, "_check_finite", lambda stage, a: checks.append(stage) or check(stage, a))
    pipeline = LatentSRPipeline(bundle, {**sessions, "denoiser": NaNAtStep(sessions["denoiser"], step=1)})
    with pytest.raises(NonFiniteError, match=r"denoising loop \(5 steps on the device, checked at its end\)"):
        pipeline.super_resolve(LR[:1], SamplingOptions(steps=5, tile_size=None))
    assert [stage for stage in checks if "denois" in stage] == [
        "denoising loop (5 steps on the device, checked at its end)"
    ]


def test_the_encoder_fetches_latent_logvar_only_to_sample_the_lr_latent(tiny):
    bundle, sessions = tiny
    fetched = []
    encoder = sessions["vae_encoder"]

    class Recording:
        input_names, output_names, providers = encoder.input_names, encoder.output_names, encoder.providers

        def run(self, feeds):
            raise AssertionError("run_outputs should have been used")

        def run_outputs(self, feeds, names):
            fetched.append(tuple(names))
            return encoder.run_outputs(feeds, names)

    pipeline = LatentSRPipeline(bundle, {**sessions, "vae_encoder": Recording()})
    for mode in ("mean", "sample"):
        pipeline.super_resolve(LR[:1], SamplingOptions(steps=1, lr_latent=mode, tile_size=None))
    assert fetched == [("latent_mean",), ("latent_mean", "latent_logvar")]
    assert set(encoder.run_outputs({"image": np.zeros((1, 1, 16, 16), np.float32)}, ["latent_mean"])) == {"latent_mean"}


def test_cuda_provider_options():
    base = cuda_provider_options()
    assert base["cudnn_conv_algo_search"] == "EXHAUSTIVE" and base["use_tf32"] == "0"
    assert base["do_copy_in_default_stream"] == "1" and base["arena_extend_strategy"] == "kSameAsRequested"
    assert "user_compute_stream" not in base and "enable_cuda_graph" not in base
    bound = cuda_provider_options(stream=1234, cuda_graph=True)
    assert bound["user_compute_stream"] == "1234" and bound["has_user_compute_stream"] == "1"
    assert bound["enable_cuda_graph"] == "1"


class FakeDeviceArrays(HostArrays):
    """CupyArrays' interface over FakeCuda's device memory (NumPy arrays keyed by address): the loop's device work
    (fill, copy, step) goes through the fake stream, so a capture records it instead of running it, and a host
    transfer while capturing fails, as CUDA's would (an illegal call in a capture)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def view(self, address, shape, dtype, owner=None):
        return self.cuda.memory[address].view(dtype).reshape(shape)

    def empty(self, shape, dtype):
        assert not self.cuda.capturing, "allocation while capturing (the memory pool would recycle it)"
        return super().empty(shape, dtype)

    def upload(self, host, device):
        assert not self.cuda.capturing, "host transfer while capturing"
        super().upload(host, device)

    def download(self, device):
        assert not self.cuda.capturing, "host transfer while capturing"
        return super().download(device)

    def fill(self, device, value):
        self.cuda.submit(lambda: HostArrays.fill(self, device, value))

    def copy(self, destination, source):
        self.cuda.submit(lambda: HostArrays.copy(self, destination, source))

    def step(self, coeffs, sample, output, history, noise=None):
        self.cuda.submit(lambda: HostArrays.step(self, coeffs, sample, output, history, noise))


def trt_pipeline(bundle, tmp_path, monkeypatch, device: bool, config):
    from medsr.engine.trt import open_trt_sessions

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / f"cache-{device}"))
    cuda = FakeCuda()
    sessions = open_trt_sessions(bundle, "fp32", trt=fake_tensorrt(cuda), cuda=cuda)
    for graph, session in sessions.items():
        session.builder = lambda path, profile, precision, g=graph: f"plan:{g}".encode()
    if device:
        sessions["denoiser"].arrays = FakeDeviceArrays(cuda)
    return LatentSRPipeline(bundle, sessions, config), sessions, cuda


#: 7 slices at batch 2: three full batches on one binding, then the last one padded on the same plan
VOLUME = np.random.default_rng(5).uniform(-1, 1, (7, 8, 12)).astype(np.float32)
TRT_OPTIONS = SamplingOptions(steps=3, seed=2, batch_size=2, tile_size=None)


def host_loop_images(bundle, tmp_path, monkeypatch, config, lr=VOLUME, options=TRT_OPTIONS):
    """The fake TensorRT's SR images through the host loop (no CuPy: every step crosses to the host)."""
    host, _, _ = trt_pipeline(bundle, tmp_path, monkeypatch, False, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CuPy is not installed", tested below
        return host.super_resolve(lr, options).images


def record_launches(cuda, monkeypatch) -> list:
    """The handles of every graph ``cuda`` launches from now on, in order."""
    launched = []
    launch = cuda.launch
    monkeypatch.setattr(cuda, "launch", lambda handle: launched.append(handle) or launch(handle))
    return launched


def loop_graphs(sessions):
    """{binding batch: [captured loops]} of the denoiser."""
    return {
        signature[0][0]: [loop for loop in binding.loops.values() if loop.graph is not None]
        for signature, binding in sessions["denoiser"]._bindings.items()
    }


@pytest.mark.parametrize("name", ["ddim", "ddpm-stochastic", "ddim-clip-stochastic", "dpmsolver++"])
def test_tensorrt_captures_the_whole_loop_and_matches_the_host_loop(tiny, tmp_path, monkeypatch, name):
    """The first batch of the batch-2 binding runs step by step, the second is captured as one graph of the whole
    trajectory (timesteps, engine, steps) and replayed, the third replays it; nothing is allocated or copied to
    the host while capturing, the noise of every step is uploaded before the launch, and the images are the host
    loop's bit for bit. The padded last batch (its own binding, used once) runs step by step."""
    bundle, _ = tiny
    pipeline, sessions, cuda = trt_pipeline(bundle, tmp_path, monkeypatch, True, SAMPLERS[name])
    launched = record_launches(cuda, monkeypatch)
    images = pipeline.super_resolve(VOLUME, TRT_OPTIONS).images
    graphs = loop_graphs(sessions)
    assert {batch: len(loops) for batch, loops in graphs.items()} == {2: 1, 1: 0}
    (executor,) = sessions["denoiser"]._executors.values()  # batch 1 padded to the batch-2 plan
    assert executor.graph is None and executor.device_graph is None  # neither the host path nor per-step graphs
    assert launched.count(graphs[2][0].graph) == 2  # batches 2 and 3: one launch each for all 3 steps
    np.testing.assert_array_equal(images, host_loop_images(bundle, tmp_path, monkeypatch, SAMPLERS[name]))
    (loop,) = graphs[2]
    sessions["denoiser"].close()
    assert loop.graph not in cuda.graphs  # destroyed before the buffers it writes are freed


def test_a_stochastic_trajectory_whose_noise_exceeds_the_budget_is_not_captured(tiny, tmp_path, monkeypatch):
    bundle, _ = tiny
    monkeypatch.setattr(device_loop, "NOISE_BUDGET_BYTES", 0)
    for name, captured in (("ddpm-stochastic", 0), ("ddim", 1)):  # ddim adds no noise: it still fits
        pipeline, sessions, _ = trt_pipeline(bundle, tmp_path / name, monkeypatch, True, SAMPLERS[name])
        images = pipeline.super_resolve(VOLUME, TRT_OPTIONS).images
        assert len(loop_graphs(sessions)[2]) == captured, name
        np.testing.assert_array_equal(images, host_loop_images(bundle, tmp_path / name, monkeypatch, SAMPLERS[name]))


def test_a_binding_keeps_its_most_recent_trajectories_captured(tiny, tmp_path, monkeypatch):
    """A server asked for ever new step counts keeps LOOPS_PER_BINDING trajectories per binding: a new one releases
    the least recently used, graph and buffers, and a reused one counts as recent again."""
    bundle, _ = tiny
    monkeypatch.setattr(device_loop, "LOOPS_PER_BINDING", 2)
    pipeline, sessions, cuda = trt_pipeline(bundle, tmp_path, monkeypatch, True, SAMPLERS["ddim"])
    lr = VOLUME[:4]  # two batches of two: the second is captured
    graphs = {}
    for steps in (2, 3, 2, 4):
        pipeline.super_resolve(lr, SamplingOptions(steps=steps, seed=2, batch_size=2, tile_size=None))
        (binding,) = sessions["denoiser"]._bindings.values()
        graphs[steps] = next(loop.graph for key, loop in binding.loops.items() if len(key[0]) == steps)
    assert [len(key[0]) for key in binding.loops] == [2, 4]  # 3 was the least recently used when 4 came
    assert graphs[3] not in cuda.graphs and graphs[2] in cuda.graphs and graphs[4] in cuda.graphs
    options = SamplingOptions(steps=3, seed=2, batch_size=2, tile_size=None)
    expected = host_loop_images(bundle, tmp_path, monkeypatch, SAMPLERS["ddim"], lr, options)
    np.testing.assert_array_equal(pipeline.super_resolve(lr, options).images, expected)


def test_a_trace_runs_step_by_step_on_the_engine_graph(tiny, tmp_path, monkeypatch):
    """Tracing downloads each step's output, which a whole-loop graph cannot: the loop runs step by step, the
    engine alone captured once and replayed, with the host loop's results."""
    bundle, _ = tiny
    pipeline, sessions, cuda = trt_pipeline(bundle, tmp_path, monkeypatch, True, SAMPLERS["ddim"])
    launched = record_launches(cuda, monkeypatch)
    stages = {}
    images = pipeline.super_resolve(
        VOLUME, TRT_OPTIONS, trace=lambda s, i, a: stages.setdefault(s, []).append(a)
    ).images
    assert len(stages["denoiser_output[2]"]) == 4  # every batch's last step reached the host
    assert loop_graphs(sessions) == {2: [], 1: []}
    (executor,) = sessions["denoiser"]._executors.values()
    assert executor.device_graph is not None and launched.count(executor.device_graph) == 4 * 3 - 1  # not the 1st
    np.testing.assert_array_equal(images, host_loop_images(bundle, tmp_path, monkeypatch, SAMPLERS["ddim"]))


def test_the_step_by_step_variant_never_captures_the_whole_loop(tiny, tmp_path, monkeypatch):
    """medsr.bench.loop_variants.StepByStep, the benchmark's uncaptured device loop: the engine alone is replayed per
    step, and the images are the host loop's."""
    bundle, _ = tiny
    _, sessions, _ = trt_pipeline(bundle, tmp_path, monkeypatch, True, SAMPLERS["dpmsolver++"])
    pipeline = LatentSRPipeline(
        bundle, {**sessions, "denoiser": StepByStep(sessions["denoiser"])}, SAMPLERS["dpmsolver++"]
    )
    images = pipeline.super_resolve(VOLUME, TRT_OPTIONS).images
    assert loop_graphs(sessions) == {2: [], 1: []}
    (executor,) = sessions["denoiser"]._executors.values()
    assert executor.device_graph is not None
    np.testing.assert_array_equal(images, host_loop_images(bundle, tmp_path, monkeypatch, SAMPLERS["dpmsolver++"]))


def test_a_failed_capture_warns_once_and_the_loop_goes_on_step_by_step(tiny, tmp_path, monkeypatch):
    """A step CUDA refuses to capture: the capture is abandoned (the stream leaves capture mode), one warning says
    why, that batch and the later ones run step by step, and the images are still the host loop's."""
    bundle, _ = tiny
    pipeline, sessions, cuda = trt_pipeline(bundle, tmp_path, monkeypatch, True, SAMPLERS["ddpm-stochastic"])
    arrays = sessions["denoiser"].arrays
    step = arrays.step

    def refusing_step(*args):
        if cuda.capturing:
            raise BackendError("CUDA call cuLaunchKernel failed: cudaErrorStreamCaptureUnsupported")
        step(*args)

    arrays.step = refusing_step
    device_loop._warn_capture_failed.cache_clear()
    with pytest.warns(UserWarning, match=r"could not be captured as one CUDA graph \(BackendError: CUDA call"):
        images = pipeline.super_resolve(VOLUME, TRT_OPTIONS).images
    assert not cuda.capturing and cuda.aborted == 1
    assert loop_graphs(sessions) == {2: [], 1: []}
    (binding,) = [b for signature, b in sessions["denoiser"]._bindings.items() if signature[0][0] == 2]
    assert binding.capturable is False
    np.testing.assert_array_equal(images, host_loop_images(bundle, tmp_path, monkeypatch, SAMPLERS["ddpm-stochastic"]))


def test_without_cupy_the_tensorrt_loop_runs_through_the_host_and_says_so_once(tiny, tmp_path, monkeypatch):
    bundle, _ = tiny
    monkeypatch.setattr(trt_module, "import_cupy", lambda: None)
    device_loop.warn_without_cupy.cache_clear()
    host, sessions, _ = trt_pipeline(bundle, tmp_path, monkeypatch, False, SAMPLERS["ddim"])
    with pytest.warns(UserWarning, match=r"CuPy is not installed.*pip install 'cupy-cuda12x\[ctk\]'"):
        host.super_resolve(LR, TRT_OPTIONS)
    assert not sessions["denoiser"]._bindings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is said once per process
        host.super_resolve(LR[:1], TRT_OPTIONS)


def test_the_tensorrt_stream_is_wrapped_without_cupys_deprecated_class():
    """CuPy 14 deprecates ExternalStream (a DeprecationWarning at every session) for Stream.from_external, which
    takes an object under the CUDA stream protocol; CuPy 13 has only ExternalStream."""
    made = []

    class Stream:
        @staticmethod
        def from_external(obj):
            made.append(obj.__cuda_stream__())
            return "cupy-14-stream"

    def old_external(handle):
        made.append(handle)
        return "cupy-13-stream"

    cupy14 = SimpleNamespace(cuda=SimpleNamespace(Stream=Stream, ExternalStream=None))
    cupy13 = SimpleNamespace(cuda=SimpleNamespace(Stream=object, ExternalStream=old_external))
    assert device_loop.external_stream(cupy14, 0xC0DA) == "cupy-14-stream"
    assert device_loop.external_stream(cupy13, 0xC0DA) == "cupy-13-stream"
    assert made == [(0, 0xC0DA), 0xC0DA]
