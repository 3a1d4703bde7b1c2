"""Within one volume the host stages overlap the engine (LatentSRPipeline.super_resolve_batches): the same SR bit for
bit as one stage after the other, in-plane, through-plane and in tiles; the host stages really run beside the
engine; and an error or an interrupt in any stage is raised once, with no host thread left behind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from io_fixtures import smooth_image

from medsr.bundle import load_bundle
from medsr.engine.pipeline import LatentSRPipeline, PlaneBatch, SamplingOptions
from medsr.engine.sessions import open_sessions
from medsr.engine.volume import plan_through_plane, prepare_input, super_resolve_through_plane, super_resolve_volume
from medsr.io.image import Volume

OPTIONS = SamplingOptions(steps=2, batch_size=2, lr_latent="sample")


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return LatentSRPipeline(bundle, open_sessions(bundle, "ort", threads=1))


@pytest.fixture(scope="module")
def through_pipeline(through_bundle):
    bundle = load_bundle(through_bundle)
    return LatentSRPipeline(bundle, open_sessions(bundle, "ort", threads=1))


def _volume(data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Volume:
    return Volume(Path("vol.nii.gz"), data.astype(np.float32), np.diag([*zooms, 1.0]), "nifti")


def _same(a, b) -> None:
    assert np.array_equal(a.data, b.data)
    assert np.array_equal(a.residuals, b.residuals)
    assert a.clipped_fraction == b.clipped_fraction and a.slices == b.slices


def test_in_plane_4d_volume_is_the_same_bit_for_bit_overlapped(pipeline):
    data = np.stack([smooth_image((12, 16, 5)), 2 * smooth_image((12, 16, 5))], axis=-1)
    prepared = prepare_input(_volume(data), (1.0, 99.0))
    runs = [super_resolve_volume(prepared, np.eye(4), pipeline, 2, OPTIONS, overlap=o) for o in (False, True)]
    _same(*runs)
    s = pipeline.bundle.scale
    assert runs[0].data.shape == (12 * s, 16 * s, 5, 2) and runs[0].slices == 10


def test_tiled_planes_are_the_same_bit_for_bit_overlapped(pipeline):
    prepared = prepare_input(_volume(smooth_image((24, 20, 3))), (1.0, 99.0))
    options = SamplingOptions(steps=1, batch_size=2, tile_size=16, tile_overlap=8)
    runs = [super_resolve_volume(prepared, np.eye(4), pipeline, 2, options, overlap=o) for o in (False, True)]
    _same(*runs)


def test_through_plane_volume_is_the_same_bit_for_bit_overlapped(through_pipeline):
    s = through_pipeline.bundle.scale
    volume = _volume(smooth_image((12, 10, 8)), zooms=(1.0, 1.0, float(s)))
    plan = plan_through_plane(volume, through_pipeline.bundle)
    prepared = prepare_input(volume, (1.0, 99.0))
    runs = [
        super_resolve_through_plane(prepared, volume.affine, through_pipeline, plan, OPTIONS, overlap=o)
        for o in (False, True)
    ]
    _same(*runs)
    assert runs[0].data.shape == (12, 10, 8 * s)


def _batches(count: int, drawn: list | None = None):
    rng = np.random.default_rng(0)
    for index in range(count):
        if drawn is not None:
            drawn.append((index, threading.current_thread().name))
        yield PlaneBatch(rng.uniform(-1, 1, (2, 8, 8)).astype(np.float32), 2 * index, key=index)


class DecoderWatch:
    """The decoder, counting its runs (one per batch) and setting ``running[k]`` while it runs batch k."""

    def __init__(self, decoder, count: int):
        self.decoder, self.calls = decoder, 0
        self.running = [threading.Event() for _ in range(count)]
        self.input_names, self.output_names, self.providers = (
            decoder.input_names,
            decoder.output_names,
            decoder.providers,
        )

    def run(self, feeds):
        self.running[self.calls].set()
        self.calls += 1
        return self.decoder.run(feeds)


def _watched(pipeline, count):
    watch = DecoderWatch(pipeline.sessions["vae_decoder"], count)
    return LatentSRPipeline(pipeline.bundle, {**pipeline.sessions, "vae_decoder": watch}), watch


def test_host_stages_run_on_their_own_thread_while_the_engine_runs_the_next_batch(pipeline):
    watched, watch = _watched(pipeline, 3)
    drawn, sunk = [], []

    def sink(batch, result):
        # batch 0 is finished while the engine runs batch 1: wait for it (a serial run would never get there)
        if batch.key == 0:
            sunk.append(watch.running[1].wait(timeout=60))
        sunk.append((batch.key, threading.current_thread().name, result.images.shape))

    watched.super_resolve_batches(_batches(3, drawn), OPTIONS, sink, overlap=True)
    assert sunk[0] is True
    assert [key for key, _, _ in sunk[1:]] == [0, 1, 2]
    host = {name for _, name in drawn} | {name for _, name, _ in sunk[1:]}
    assert len(host) == 1 and host != {threading.current_thread().name}
    s = pipeline.bundle.scale
    assert all(shape == (2, 8 * s, 8 * s) for _, _, shape in sunk[1:])


def test_serial_run_keeps_every_stage_on_the_calling_thread(pipeline):
    drawn, sunk = [], []
    pipeline.super_resolve_batches(
        _batches(3, drawn), OPTIONS, lambda b, r: sunk.append(threading.current_thread().name), overlap=False
    )
    assert {name for _, name in drawn} | set(sunk) == {threading.current_thread().name}
    assert len(sunk) == 3


def _host_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("medsr-host")]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_sink_is_raised_once_and_leaves_no_host_thread(pipeline, overlap):
    def sink(batch, result):
        if batch.key == 1:
            raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        pipeline.super_resolve_batches(_batches(4), OPTIONS, sink, overlap=overlap)
    assert _host_threads() == []


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_batch_source_is_raised(pipeline, overlap):
    def batches():
        yield from _batches(1)
        raise OSError("vol.nii.gz: truncated")

    sunk = []
    with pytest.raises(OSError, match="truncated"):
        pipeline.super_resolve_batches(batches(), OPTIONS, lambda b, r: sunk.append(b.key), overlap=overlap)
    assert _host_threads() == []


def test_an_interrupt_in_the_engine_stops_the_host_stages(pipeline):
    watched, watch = _watched(pipeline, 4)
    decoder_run = watch.run
    sunk = []

    def interrupted(feeds):
        if watch.calls == 1:
            raise KeyboardInterrupt
        return decoder_run(feeds)

    watch.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        watched.super_resolve_batches(_batches(4), OPTIONS, lambda b, r: sunk.append(b.key), overlap=True)
    assert _host_threads() == []
    assert sunk == [0]  # batch 0 was finished; nothing after the interrupted batch 1 ran


class OnGpu:
    """The denoiser as an engine off the CPU presents itself (``device`` "cuda"), computing on the CPU underneath."""

    device = "cuda"

    def __init__(self, session):
        self.session = session
        self.input_names, self.output_names, self.providers = session.input_names, session.output_names, ("gpu",)

    def run(self, feeds):
        return self.session.run(feeds)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_by_default_only_an_engine_off_the_cpu_is_overlapped(pipeline, device):
    sessions = dict(pipeline.sessions)
    if device == "cuda":
        sessions["denoiser"] = OnGpu(sessions["denoiser"])
    chosen = LatentSRPipeline(pipeline.bundle, sessions)
    assert chosen.engine_on_host is (device == "cpu")
    threads = []
    chosen.super_resolve_batches(_batches(2), OPTIONS, lambda b, r: threads.append(threading.current_thread().name))
    assert (threads[0] == threading.current_thread().name) is (device == "cpu")


def test_one_batch_starts_no_host_thread(pipeline, monkeypatch):
    """A call with a single batch (a server's request, an evaluation plane) has nothing to overlap."""
    import medsr.engine.pipeline as pipeline_module

    def no_thread(*args, **kwargs):
        raise AssertionError("a host thread was started")

    monkeypatch.setattr(pipeline_module, "ThreadPoolExecutor", no_thread)
    on_gpu = LatentSRPipeline(pipeline.bundle, {**pipeline.sessions, "denoiser": OnGpu(pipeline.sessions["denoiser"])})
    lr = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8)).astype(np.float32)
    assert on_gpu.super_resolve(lr, OPTIONS).images.shape[0] == 2
    with pytest.raises(AssertionError, match="host thread"):
        on_gpu.super_resolve(np.concatenate([lr, lr]), OPTIONS)
