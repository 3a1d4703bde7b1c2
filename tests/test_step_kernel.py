"""The fused sampler-step kernel (medsr.engine.step_kernel) against the NumPy step, bit for bit.

The kernel's source is CUDA C; its arithmetic is plain C once ``MEDSR_MUL``/``MEDSR_ADD`` are the IEEE operations
``__dmul_rn``/``__dadd_rn`` stand for and ``MEDSR_F2D``/``MEDSR_D2F`` the casts that the CUDA preamble writes in PTX
(where CuPy's ``-ftz=true`` would flush subnormals in a plain cast). So the very source CuPy compiles on a GPU is
compiled here with the C compiler (``-ffp-contract=off``: no fused multiply-add, as on the GPU) into a loop over the
elements and compared with medsr.engine.device_loop.HostArrays.step, the device loop's step on the CPU, over whole
trajectories of every sampler and over inputs that catch the usual shortcuts (NaN, infinities, signed zeros,
subnormals, overflow to float32 infinity). On a GPU with CuPy the compiled kernel itself is compared the same way.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from samplers import SAMPLERS

from medsr.engine.device_loop import HostArrays
from medsr.engine.schedulers import StepCoefficients, make_scheduler, trajectory_coefficients
from medsr.engine.step_kernel import STEP_SOURCE, step_scalars

HARNESS = """
#define MEDSR_MUL(a, b) ((a) * (b))
#define MEDSR_ADD(a, b) ((a) + (b))
#define MEDSR_F2D(x) ((double)(x))
#define MEDSR_D2F(x) ((float)(x))
void medsr_step(long n, const float *output_, const float *noise_, double x0_sample, double x0_output,
                double clip_range, double c_sample, double c_output, double c_x0, double c_history,
                double c_noise, int flags, float *sample_, double *history_) {
    for (long i = 0; i < n; ++i) {
        const float output = output_[i];
        const float noise = noise_[i];
        float sample = sample_[i];
        double history = history_[i];
        {
%s
        }
        sample_[i] = sample;
        history_[i] = history;
    }
}
"""

SHAPE = (3, 4, 8, 8)
#: special values in every input, so a kernel that drops NaN, adds 0 * inf or flushes subnormals differs
SPECIAL = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, -1e-45, 3e38, -3e38, 1.0])


@pytest.fixture(scope="module")
def c_step(tmp_path_factory):
    """The kernel's source compiled as C: ``c_step(coeffs, sample, output, history, noise)`` in place."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc): it compiles the kernel's source for the CPU")
    folder = tmp_path_factory.mktemp("step_kernel")
    source, library = folder / "step.c", folder / "step.so"
    source.write_text(HARNESS % STEP_SOURCE)
    subprocess.run(
        [compiler, "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", str(source), "-o", str(library)],
        check=True,
    )
    function = ctypes.CDLL(str(library)).medsr_step
    f32, f64 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double)
    function.argtypes = [ctypes.c_long, f32, f32, *[ctypes.c_double] * 8, ctypes.c_int, f32, f64]
    function.restype = None

    def run(coeffs: StepCoefficients, sample, output, history, noise) -> None:
        for array, dtype in ((sample, np.float32), (output, np.float32), (history, np.float64), (noise, np.float32)):
            assert array.dtype == dtype and array.flags.c_contiguous
        function(
            sample.size,
            output.ctypes.data_as(f32),
            noise.ctypes.data_as(f32),
            *step_scalars(coeffs),
            sample.ctypes.data_as(f32),
            history.ctypes.data_as(f64),
        )

    return run


def inputs(seed: int, special: bool):
    """(sample, output, noise) float32 and history float64, each shaped SHAPE; with ``special``, a tenth of each
    array's entries drawn from SPECIAL."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(SHAPE) * 2 for _ in range(4)]
    if special:
        for array in arrays:
            mask = rng.random(SHAPE) < 0.1
            array[mask] = rng.choice(SPECIAL, mask.sum())
    sample, output, noise, history = arrays
    with np.errstate(over="ignore"):
        return sample.astype(np.float32), output.astype(np.float32), noise.astype(np.float32), history


def assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Equal bit for bit, NaN payloads aside (the two NaN-producing paths need not pick the same payload)."""
    a_nan, b_nan = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(a_nan, b_nan)
    bits = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}[a.dtype]
    np.testing.assert_array_equal(a[~a_nan].view(bits), b[~b_nan].view(bits))


