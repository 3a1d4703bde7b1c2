"""One sampler step as a single fused elementwise kernel, for CuPy: the device loop's step without temporaries.

medsr.engine.schedulers.apply_coefficients evaluates a step's `StepCoefficients` with whole-array NumPy (or CuPy)
operations: about ten kernel launches per step, each allocating a temporary from the memory pool. On a GPU that
costs launch latency at every step, and it cannot be captured into a CUDA graph safely: a temporary freed back to
CuPy's pool after the capture may be handed to another array while the graph still writes it on every replay.
:data:`STEP_SOURCE` does the same arithmetic in one pass over the latent, in place (the float32 sample and the
float64 history are overwritten), allocating nothing.

It is bit-identical to `apply_coefficients` in float64 followed by one rounding to float32, the host loop's
arithmetic (tests/test_step_kernel.py compiles this very source with the C compiler and compares bit for bit):

- every product and sum is its own IEEE round-to-nearest operation (``__dmul_rn``/``__dadd_rn`` on CUDA, which the
  compiler never contracts into a fused multiply-add, as NumPy's separate operations are never contracted), in
  NumPy's order;
- a term whose coefficient is 0 is skipped, not added as 0 * x (which would turn -0.0 into +0.0 and inf into NaN);
- clipping keeps NaN, as ``np.clip`` does (``fmin``/``fmax`` would drop it);
- the history (the previous x0) stays float64, as it does on the host;
- float32 subnormals are kept through both conversions (``MEDSR_F2D``/``MEDSR_D2F``), which CuPy's ``-ftz=true``
  would flush to zero in a plain cast.
"""

from __future__ import annotations

import functools

from medsr.engine.schedulers import StepCoefficients

#: bits of the kernel's ``flags``: which optional terms a step has
CLIP, X0, HISTORY, NOISE = 1, 2, 4, 8

#: the per-element step; ``sample`` and ``history`` are read and overwritten, the rest are read
STEP_SOURCE = """
const double xd = MEDSR_F2D(sample);
const double od = MEDSR_F2D(output);
double x0 = MEDSR_ADD(MEDSR_MUL(x0_sample, xd), MEDSR_MUL(x0_output, od));
if (flags & 1) {
    x0 = x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
}
double prev = MEDSR_ADD(MEDSR_MUL(c_sample, xd), MEDSR_MUL(c_output, od));
if (flags & 2) prev = MEDSR_ADD(prev, MEDSR_MUL(c_x0, x0));
if (flags & 4) prev = MEDSR_ADD(prev, MEDSR_MUL(c_history, history));
if (flags & 8) prev = MEDSR_ADD(prev, MEDSR_MUL(c_noise, MEDSR_F2D(noise)));
sample = MEDSR_D2F(prev);
history = x0;
"""

#: the kernel's read-only parameters, in call order (CuPy ElementwiseKernel syntax); ``output`` and ``noise`` are
#: float32 arrays shaped like the sample (``noise`` may be any such array when the step has no noise term)
STEP_INPUTS = (
    "float32 output, float32 noise, float64 x0_sample, float64 x0_output, float64 clip_range, float64 c_sample, "
    "float64 c_output, float64 c_x0, float64 c_history, float64 c_noise, int32 flags"
)
#: the parameters read and overwritten: the float32 sample and the float64 history
STEP_OUTPUTS = "float32 sample, float64 history"

#: CUDA definitions of the source's operations. CuPy compiles every kernel with ``-ftz=true`` (appended after any
#: options given), under which a plain float <-> double cast flushes float32 subnormals to zero (``cvt.ftz``); the
#: conversions are written in PTX without ``.ftz`` so that subnormals survive, as they do in NumPy.
CUDA_PREAMBLE = r"""
#define MEDSR_MUL(a, b) __dmul_rn(a, b)
#define MEDSR_ADD(a, b) __dadd_rn(a, b)
__device__ __forceinline__ double medsr_f2d(float x) {
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float medsr_d2f(double x) {
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(x));
    return r;
}
#define MEDSR_F2D(x) medsr_f2d(x)
#define MEDSR_D2F(x) medsr_d2f(x)
"""


def step_scalars(coeffs: StepCoefficients) -> tuple[float, float, float, float, float, float, float, float, int]:
    """The scalar arguments of the kernel for one step, after ``output`` and ``noise``: the coefficients in
    :data:`STEP_INPUTS` order, then ``flags``."""
    flags = (
        (CLIP if coeffs.clip_range is not None else 0)
        | (X0 if coeffs.c_x0 else 0)
        | (HISTORY if coeffs.needs_history else 0)
        | (NOISE if coeffs.needs_noise else 0)
    )
    clip_range = coeffs.clip_range if coeffs.clip_range is not None else 0.0
    c = coeffs  # every coefficient is a Python float already (StepCoefficients.__post_init__)
    return (c.x0_sample, c.x0_output, clip_range, c.c_sample, c.c_output, c.c_x0, c.c_history, c.c_noise, flags)


@functools.cache
def cupy_step_kernel(cupy):
    """The CuPy ElementwiseKernel of :data:`STEP_SOURCE` (compiled by NVRTC on its first call, then cached)."""
    return cupy.ElementwiseKernel(STEP_INPUTS, STEP_OUTPUTS, STEP_SOURCE, "medsr_sampler_step", preamble=CUDA_PREAMBLE)
