"""Timing one super-resolution run stage by stage: the medsr-infer path with clocks around each stage, and the
same run untimed inside, as medsr-infer does it.

Sessions are wrapped so every graph call is timed (encode = vae_encoder, each denoiser step, decode = vae_decoder);
the gap after each denoiser call until the next graph call is the sampler's work (NumPy scheduler step, NaN check);
data consistency is timed by a pipeline subclass; load and save around the volume. ``other`` is what is left of
the volume call: the intensity window fit and normalization, padding, the consistency residual and denormalization.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.schedulers import SchedulerConfig, make_scheduler
from medsr.engine.sessions import Session

#: Stages of one run, in pipeline order; seconds for the whole volume.
STAGES = ("load", "encode", "denoise", "sampler", "decode", "consistency", "other", "save", "end_to_end")


@dataclass
class Timeline:
    """(stage, start, end) events of one run, perf_counter seconds."""

    events: list[tuple[str, float, float]] = field(default_factory=list)

    def record(self, stage: str, start: float) -> None:
        self.events.append((stage, start, time.perf_counter()))

    def total(self, stage: str) -> float:
        return sum(end - start for name, start, end in self.events if name == stage)

    def durations(self, stage: str) -> list[float]:
        return [end - start for name, start, end in self.events if name == stage]

    def sampler_seconds(self) -> float:
        """Sum of the gaps from the end of each denoiser call to the start of the next graph call."""
        ordered = sorted(self.events, key=lambda event: event[1])
        return sum(
            after[1] - before[2]
            for before, after in itertools.pairwise(ordered)
            if before[0] == "denoiser" and after[0] in ("denoiser", "vae_decoder")
        )


class TimedSession:
    """A Session whose every run is recorded in a Timeline under the graph's name."""

    def __init__(self, name: str, session: Session, timeline: Timeline):
        self.name, self.session, self.timeline = name, session, timeline
        self.input_names, self.output_names = session.input_names, session.output_names
        self.providers = session.providers

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        outputs = self.session.run(feeds)
        self.timeline.record(self.name, start)
        return outputs


class TimedPipeline(LatentSRPipeline):
    """LatentSRPipeline whose data-consistency step is recorded in a Timeline."""

    def __init__(self, bundle, sessions: dict[str, Session], timeline: Timeline, scheduler_config=None):
        timed = {name: TimedSession(name, session, timeline) for name, session in sessions.items()}
        super().__init__(bundle, timed, scheduler_config)
        self.timeline = timeline

    def enforce_consistency(self, sr: np.ndarray, lr: np.ndarray, mode: str) -> np.ndarray:
        start = time.perf_counter()
        result = super().enforce_consistency(sr, lr, mode)
        self.timeline.record("consistency", start)
        return result


