"""The sampler loop with its latents left where the denoiser runs (device-resident sampling).

The host loop of medsr.engine.pipeline copies every step's sample to the engine and its output back, steps the
NumPy scheduler and concatenates chunks. Here the denoiser is *bound* once per input shape to fixed buffers
(:class:`BoundGraph`: ONNX Runtime IOBinding, TensorRT's device buffers), and for the whole loop the noisy sample,
the LR latent (uploaded once per batch) and the model output stay in them. The NumPy scheduler stays the one source
of truth: it computes each step's coefficients on the host (`trajectory_coefficients`), and the binding's arrays
apply them in place (:meth:`HostArrays.step`: NumPy for ONNX Runtime's CPU binding, whose "device" is host memory;
:meth:`CupyArrays.step`: one fused CuPy kernel, medsr.engine.step_kernel, on the engine's CUDA stream).

The step arithmetic runs in float64 and is rounded to float32 once per step, as ``scheduler.step`` does on the host,
and the history of multistep solvers stays float64 as it does there, so both loops feed the denoiser the same
float32 samples (tests/test_device_loop.py finds them bit-identical for every sampler). Stochastic samplers draw
each step's noise on the host from the same generators, in the host loop's order, so seeds give the same results on
every engine; it is drawn and uploaded before the loop, once per batch (within :data:`NOISE_BUDGET_BYTES`). Nothing
is checked per step: the caller checks the final latent once. A ``trace`` downloads each step's model output to the
host, one copy per step, and only then.

Whole-loop CUDA graphs: a binding that can be captured (:class:`CapturableGraph`: TensorRT at a static shape) runs
the whole trajectory of one batch (every step's timestep, engine and sampler step) as one CUDA graph, so a batch
costs one launch instead of three per step. The first batch of a (binding, trajectory) runs step by step, which also
does the lazy setup a capture cannot (kernel compilation, TensorRT's first run); the second is captured, and it and
every later batch replay the graph. The graph reads its inputs from fixed buffers: the sample, the LR latent and
every step's noise (drawn up front, in the order the step-by-step loop draws it) are uploaded there before each
launch; a trajectory whose noise exceeds :data:`NOISE_BUDGET_BYTES` runs step by step. A capture that fails is
abandoned with one warning naming CUDA's reason and the loop goes on step by step. ONNX Runtime's run cannot be
captured from outside (it replays its own graph per step, medsr.engine.sessions).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from medsr.engine.schedulers import StepCoefficients, apply_coefficients, trajectory_coefficients
from medsr.engine.step_kernel import cupy_step_kernel, step_scalars
from medsr.errors import BackendError

CUPY_HINT = "pip install 'cupy-cuda12x[ctk]' ('cupy-cuda13x[ctk]' for CUDA 13; the gpu-cu12/gpu-cu13 extras have it)"
#: device memory the noise of a whole trajectory may take to be uploaded before the loop, once per batch; beyond it
#: each step's noise is uploaded at its step: one more host call per step, and a copy from pageable host memory is
#: staged through the driver's bounce buffers, which a large copy must wait for while the stream drains
NOISE_BUDGET_BYTES = 256 * 2**20
#: trajectories (step counts, samplers) a binding keeps captured, with their buffers; a server asked for many step
#: counts releases the least recently used
LOOPS_PER_BINDING = 4


class HostArrays:
    """NumPy as the device of a CPU binding: its buffers are host arrays that the engine reads and writes in
    place (ONNX Runtime binds CPU OrtValues over them without copying)."""

    xp = np
    #: the exceptions the array module raises for a CUDA call that fails (none on the host)
    errors: tuple[type[BaseException], ...] = ()

    def empty(self, shape: Sequence[int], dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def upload(self, host: np.ndarray, device: np.ndarray) -> None:
        np.copyto(device, host, casting="same_kind")

    def download(self, device: np.ndarray) -> np.ndarray:
        return np.array(device)

    def fill(self, device: np.ndarray, value: float) -> None:
        device.fill(value)

    def copy(self, destination: np.ndarray, source: np.ndarray) -> None:
        """Device to device, same shape."""
        destination[...] = source

    def step(self, coeffs: StepCoefficients, sample, output, history, noise=None) -> None:
        """One sampler step in place: ``sample`` (float32) becomes the step's prev_sample rounded once to
        float32, ``history`` (float64, shaped like it) its pred_original_sample; ``noise`` (float32) is read
        where the step adds noise."""
        step = apply_coefficients(
            coeffs,
            sample.astype(np.float64),
            output.astype(np.float64),
            history,
            None if noise is None else noise.astype(np.float64),
            xp=self.xp,
        )
        sample[...] = step.prev_sample  # the one rounding to float32 of each step, as scheduler.step's astype
        history[...] = step.pred_original_sample

    def active(self):
        return contextlib.nullcontext()


class CupyArrays(HostArrays):
    """CuPy on one CUDA stream: views of device buffers an engine owns, and host transfers ordered on the stream.

    ``stream`` is a ``cupy.cuda.Stream`` or ``ExternalStream``; the loop runs its steps inside :meth:`active`, so
    they queue behind the engine's work on the same stream without a host synchronization.
    """

    def __init__(self, cupy, stream):
        self.cupy, self.xp, self.stream = cupy, cupy, stream

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        return (self.cupy.cuda.runtime.CUDARuntimeError, self.cupy.cuda.driver.CUDADriverError)

    def empty(self, shape: Sequence[int], dtype):
        with self.stream:
            return self.cupy.zeros(shape, dtype)

    def view(self, address: int, shape: Sequence[int], dtype, owner=None):
        """The device buffer at ``address`` as a CuPy array (no copy); ``owner`` is kept alive with it."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        memory = self.cupy.cuda.UnownedMemory(int(address), nbytes, owner)
        return self.cupy.ndarray(tuple(shape), dtype, self.cupy.cuda.MemoryPointer(memory, 0))

    def upload(self, host: np.ndarray, device) -> None:
        device.set(np.ascontiguousarray(host, dtype=device.dtype), stream=self.stream)

    def download(self, device) -> np.ndarray:
        return device.get(stream=self.stream)

    def step(self, coeffs: StepCoefficients, sample, output, history, noise=None) -> None:
        """:meth:`HostArrays.step` as one kernel launch that allocates nothing (medsr.engine.step_kernel), so a
        CUDA graph can capture it; bit-identical to it."""
        kernel = cupy_step_kernel(self.cupy)
        kernel(output, output if noise is None else noise, *step_scalars(coeffs), sample, history)

    def active(self):
        return self.stream


