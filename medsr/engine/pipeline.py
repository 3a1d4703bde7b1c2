"""Latent-diffusion super-resolution of 2D slices: encode the LR slice, denoise from seeded noise, decode.

Backend-agnostic: the graphs run through medsr.engine.sessions.Session objects (ONNX Runtime, TensorRT, or the
PyTorch reference modules), and the loop is the NumPy scheduler of the bundle, so every engine draws the same noise
and takes the same steps, and their outputs can be compared pixel for pixel.

Seeds: every slice draws its noise from its own generator ``np.random.default_rng([seed, slice_index])``, in a fixed
order (LR latent sample if any, initial noise, then per-step noise for stochastic samplers), so a slice's result does
not depend on the batch size or on which other slices share its batch. With shared noise (``SamplingOptions.noise``)
every slice of one stack (one orientation of a volume) draws from ``np.random.default_rng([seed, stack])`` instead:
the same field for every slice, still batch-independent (docs/conventions.md, seeds).

Device-resident sampling: when the denoiser session can bind its inputs and outputs to buffers on its device
(``bind``, medsr.engine.device_loop), the latents stay there for the whole loop and the scheduler's coefficients are
applied on the device; other sessions loop through the host. Both give the same latents.

Shapes: an in-plane task maps (N, h, w) LR slices to (N, s*h, s*w); a through-plane task maps (N, h, w) planes
whose second axis is the slice direction to (N, h, s*w) (``bundle.factors``).

Overlap: :meth:`LatentSRPipeline.super_resolve_batches` runs each batch in three stages, host in (the caller's
normalization as it draws the batch, clipping, padding, the conditioning upsampling), engine (encoder, denoising
loop, decoder) and host out (data consistency, residuals, the caller's denormalization and write). With
``overlap`` one background thread runs the host stages of batch k + 1 and k - 1 while the engine runs batch k on the
calling thread, at most one batch ahead and one behind: at GPU speed the host stages take about as long as the model
(docs/sources.md, "GPU engines"), and the engines release the GIL while they run. Every batch goes through the same
stages in the same order, so the results are the same bit for bit either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsr.bundle import Bundle
from medsr.degrade import apply_consistency, check_consistency, consistency_residual
from medsr.engine.device_loop import sample_on_device
from medsr.engine.schedulers import SchedulerConfig, make_scheduler
from medsr.engine.sessions import Session, run_outputs
from medsr.engine.tiling import check_tile_options, super_resolve_tiled
from medsr.errors import InputError, NonFiniteError, ShapeError

# trace(stage, slice_indices, array): called with each intermediate stage of each batch, for the parity harness.
Trace = Callable[[str, Sequence[int], np.ndarray], None]
#: Noise of SamplingOptions.noise: one generator per slice, or one field shared by every slice of a stack.
NOISE_MODES = ("per-plane", "shared")


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample. None means the bundle's choice: its default steps, its LR-latent mode, its consistency.

    ``consistency``: after decoding, make the SR slice agree with the measured LR slice through the bundle's
    degradation operator, with all its parameters (medsr.degrade.apply_consistency): ``"kspace"`` replaces the SR's
    central k-space block by the LR's (a ``kspace`` degradation only); ``"backproject"`` iterates back-projection;
    ``"none"`` leaves the decoder output as it is.

    ``tile_size``: slices whose SR has a side longer than this many LR pixels times the scale s run in overlapping
    tiles of that many LR pixels, sharing at least ``tile_overlap`` LR pixels, blended in the SR domain
    (medsr.engine.tiling); None never tiles. In-plane that is an LR side longer than ``tile_size``; through-plane,
    where the planes' first axis is not upsampled, a plane of 217 x 45 LR pixels at x4 (217 x 180) runs whole.
    ``batch_size`` then counts tiles.

    ``noise``: ``"per-plane"`` seeds slice i with ``default_rng([seed, i])``; ``"shared"`` gives every slice of one
    stack the field of ``default_rng([seed, stack])`` (``super_resolve``'s ``stack``), which removes the
    discontinuities of independent noise between stacked slices (docs/conventions.md, seeds).
    """

    steps: int | None = None
    seed: int = 0
    batch_size: int = 4
    lr_latent: str | None = None
    consistency: str | None = None
    tile_size: int | None = 128
    tile_overlap: int = 32
    noise: str = "per-plane"

    def __post_init__(self):
        if self.noise not in NOISE_MODES:
            raise InputError(f"noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")

    def generators(self, indices: Sequence[int], stack: int = 0) -> list[np.random.Generator]:
        """The noise generator of each slice index (see ``noise``), all fresh, so each slice draws on its own."""
        keys = [[self.seed, stack] if self.noise == "shared" else [self.seed, index] for index in indices]
        return [np.random.default_rng(key) for key in keys]


