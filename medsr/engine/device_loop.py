"""The sampler loop with its latents left where the denoiser runs (device-resident sampling).

The host loop of medsr.engine.pipeline copies every step's sample to the engine and its output back, steps the
NumPy scheduler and concatenates chunks. Here the denoiser is *bound* once per input shape to fixed buffers
(:class:`BoundGraph`: ONNX Runtime IOBinding, TensorRT's device buffers), and for the whole loop the noisy sample,
the LR latent (uploaded once per batch) and the model output stay in them. The NumPy scheduler stays the one source
of truth: it computes each step's coefficients on the host (`trajectory_coefficients`), and the binding's array
module applies them (`apply_coefficients` with ``xp``: CuPy on the engine's CUDA stream, NumPy for ONNX Runtime's
CPU binding, whose "device" is host memory).

The step arithmetic runs in float64 and is rounded to float32 once per step, as ``scheduler.step`` does on the host,
and the history of multistep solvers stays float64 as it does there, so both loops feed the denoiser the same
float32 samples (tests/test_device_loop.py finds them bit-identical for every sampler). Stochastic samplers draw each
step's noise on the host from the same generators, at the same point of the loop, and upload it, so seeds give the
same results on every engine. Nothing is checked per step: the caller checks the final latent once. A ``trace``
downloads each step's model output to the host, one copy per step, and only then.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from medsr.engine.schedulers import apply_coefficients, trajectory_coefficients

CUPY_HINT = "pip install cupy-cuda12x (cupy-cuda13x for CUDA 13)"


class HostArrays:
    """NumPy as the device of a CPU binding: its buffers are host arrays that the engine reads and writes in
    place (ONNX Runtime binds CPU OrtValues over them without copying)."""

    xp = np

    def empty(self, shape: Sequence[int], dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def upload(self, host: np.ndarray, device: np.ndarray) -> None:
        np.copyto(device, host, casting="same_kind")

    def download(self, device: np.ndarray) -> np.ndarray:
        return np.array(device)

    def active(self):
        return contextlib.nullcontext()


class CupyArrays:
    """CuPy on one CUDA stream: views of device buffers an engine owns, and host transfers ordered on the stream.

    ``stream`` is a ``cupy.cuda.Stream`` or ``ExternalStream``; the loop runs its elementwise steps inside
    :meth:`active`, so they queue behind the engine's work on the same stream without a host synchronization.
    """

    def __init__(self, cupy, stream):
        self.cupy, self.xp, self.stream = cupy, cupy, stream

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

    def active(self):
        return self.stream


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

    arrays: HostArrays | CupyArrays
    inputs: dict[str, Any]
    outputs: dict[str, Any]

    def run(self) -> None: ...


#: ``bind(input shapes, output shapes) -> BoundGraph``, or None where the session cannot keep the loop on its device
Bind = Callable[[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]], "BoundGraph | None"]


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
    given, receives each step's model output on the host.
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
    arrays = parts[0][2].arrays
    xp = arrays.xp
    single = len(parts) == 1
    with arrays.active():
        if single:
            only = parts[0][2]
            x, lr, out = only.inputs["sample"], only.inputs["lr_latent"], only.outputs["model_output"]
        else:
            x, lr, out = (arrays.empty(shape, np.float32) for shape in (sample.shape, z_lr.shape, sample.shape))
        arrays.upload(sample, x)
        arrays.upload(z_lr, lr)
        noise = arrays.empty(sample.shape, np.float32) if scheduler.stochastic else None
        history = None
        for k, (t, coeffs) in enumerate(zip(scheduler.timesteps, trajectory_coefficients(scheduler))):
            for a, b, bound in parts:
                if not single:
                    bound.inputs["sample"][...] = x[a:b]
                    bound.inputs["lr_latent"][...] = lr[a:b]
                bound.inputs["timestep"].fill(t)
                bound.run()
                if not single:
                    out[a:b] = bound.outputs["model_output"]
            if emit is not None:
                emit(k, arrays.download(out))
            z = None
            if scheduler.stochastic:
                drawn = draw_noise()  # drawn at every step, as the host loop does, so the streams stay aligned
                if coeffs.needs_noise:
                    arrays.upload(drawn, noise)
                    z = noise.astype(np.float64)
            step = apply_coefficients(coeffs, x.astype(np.float64), out.astype(np.float64), history, z, xp=xp)
            x[...] = step.prev_sample  # the one rounding to float32 of each step, as scheduler.step's astype
            history = step.pred_original_sample
        return arrays.download(x)