class _StreamHandle:
    """A raw CUDA stream handle under the CUDA stream protocol (``__cuda_stream__``: (version 0, the handle))."""

    def __init__(self, handle: int):
        self.handle = int(handle)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


def external_stream(cupy, handle: int):
    """CuPy's view of a CUDA stream another library created and owns (TensorRT's session stream): CuPy 14's
    ``Stream.from_external`` (it deprecates ``ExternalStream`` with a warning), ``ExternalStream`` before it."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(int(handle))
    return from_external(_StreamHandle(handle))


@functools.cache
def import_cupy():
    """The ``cupy`` module, or None when it is not installed (then the GPU engines loop through the host)."""
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@functools.cache
def warn_without_cupy(engine: str) -> None:
    """Say once per process and engine that the GPU loop runs through the host for want of CuPy."""
    warnings.warn(
        f"{engine}: CuPy is not installed, so every denoising step copies the latents through the host; "
        f"{CUPY_HINT} keeps them on the GPU for the whole loop",
        stacklevel=3,
    )


class BoundGraph(Protocol):
    """A graph bound once to buffers of fixed shapes: ``inputs`` and ``outputs`` are arrays of ``arrays.xp``
    that :meth:`run` reads and overwrites in place (asynchronously, on ``arrays``' stream, on a GPU)."""

    arrays: HostArrays
    inputs: dict[str, Any]
    outputs: dict[str, Any]

    def run(self) -> None: ...


class CapturableGraph(BoundGraph, Protocol):
    """A BoundGraph whose run a CUDA graph can capture within a larger one. ``capturable`` is False where it
    cannot (a dynamic shape, or a capture that failed); ``loops`` holds this module's :class:`CapturedLoop` of each
    trajectory (at most :data:`LOOPS_PER_BINDING`, the least recently used released first), whose graphs the binding
    destroys when it closes."""

    capturable: bool
    loops: dict

    def enqueue(self) -> None:
        """Queue the engine on the stream as it is (no graph of its own, no synchronization)."""

    def capture(self, work: Callable[[], None]):
        """``work()`` recorded on the stream as an executable CUDA graph, not run (abandoned if it raises)."""

    def launch(self, graph) -> None: ...

    def release(self, graph) -> None:
        """Destroy a graph :meth:`capture` made."""


#: ``bind(input shapes, output shapes) -> BoundGraph``, or None where the session cannot keep the loop on its device
Bind = Callable[[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]], "BoundGraph | None"]