@dataclass(frozen=True)
class SRResult:
    """SR slices (N, f_H*h, f_W*w) float32 in the model range (``bundle.factors``), and the consistency residual
    ||A(SR) - LR|| / ||LR|| of each slice (N,) under the bundle's degradation operator
    (``bundle.manifest.task.degradation``)."""

    images: np.ndarray
    residuals: np.ndarray


@dataclass(frozen=True)
class PlaneBatch:
    """A batch of LR planes for :meth:`LatentSRPipeline.super_resolve_batches`.

    ``lr``: (n, h, w) normalized to the model range, not clipped (data consistency sees the measured values);
    plane i is seeded as index ``first_index + i`` of ``stack`` (SamplingOptions.generators); ``key``: where its
    result goes, handed back to the sink with it.
    """

    lr: np.ndarray
    first_index: int = 0
    stack: int = 0
    key: Any = None


#: ``sink(batch, result)``: receives each batch's SRResult, in batch order, on the host-stage thread.
Sink = Callable[[PlaneBatch, SRResult], None]


@dataclass(frozen=True)
class _HostBatch:
    """A batch after its host-in stage: the measured planes as float32, the network input (None: the planes run in
    tiles), and the seeds."""

    batch: PlaneBatch
    measured: np.ndarray
    image: np.ndarray | None
    rngs: list[np.random.Generator]
    indices: list[int]


class _Inline:
    """The executor of ``overlap=False``: each task runs at once on the calling thread."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - re-raised by result(), where the overlapped run raises it too
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def pad_to_multiple(images: np.ndarray, multiple: int) -> np.ndarray:
    """Pad (N, H, W) at the bottom and right to multiples of ``multiple`` by mirroring (edge repeat when the pad is
    larger than the image). Crop the result back with the original size times the scale."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return images
    widths = [(0, 0)] * (images.ndim - 2) + [(0, pad_h), (0, pad_w)]
    mode = "symmetric" if pad_h <= height and pad_w <= width else "edge"
    return np.pad(images, widths, mode=mode)