def compare_trajectory(apply, coefficients, seed: int, special: bool) -> int:
    """Run ``coefficients`` with ``apply`` (in place, like HostArrays.step) and with HostArrays.step from the same
    inputs, feeding each its own outputs from step to step as the loop does; assert every step bit-equal. The
    number of steps compared."""
    sample, output, noise, history = inputs(seed, special)
    ours = [sample.copy(), history.copy()]
    reference = [sample.copy(), history.copy()]
    host = HostArrays()
    rng = np.random.default_rng(seed + 1)
    for k, coeffs in enumerate(coefficients):
        with np.errstate(all="ignore"):
            apply(coeffs, ours[0], output, ours[1], noise)
            host.step(coeffs, reference[0], output, reference[1], noise if coeffs.c_noise else None)
        assert_bits_equal(ours[0], reference[0])
        assert_bits_equal(ours[1], reference[1])
        output = (output + rng.standard_normal(SHAPE).astype(np.float32)).astype(np.float32)  # a new model output
    return len(coefficients)


@pytest.mark.parametrize("special", [False, True], ids=["normal", "special-values"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_the_kernel_source_equals_the_numpy_step_over_whole_trajectories(c_step, name, special):
    scheduler = make_scheduler(SAMPLERS[name])
    scheduler.set_timesteps(7)
    assert compare_trajectory(c_step, trajectory_coefficients(scheduler), 3, special) == 7


#: each optional term alone, on and off, with coefficients that make a skipped term visible (a zero weight times an
#: infinite array is NaN, and -0.0 + 0.0 is +0.0)
EDGE_STEPS = [
    StepCoefficients(c_sample=0.5, c_output=-0.25, x0_sample=1.5, x0_output=-2.0),
    StepCoefficients(c_sample=-0.0, c_output=0.0, x0_sample=0.0, x0_output=-0.0),
    StepCoefficients(c_sample=0.9, c_output=0.1, x0_sample=1.0, x0_output=0.5, c_x0=0.3, clip_range=1.0),
    StepCoefficients(c_sample=0.9, c_output=0.1, x0_sample=1.0, x0_output=0.5, c_x0=0.0, clip_range=0.5),
    StepCoefficients(c_sample=0.2, c_output=0.7, x0_sample=0.4, x0_output=0.6, c_history=-0.35),
    StepCoefficients(c_sample=0.2, c_output=0.7, x0_sample=0.4, x0_output=0.6, c_noise=0.125),
    StepCoefficients(c_sample=1e300, c_output=1e300, x0_sample=1e-300, x0_output=1e-300, c_history=1e-320),
]


@pytest.mark.parametrize("seed", range(3))
def test_the_kernel_source_keeps_the_numpy_step_on_edge_coefficients(c_step, seed):
    compare_trajectory(c_step, EDGE_STEPS, seed, special=True)


def test_a_wrong_kernel_is_caught(c_step):
    """The comparison catches a kernel that adds a zero-weighted term (0 * inf is NaN where NumPy skips it)."""

    def adds_zero_terms(coeffs, sample, output, history, noise):
        c_step(
            StepCoefficients(**{**coeffs.__dict__, "c_history": coeffs.c_history or 1e-320}),
            sample,
            output,
            history,
            noise,
        )

    with pytest.raises(AssertionError):
        compare_trajectory(adds_zero_terms, EDGE_STEPS[:1], 0, special=True)


def test_the_cupy_kernel_equals_the_numpy_step():
    """On a GPU: the kernel CuPy compiles, on device arrays, against the NumPy step (skipped without CuPy)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (the GPU kernel needs it)")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no CUDA device: {exc}")
    from medsr.engine.device_loop import CupyArrays

    arrays = CupyArrays(cupy, cupy.cuda.Stream(non_blocking=True))

    def on_device(coeffs, sample, output, history, noise):
        with arrays.active():
            device = [cupy.asarray(a) for a in (sample, output, history, noise)]
            arrays.step(coeffs, device[0], device[1], device[2], device[3] if coeffs.c_noise else None)
            sample[...], history[...] = arrays.download(device[0]), arrays.download(device[2])

    for name, config in SAMPLERS.items():
        scheduler = make_scheduler(config)
        scheduler.set_timesteps(7)
        for special in (False, True):
            assert compare_trajectory(on_device, trajectory_coefficients(scheduler), 5, special) == 7, name
    compare_trajectory(on_device, EDGE_STEPS, 6, special=True)