@dataclass
class CapturedLoop:
    """One trajectory on one capturable binding: the device buffers its graph reads besides the binding's own
    (the float64 history, and the noise of each of the m steps that add noise, (m, B, C, h, w) float32), and the
    graph once captured (None while the first batch of the trajectory runs step by step)."""

    history: Any
    noise: Any
    graph: Any = None


def sample_on_device(
    scheduler,
    bind: Bind,
    z_lr: np.ndarray,
    sample: np.ndarray,
    draw_noise: Callable[[], np.ndarray],
    chunk: int,
    emit: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray | None:
    """The loop of ``scheduler`` (timesteps set) from the scaled initial ``sample`` (B, C, h, w) float32 to the
    final latent, on the host; None when ``bind`` offers no binding (the caller then loops on the host).

    The denoiser runs on at most ``chunk`` items at a time. With one chunk the loop's state is the binding's own
    buffers; with several, the stack lives in loop-owned device arrays and each chunk is copied into its binding
    (device to device) before it runs, since chunks of one shape share one binding. ``emit(k, output)``, when
    given, receives each step's model output on the host (and rules out a whole-loop graph).
    """
    batch = sample.shape[0]
    parts = []
    for a in range(0, batch, chunk):
        b = min(a + chunk, batch)
        shapes = {"sample": (b - a, *sample.shape[1:]), "lr_latent": (b - a, *z_lr.shape[1:]), "timestep": (b - a,)}
        bound = bind(shapes, {"model_output": shapes["sample"]})
        if bound is None:
            return None
        parts.append((a, b, bound))
    coefficients = trajectory_coefficients(scheduler)
    arrays = parts[0][2].arrays
    with arrays.active():
        only = parts[0][2] if len(parts) == 1 else None
        noisy = [k for k, coeffs in enumerate(coefficients) if coeffs.needs_noise]
        noise_fits = len(noisy) * sample.nbytes <= NOISE_BUDGET_BYTES
        if only is not None and emit is None and noise_fits and getattr(only, "capturable", False):
            return _sample_captured(only, scheduler, coefficients, noisy, z_lr, sample, draw_noise)
        if only is not None:
            x, lr, out = only.inputs["sample"], only.inputs["lr_latent"], only.outputs["model_output"]
        else:
            x, lr, out = (arrays.empty(shape, np.float32) for shape in (sample.shape, z_lr.shape, sample.shape))
        arrays.upload(sample, x)
        arrays.upload(z_lr, lr)
        history = arrays.empty(sample.shape, np.float64)
        if not scheduler.stochastic:
            noise_at = {}.get
        elif noise_fits:
            buffer = arrays.empty((len(noisy), *sample.shape), np.float32)
            noise_at = _upload_noise(arrays, coefficients, noisy, draw_noise, buffer).get
        else:
            noise = arrays.empty(sample.shape, np.float32)

            def noise_at(k: int):
                drawn = draw_noise()  # drawn at every step, as the host loop does, so the streams stay aligned
                if not coefficients[k].needs_noise:
                    return None
                arrays.upload(drawn, noise)
                return noise

        def run_chunks(t) -> None:
            for a, b, bound in parts:
                if only is None:
                    arrays.copy(bound.inputs["sample"], x[a:b])
                    arrays.copy(bound.inputs["lr_latent"], lr[a:b])
                arrays.fill(bound.inputs["timestep"], t)
                bound.run()
                if only is None:
                    arrays.copy(out[a:b], bound.outputs["model_output"])

        _run_steps(arrays, scheduler, coefficients, run_chunks, x, out, history, noise_at, emit)
        return arrays.download(x)


def _run_steps(arrays, scheduler, coefficients, run, x, out, history, noise_at, emit=None) -> None:
    """The trajectory on device arrays: at each step ``run(t)`` (the denoiser from ``x`` into ``out``), ``emit``
    of its output when given, then the sampler step into ``x`` and ``history`` with ``noise_at(k)``."""
    for k, t in enumerate(scheduler.timesteps):
        run(t)
        if emit is not None:
            emit(k, arrays.download(out))
        arrays.step(coefficients[k], x, out, history, noise_at(k))


def _sample_captured(
    bound: CapturableGraph,
    scheduler,
    coefficients: list[StepCoefficients],
    noisy: list[int],
    z_lr: np.ndarray,
    sample: np.ndarray,
    draw_noise: Callable[[], np.ndarray],
) -> np.ndarray:
    """One batch on a capturable binding: step by step on the first use of this trajectory, then as one CUDA
    graph (captured on the second use, replayed from then on)."""
    arrays = bound.arrays
    x, lr, out = bound.inputs["sample"], bound.inputs["lr_latent"], bound.outputs["model_output"]
    key = (tuple(float(t) for t in scheduler.timesteps), tuple(coefficients))
    loop = bound.loops.pop(key, None)
    first_use = loop is None
    if first_use:
        while len(bound.loops) >= LOOPS_PER_BINDING:
            oldest = bound.loops.pop(next(iter(bound.loops)))
            if oldest.graph is not None:
                bound.release(oldest.graph)
        noise = arrays.empty((len(noisy), *sample.shape), np.float32)
        loop = CapturedLoop(arrays.empty(sample.shape, np.float64), noise)
    bound.loops[key] = loop  # last: the most recently used
    arrays.upload(sample, x)
    arrays.upload(z_lr, lr)
    arrays.fill(loop.history, 0.0)  # as the step-by-step loop starts (no sampler reads it at its first step)
    slots = _upload_noise(arrays, coefficients, noisy, draw_noise, loop.noise) if scheduler.stochastic else {}

    def run_engine(t) -> None:
        arrays.fill(bound.inputs["timestep"], t)
        bound.enqueue()

    def enqueue_trajectory() -> None:
        _run_steps(arrays, scheduler, coefficients, run_engine, x, out, loop.history, slots.get)

    if loop.graph is None and not first_use:  # the first use ran step by step: kernels compiled, engine set up
        try:
            loop.graph = bound.capture(enqueue_trajectory)
        except (BackendError, *arrays.errors) as exc:  # CUDA refused part of the loop: never capture it again here
            bound.capturable = False
            _warn_capture_failed(f"{type(exc).__name__}: {exc}")
    if loop.graph is not None:
        bound.launch(loop.graph)
    else:
        enqueue_trajectory()
    return arrays.download(x)


def _upload_noise(arrays: HostArrays, coefficients: list, noisy: list[int], draw_noise, buffer) -> dict[int, Any]:
    """Every step's noise drawn now, one draw per step in the order the step-by-step loop draws it (so seeds give
    the same results), and that of the steps ``noisy`` (those that add noise) uploaded into ``buffer``
    (m, B, C, h, w), one slot each; {step index: its noise on the device}."""
    slots = {k: buffer[slot] for slot, k in enumerate(noisy)}
    for k in range(len(coefficients)):
        drawn = draw_noise()
        if k in slots:
            arrays.upload(drawn, slots[k])
    return slots


@functools.cache
def _warn_capture_failed(reason: str) -> None:
    """Say once per process and reason that a whole-loop capture failed."""
    warnings.warn(
        f"the denoising loop could not be captured as one CUDA graph ({reason}); it runs step by step",
        stacklevel=4,
    )