def write_test_volume(path: Path, lr_size: int, slices: int, seed: int = 0) -> Path:
    """A smooth synthetic LR volume (lr_size, lr_size, slices), int16, 1 x 1 x 4 mm, as .nii.gz: the benchmark's input.

    Timing does not depend on the content; smooth blobs keep the intensity window and consistency realistic.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    grid = np.linspace(-1, 1, lr_size)
    y, x = np.meshgrid(grid, grid, indexing="ij")
    data = np.zeros((lr_size, lr_size, slices), np.float32)
    for k in range(slices):
        for _ in range(6):
            cy, cx, r = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.1, 0.5)
            data[..., k] += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r**2) * rng.uniform(200, 800)
    affine = np.diag([1.0, 1.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(np.round(data).astype(np.int16), affine), str(path))
    return path


def _super_resolve_file(pipeline, timeline: Timeline, volume_path: Path, out_path: Path, options: SamplingOptions):
    """Load, super-resolve along axis 2 and save, recording load and save in ``timeline``; (seconds of the volume
    call, SR volume)."""
    import nibabel as nib

    from medsr.engine.volume import prepare_input, super_resolve_volume, window_percentiles
    from medsr.io.nifti import load_nifti

    begin = time.perf_counter()
    volume = load_nifti(volume_path)
    timeline.record("load", begin)
    start = time.perf_counter()
    prepared = prepare_input(volume, window_percentiles(pipeline.bundle))
    result = super_resolve_volume(prepared, volume.affine, pipeline, 2, options)
    volume_seconds = time.perf_counter() - start
    start = time.perf_counter()
    nib.save(nib.Nifti1Image(result.data, result.affine), str(out_path))
    timeline.record("save", start)
    return volume_seconds, result.data


def run_volume(bundle, sessions: dict[str, Session], volume_path: Path, out_path: Path, options: SamplingOptions):
    """Super-resolve the volume at ``volume_path`` along axis 2 and save it, every stage timed in sequence; (seconds
    per stage, SR volume).

    Stage seconds are for the whole volume (see STAGES); ``per_step`` lists every denoiser call's seconds. Timing
    each call makes the sessions synchronous and hides their ``bind`` and ``device``: this run loops through the
    host and runs its stages one after the other (:func:`run_volume_as_infer` times the run medsr-infer does).
    """
    timeline = Timeline()
    pipeline = TimedPipeline(bundle, sessions, timeline)
    begin = time.perf_counter()
    volume_seconds, data = _super_resolve_file(pipeline, timeline, volume_path, out_path, options)
    seconds = {
        "load": timeline.total("load"),
        "encode": timeline.total("vae_encoder"),
        "denoise": timeline.total("denoiser"),
        "sampler": timeline.sampler_seconds(),
        "decode": timeline.total("vae_decoder"),
        "consistency": timeline.total("consistency"),
        "save": timeline.total("save"),
        "end_to_end": time.perf_counter() - begin,
    }
    pipeline_parts = ("encode", "denoise", "sampler", "decode", "consistency")
    seconds["other"] = volume_seconds - sum(seconds[name] for name in pipeline_parts)
    seconds["per_step"] = timeline.durations("denoiser")
    return seconds, data


def staged_is_as_run(bundle, sessions: dict[str, Session]) -> bool:
    """Whether :func:`run_volume` runs these sessions as medsr-infer does: a denoiser that keeps no loop on its
    device (``bind``) and computes on the host, where the pipeline keeps its stages in sequence
    (LatentSRPipeline.engine_on_host, the rule the pipeline itself applies)."""
    return not hasattr(sessions["denoiser"], "bind") and LatentSRPipeline(bundle, sessions).engine_on_host


def run_volume_as_infer(bundle, sessions: dict[str, Session], volume_path: Path, out_path: Path, options):
    """The same run as :func:`run_volume`, untimed inside, as medsr-infer does it: the device loop where the
    denoiser binds, the host stages overlapped with an engine off the CPU; (wall seconds, load and save included,
    SR volume). Its volume equals run_volume's bit for bit (the loops and the overlap change no arithmetic)."""
    begin = time.perf_counter()
    _, data = _super_resolve_file(LatentSRPipeline(bundle, sessions), Timeline(), volume_path, out_path, options)
    return time.perf_counter() - begin, data


def scheduler_step_seconds(
    config: SchedulerConfig, latent_shape: tuple[int, ...], steps: int, repeats: int = 5
) -> float:
    """Median seconds of one NumPy scheduler step alone on a (B, C, h, w) latent, over ``steps`` steps x repeats."""
    rng = np.random.default_rng(0)
    sample = rng.standard_normal(latent_shape, dtype=np.float32)
    output = rng.standard_normal(latent_shape, dtype=np.float32)
    durations = []
    for _ in range(repeats):
        scheduler = make_scheduler(config)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            noise = rng.standard_normal(latent_shape, dtype=np.float32) if scheduler.stochastic else None
            start = time.perf_counter()
            scheduler.step(output, t, sample, noise=noise)
            durations.append(time.perf_counter() - start)
    return float(np.median(durations))