def _check_finite(stage: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise NonFiniteError(f"NaN/Inf in stage {stage}: the model or its precision is numerically unstable")


class LatentSRPipeline:
    """encode -> denoise loop -> decode over batches of LR slices already normalized to the model's range.

    Args:
        bundle: the validated bundle (scale, latent convention, scheduler defaults).
        sessions: a Session per graph name (``vae_encoder``, ``vae_decoder``, ``denoiser``).
        scheduler_config: overrides the bundle's scheduler (e.g. another sampler); default: the bundle's.
    """

    def __init__(self, bundle: Bundle, sessions: dict[str, Session], scheduler_config: SchedulerConfig | None = None):
        self.bundle = bundle
        self.sessions = sessions
        self.scheduler_config = scheduler_config or bundle.manifest.scheduler
        self.scaling_factor = bundle.manifest.vae.scaling_factor
        self.shift_factor = bundle.manifest.vae.shift_factor
        self.conditioning = bundle.conditioning
        self.degradation = bundle.manifest.task.degradation

    @property
    def engine_on_host(self) -> bool:
        """Whether the denoiser computes on the host CPU (its session's ``device``; "cpu" when it has none). The
        engine then keeps every core busy, so overlapping the host stages with it gains nothing: measured 0.97x (2
        cores, ONNX Runtime, benchmarks/results/volume-overlap-cpu.md)."""
        return getattr(self.sessions["denoiser"], "device", "cpu") == "cpu"

    def super_resolve(
        self,
        lr: np.ndarray,
        options: SamplingOptions = SamplingOptions(),
        progress: Callable[[int], None] | None = None,
        trace: Trace | None = None,
        first_index: int = 0,
        stack: int = 0,
        overlap: bool | None = None,
    ) -> SRResult:
        """Super-resolve (N, h, w) LR slices normalized to the model range to (N, f_H*h, f_W*w) float32 (the
        bundle's factors: s x s in-plane, 1 x s through-plane).

        Values outside [-1, 1] are clipped for the networks only: data consistency and the residual use the LR as
        given, because it is the measured data.

        ``progress(n)`` is called after each batch with the number of slices it held. Slice i is seeded and traced
        as index ``first_index + i`` (a volume's frames continue the numbering); with shared noise every slice uses
        the field of ``stack`` (SamplingOptions.noise). Slices larger than ``options.tile_size`` run in tiles, one
        slice at a time, and are not traced. ``overlap``: see :meth:`super_resolve_batches`.
        """
        if lr.ndim != 3:
            raise ShapeError(f"expected LR slices shaped (N, H, W), got {lr.shape}")
        if options.batch_size < 1:
            raise ShapeError(f"batch size must be >= 1, got {options.batch_size}")
        f_h, f_w = self.bundle.factors
        out = np.empty((lr.shape[0], lr.shape[1] * f_h, lr.shape[2] * f_w), dtype=np.float32)
        residuals = np.empty(lr.shape[0], dtype=np.float64)

        def sink(batch: PlaneBatch, result: SRResult) -> None:
            out[batch.key : batch.key + len(result.images)] = result.images
            residuals[batch.key : batch.key + len(result.images)] = result.residuals

        batches = (
            PlaneBatch(lr[start : start + options.batch_size], first_index + start, stack, key=start)
            for start in range(0, lr.shape[0], options.batch_size)
        )
        if lr.shape[0] <= options.batch_size:
            overlap = False  # one batch: nothing to overlap, no thread to start (a server's request)
        self.super_resolve_batches(batches, options, sink, progress, trace, overlap)
        return SRResult(images=out, residuals=residuals)

    def super_resolve_batches(
        self,
        batches: Iterable[PlaneBatch],
        options: SamplingOptions,
        sink: Sink,
        progress: Callable[[int], None] | None = None,
        trace: Trace | None = None,
        overlap: bool | None = None,
    ) -> None:
        """Super-resolve every batch of ``batches`` (each as it is, whatever ``options.batch_size``) and hand its
        data-consistent SRResult to ``sink``, in order (``super_resolve`` for the arguments).

        ``overlap``: the host stages run on one background thread, ``batches`` is drawn and ``sink`` called there,
        one batch ahead of the engine and one behind (module docstring); the engine runs on the calling thread, and
        so do ``progress`` and ``trace``. None: overlap when the engine leaves the host free
        (:attr:`engine_on_host` is False). An error of any stage is raised here; on any exception the host stage
        under way is waited for and nothing later runs.
        """
        if overlap is None:
            overlap = not self.engine_on_host
        consistency = options.consistency or self.bundle.manifest.task.consistency
        check_consistency(consistency, self.degradation)
        pool = ThreadPoolExecutor(1, thread_name_prefix="medsr-host") if overlap else _Inline()
        iterator = iter(batches)
        try:
            preparing = pool.submit(self._host_in, iterator, options)
            finishing: Future | None = None
            while (staged := preparing.result()) is not None:
                preparing = pool.submit(self._host_in, iterator, options)
                sr = self._engine_stage(staged, options, trace)
                if finishing is not None:
                    _report(progress, finishing.result())
                finishing = pool.submit(self._host_out, staged, sr, consistency, sink)
            if finishing is not None:
                _report(progress, finishing.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _host_in(self, batches: Iterator[PlaneBatch], options: SamplingOptions) -> _HostBatch | None:
        """The next batch drawn and made ready for the engine; None when there is none."""
        batch = next(batches, None)
        if batch is None:
            return None
        if batch.lr.ndim != 3:
            raise ShapeError(f"expected LR slices shaped (N, H, W), got {batch.lr.shape}")
        measured = np.asarray(batch.lr, dtype=np.float32)
        indices = [batch.first_index + i for i in range(measured.shape[0])]
        rngs = options.generators(indices, batch.stack)
        image = None if self._tiled(measured.shape, options) else self.network_image(np.clip(measured, -1.0, 1.0))
        return _HostBatch(batch, measured, image, rngs, indices)

    def _tiled(self, shape: Sequence[int], options: SamplingOptions) -> bool:
        """Whether (n, h, w) LR planes run in tiles (SamplingOptions.tile_size)."""
        f_h, f_w = self.bundle.factors
        side = max(shape[-2] * f_h, shape[-1] * f_w)
        return options.tile_size is not None and side > options.tile_size * self.bundle.scale

    def _engine_stage(self, staged: _HostBatch, options: SamplingOptions, trace: Trace | None) -> np.ndarray:
        """The SR planes of a staged batch before data consistency, (n, f_H*h, f_W*w) float32."""
        if staged.image is None:
            return self._super_resolve_tiled(staged.measured, staged.rngs, options)
        size = staged.measured.shape[1:]
        return self._sr_planes(staged.image, size, staged.rngs, staged.indices, options.steps, options.lr_latent, trace)

    def _host_out(self, staged: _HostBatch, sr: np.ndarray, consistency: str, sink: Sink) -> int:
        """Data consistency and residuals of a batch's SR planes, handed to ``sink``; the number of planes."""
        images = self.enforce_consistency(sr, staged.measured, consistency).astype(np.float32, copy=False)
        residuals = consistency_residual(images, staged.measured, self.degradation)
        sink(staged.batch, SRResult(images=images, residuals=residuals))
        return len(images)

    def _super_resolve_tiled(
        self, lr: np.ndarray, rngs: list[np.random.Generator], options: SamplingOptions
    ) -> np.ndarray:
        """(n, h, w) measured planes through medsr.engine.tiling one at a time (each padded to the size unit
        first), before data consistency."""
        size, overlap = check_tile_options(options.tile_size, options.tile_overlap, self.bundle.lr_multiple)
        height, width = lr.shape[1:]
        f_h, f_w = self.bundle.factors
        out = np.empty((lr.shape[0], height * f_h, width * f_w), dtype=np.float32)
        for i, rng in enumerate(rngs):
            padded = pad_to_multiple(np.clip(lr[i : i + 1], -1.0, 1.0), self.bundle.lr_multiple)[0]
            out[i] = super_resolve_tiled(self, padded, rng, options, size, overlap)[: height * f_h, : width * f_w]
        return out

    def enforce_consistency(self, sr: np.ndarray, lr: np.ndarray, mode: str) -> np.ndarray:
        """Data consistency of (B, f_H*h, f_W*w) SR slices with their (B, h, w) LR slices (see SamplingOptions)."""
        return apply_consistency(sr, lr, mode, self.degradation)

    def network_image(self, lr: np.ndarray) -> np.ndarray:
        """The encoder's input for (B, h, w) LR slices clipped to [-1, 1]: padded to the size unit, upsampled as the
        conditioning asks, repeated over the image channels; (B, C_img, H, W) float32."""
        padded = pad_to_multiple(lr, self.bundle.lr_multiple)
        image = self.conditioning.image(padded, self.bundle.scale)
        return np.repeat(image[:, None], self.bundle.image_channels, axis=1)

    def run_batch(
        self,
        lr: np.ndarray,
        rngs: list[np.random.Generator],
        indices: list[int],
        steps: int | None = None,
        lr_latent: str | None = None,
        trace: Trace | None = None,
    ) -> np.ndarray:
        """One batch of LR slices (B, h, w), already clipped to [-1, 1], through encoder, denoising loop and decoder:
        (B, f_H*h, f_W*w) float32 before data consistency. Slice b draws all its noise from ``rngs[b]`` and is traced
        as ``indices[b]``; a server passes the generators of each request's own (seed, index), as
        `SamplingOptions.generators` makes them for a volume."""
        return self._sr_planes(self.network_image(lr), lr.shape[-2:], rngs, indices, steps, lr_latent, trace)

    def _sr_planes(
        self,
        image: np.ndarray,
        lr_size: Sequence[int],
        rngs: list[np.random.Generator],
        indices: Sequence[int],
        steps: int | None,
        lr_latent: str | None,
        trace: Trace | None,
    ) -> np.ndarray:
        """The encoder's input (B, C_img, H, W) of LR planes of ``lr_size`` (h, w) through encoder, denoising loop
        and decoder: (B, f_H*h, f_W*w), averaged over the image channels, padding cropped."""
        z_lr = self.encode(image, rngs, lr_latent or self.bundle.manifest.vae.lr_latent)
        _emit(trace, "lr_latent", indices, z_lr)
        latent = self.denoise(z_lr, rngs, steps, indices, trace)
        _emit(trace, "final_latent", indices, latent)
        decoded = self.decode(latent)
        _emit(trace, "decoded_image", indices, decoded)
        (f_h, f_w), (height, width) = self.bundle.factors, lr_size
        return decoded.mean(axis=1)[:, : height * f_h, : width * f_w]

    def autoencode(self, images: np.ndarray) -> np.ndarray:
        """decode(encode(x)) of (N, H, W) slices in [-1, 1]: the autoencoder ceiling, posterior mean, (N, H, W).

        What the harness compares SR with: no diffusion model can beat its own autoencoder's reconstruction of HR.
        """
        height, width = images.shape[-2:]
        padded = pad_to_multiple(np.asarray(images, np.float32), self.bundle.vae_factor)
        latent = self.encode(np.repeat(padded[:, None], self.bundle.image_channels, axis=1), [], "mean")
        return self.decode(latent).mean(axis=1)[:, :height, :width].astype(np.float32)

    def encode(
        self, image: np.ndarray, rngs: list[np.random.Generator], lr_latent: str, eps: np.ndarray | None = None
    ) -> np.ndarray:
        """(B, C_img, H, W) -> scaled latent z = (latent - shift) * scale, the posterior mean or a seeded sample.

        ``eps``: the posterior's standard normal noise, instead of drawing it from ``rngs`` (tiles pass crops).
        """
        if lr_latent not in ("mean", "sample"):
            raise ShapeError(f"lr_latent must be 'mean' or 'sample', got {lr_latent!r}")
        names = ("latent_mean", "latent_logvar") if lr_latent == "sample" else ("latent_mean",)
        moments = run_outputs(self.sessions["vae_encoder"], {"image": image}, names)
        mean = moments["latent_mean"]
        _check_finite("vae_encoder", mean)
        if lr_latent == "sample":
            if eps is None:
                eps = np.stack([rng.standard_normal(mean.shape[1:], dtype=np.float32) for rng in rngs])
            mean = mean + np.exp(0.5 * moments["latent_logvar"]) * eps
        return ((mean - self.shift_factor) * self.scaling_factor).astype(np.float32)

    def denoise(
        self,
        z_lr: np.ndarray,
        rngs: list[np.random.Generator],
        steps: int | None,
        indices: Sequence[int],
        trace: Trace | None = None,
    ) -> np.ndarray:
        """Run the sampler from seeded noise to the HR latent (B, C_lat, f_H*h, f_W*w), conditioned on ``z_lr`` (the
        latent of the LR slices (B, C_lat, h, w), or of their upsampling to (B, C_lat, f_H*h, f_W*w))."""
        factors = self.bundle.factors
        (z_h, z_w) = (f // z for f, z in zip(factors, self.conditioning.zooms(factors)))
        shape = (z_lr.shape[1], z_lr.shape[2] * z_h, z_lr.shape[3] * z_w)

        def draw() -> np.ndarray:
            return np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in rngs])

        return self.sample_latents(z_lr, draw(), draw, steps, indices, trace)

    def sample_latents(
        self,
        z_lr: np.ndarray,
        noise: np.ndarray,
        draw_noise: Callable[[], np.ndarray],
        steps: int | None,
        indices: Sequence[int] = (),
        trace: Trace | None = None,
        chunk: int | None = None,
    ) -> np.ndarray:
        """The sampler loop from standard normal ``noise`` (B, C_lat, f_H*h, f_W*w) to the HR latent.

        ``draw_noise()`` gives each step's noise for stochastic samplers; the denoiser runs on at most ``chunk`` items
        at a time (all of them when None), while the scheduler steps the whole stack at once.

        A denoiser with ``bind`` keeps the latents on its device (medsr.engine.device_loop) and the final latent is
        checked for NaN/Inf once; otherwise each step's output crosses to the host and is checked there.
        """
        scheduler = make_scheduler(self.scheduler_config)
        scheduler.set_timesteps(steps or self.scheduler_config.default_steps)
        sample = (noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        chunk = chunk or sample.shape[0]
        bind = getattr(self.sessions["denoiser"], "bind", None)
        if bind is not None:

            def emit(k: int, output: np.ndarray) -> None:
                _emit(trace, f"denoiser_output[{k}]", indices, output)

            latent = sample_on_device(scheduler, bind, z_lr, sample, draw_noise, chunk, emit if trace else None)
            if latent is not None:
                steps_run = len(scheduler.timesteps)
                _check_finite(f"denoising loop ({steps_run} steps on the device, checked at its end)", latent)
                return latent
        for k, t in enumerate(scheduler.timesteps):
            output = np.concatenate(
                [
                    self._denoise_once(sample[a : a + chunk], z_lr[a : a + chunk], t)
                    for a in range(0, sample.shape[0], chunk)
                ]
            )
            _check_finite(f"denoiser step {k} (t={t})", output)
            _emit(trace, f"denoiser_output[{k}]", indices, output)
            noise = draw_noise() if scheduler.stochastic else None
            sample = scheduler.step(output, t, sample, noise=noise).prev_sample.astype(np.float32)
        _check_finite("sampler", sample)
        return sample

    def _denoise_once(self, sample: np.ndarray, z_lr: np.ndarray, t) -> np.ndarray:
        timestep = np.full((sample.shape[0],), t, dtype=np.float32)
        return self.sessions["denoiser"].run({"sample": sample, "lr_latent": z_lr, "timestep": timestep})[
            "model_output"
        ]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """Scaled HR latent -> (B, C_img, H, W) image in about [-1, 1]."""
        unscaled = (latent / self.scaling_factor + self.shift_factor).astype(np.float32)
        image = self.sessions["vae_decoder"].run({"latent": unscaled})["image"]
        _check_finite("vae_decoder", image)
        return image


def _emit(trace: Trace | None, stage: str, indices: Sequence[int], array: np.ndarray) -> None:
    if trace is not None:
        trace(stage, indices, array)


def _report(progress: Callable[[int], None] | None, done: int) -> None:
    if progress is not None:
        progress(done)
