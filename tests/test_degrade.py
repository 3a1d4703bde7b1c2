"""Tests of medsr.degrade's operators: adjointness, the shared geometry, k-space exactness, PIL parity, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from medsr.degrade import OPERATORS, SCALES, degradation_from_dict, make_degradation, upsample_baseline
from medsr.errors import InputError, ShapeError

#: (name, params) of every operator variant under test.
VARIANTS = [
    ("kspace", {}),
    ("kspace", {"window": "hann"}),
    ("kspace", {"window": "tukey", "alpha": 0.3}),
    ("area", {}),
    ("bicubic", {}),
    ("lanczos", {}),
]
PIL_FILTERS = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "area": Image.BOX}
#: PIL resizes 'F' images through a float32 intermediate and output: for values in [0, 255] that rounds to
#: ~255 * 2**-24 per pass, so float64 results agree to a few 1e-5 (measured: <= 1.3e-5 down, 2.4e-5 up).
PIL_TOL = 5e-5


def _ids(variant):
    name, params = variant
    return name + "".join(f"-{v}" for v in params.values())


def _op(variant, scale):
    name, params = variant
    return make_degradation(name, scale, **params)


def _inner(a, b):
    return float(np.sum(a.astype(np.float64) * b))


@settings(max_examples=80, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    scale=st.sampled_from(SCALES),
    lr_shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**32 - 1),
)
def test_adjoint_matches_forward(variant, scale, lr_shape, batch, seed):
    # <A x, y> = <x, A^T y> for odd and even LR sizes, with and without leading batch dims.
    op = _op(variant, scale)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*batch, lr_shape[0] * scale, lr_shape[1] * scale))
    y = rng.standard_normal((*batch, *lr_shape))
    ax, aty = op.forward(x), op.adjoint(y)
    assert ax.shape == y.shape and aty.shape == x.shape
    scale_of_terms = np.linalg.norm(ax) * np.linalg.norm(y)
    assert abs(_inner(ax, y) - _inner(x, aty)) <= 1e-6 * scale_of_terms


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_keeps_value_and_dtype(variant, dtype):
    for scale in SCALES:
        hr = np.full((2, 6 * scale, 5 * scale), 3.25, dtype)
        lr = _op(variant, scale).forward(hr)
        assert lr.dtype == dtype and lr.shape == (2, 6, 5)
        np.testing.assert_allclose(lr, 3.25, rtol=1e-6 if dtype == np.float32 else 1e-12)
        assert _op(variant, scale).adjoint(lr).dtype == dtype


def test_integer_input_becomes_float64():
    lr = make_degradation("area", 2).forward(np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert lr.dtype == np.float64
    np.testing.assert_array_equal(lr, [[2.5, 4.5], [10.5, 12.5]])


def _blob(shape, centre, sigma):
    yy, xx = np.indices(shape, dtype=np.float64)
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def _centroid(img):
    yy, xx = np.indices(img.shape, dtype=np.float64)
    return np.array([np.sum(yy * img), np.sum(xx * img)]) / np.sum(img)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
@pytest.mark.parametrize("scale", SCALES)
def test_blob_lands_on_the_shared_lr_grid(variant, scale):
    # A blob at HR pixel position p lands at LR position (p - (s-1)/2) / s for every operator; a grid that put LR
    # pixel i on HR pixel s*i would be off by (s-1)/(2s) >= 0.25 LR px.
    rng = np.random.default_rng(scale)
    shape = (22 * scale, 18 * scale)
    for _ in range(3):
        p = np.array(shape) / 2 + rng.uniform(-3 * scale, 3 * scale, 2)
        lr = _op(variant, scale).forward(_blob(shape, p, sigma=1.5 * scale))
        np.testing.assert_allclose(_centroid(lr), (p - (scale - 1) / 2) / scale, atol=0.01)


@pytest.mark.parametrize("method", ["zerofill", "bicubic", "lanczos"])
@pytest.mark.parametrize("scale", SCALES)
def test_baseline_upsampling_shares_the_grid(method, scale):
    # The inverse map: an LR blob at q comes back at HR position s*q + (s-1)/2.
    q = np.array([10.3, 8.6])
    hr = upsample_baseline(_blob((22, 18), q, sigma=1.5), method, scale)
    assert hr.shape == (22 * scale, 18 * scale)
    np.testing.assert_allclose(_centroid(hr), scale * q + (scale - 1) / 2, atol=0.01)


def _bandlimited(rng, lr_shape, scale):
    """A random real image whose spectrum is zero for |k| >= n/2 on both axes, as its continuous form f(t0, t1)."""
    freqs = [np.arange(-((n - 1) // 2), (n - 1) // 2 + 1) for n in lr_shape]
    coef = rng.standard_normal((len(freqs[0]), len(freqs[1]))) + 1j * rng.standard_normal(
        (len(freqs[0]), len(freqs[1]))
    )
    sizes = [n * scale for n in lr_shape]

    def f(t0, t1):
        e0 = np.exp(2j * np.pi * np.outer(t0, freqs[0]) / sizes[0])
        e1 = np.exp(2j * np.pi * np.outer(t1, freqs[1]) / sizes[1])
        return (e0 @ coef @ e1.T).real

    return f


@settings(max_examples=40, deadline=None)
@given(
    scale=st.sampled_from(SCALES),
    lr_shape=st.tuples(st.integers(1, 10), st.integers(1, 10)),
    seed=st.integers(0, 2**32 - 1),
)
def test_kspace_truncation_of_bandlimited_image_is_exact(scale, lr_shape, seed):
    # LR = the band-limited image sampled at the LR pixel centres s*i + (s-1)/2, and zero-filling gives HR back.
    f = _bandlimited(np.random.default_rng(seed), lr_shape, scale)
    hr = f(np.arange(lr_shape[0] * scale), np.arange(lr_shape[1] * scale))
    at_centres = f(*(scale * np.arange(n) + (scale - 1) / 2 for n in lr_shape))
    lr = make_degradation("kspace", scale).forward(hr)
    tol = 1e-10 * np.abs(hr).max()
    np.testing.assert_allclose(lr, at_centres, atol=tol)
    np.testing.assert_allclose(upsample_baseline(lr, "zerofill", scale), hr, atol=tol)


@pytest.mark.parametrize("scale", [3])
@pytest.mark.parametrize("lr_shape", [(8, 7), (5, 6)])
def test_kspace_matches_scipy_resample_for_odd_scale(scale, lr_shape):
    # For odd s the (s-1)/2 shift is a whole number of HR pixels, so the operator must equal scipy's Fourier
    # resampling of the rolled image on any (not band-limited) input; this pins the Nyquist folding too.
    hr = np.random.default_rng(0).standard_normal((lr_shape[0] * scale, lr_shape[1] * scale))
    shift = (scale - 1) // 2
    ref = np.roll(hr, (-shift, -shift), axis=(0, 1))
    for axis, n in enumerate(lr_shape):
        ref = scipy.signal.resample(ref, n, axis=axis)
    np.testing.assert_allclose(make_degradation("kspace", scale).forward(hr), ref, atol=1e-12)


@pytest.mark.parametrize("scale", SCALES)
def test_kspace_follows_reference_recipe_on_bandlimited_image(scale):
    # docs/sources.md, "Degradations and fair baselines": shift by (s-1)/2 with a phase ramp, keep the centre block
    # of fftshift(fft2), / s^2.
    lr_shape = (9, 8)
    hr = _bandlimited(np.random.default_rng(1), lr_shape, scale)(*(np.arange(n * scale) for n in lr_shape))
    spectrum = np.fft.fft2(hr)
    for axis, size in enumerate(hr.shape):
        k = np.fft.fftfreq(size, 1 / size)
        ramp = np.exp(2j * np.pi * k * (scale - 1) / 2 / size)
        spectrum = spectrum * (ramp[:, None] if axis == 0 else ramp[None, :])
    centred = np.fft.fftshift(spectrum)
    block = tuple(slice(size // 2 - n // 2, size // 2 - n // 2 + n) for size, n in zip(hr.shape, lr_shape))
    ref = np.fft.ifft2(np.fft.ifftshift(centred[block])).real / scale**2
    np.testing.assert_allclose(make_degradation("kspace", scale).forward(hr), ref, atol=1e-10)


def test_area_is_the_block_mean():
    hr = np.random.default_rng(2).standard_normal((3, 12, 8))
    ref = hr.reshape(3, 3, 4, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(make_degradation("area", 4).forward(hr), ref, atol=1e-14)


def _pil_resize(img, size, name):
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(size[::-1], PIL_FILTERS[name]))


@pytest.mark.parametrize("name", ["bicubic", "lanczos", "area"])
@pytest.mark.parametrize("scale", SCALES)
def test_downsampling_matches_pil_float_images(name, scale):
    # An 8-bit-range image resized in PIL's 'F' mode (area <-> PIL BOX), borders included.
    hr = np.random.default_rng(scale).uniform(0, 255, (12 * scale, 10 * scale)).astype(np.float32)
    ref = _pil_resize(hr, (12, 10), name)
    op = make_degradation(name, scale)
    assert np.abs(op.forward(hr.astype(np.float64)) - ref).max() <= PIL_TOL
    assert np.abs(op.forward(hr) - ref).max() <= 2 * PIL_TOL  # float32 accumulation on our side too


@pytest.mark.parametrize("name", ["bicubic", "lanczos"])
@pytest.mark.parametrize("scale", SCALES)
def test_upsampling_baselines_match_pil_float_images(name, scale):
    lr = np.random.default_rng(scale).uniform(0, 255, (9, 7))
    ref = _pil_resize(lr, (9 * scale, 7 * scale), name)
    assert np.abs(upsample_baseline(lr, name, scale) - ref).max() <= PIL_TOL


@pytest.mark.parametrize("scale", SCALES)
def test_lanczos_weights_reproduce_pil_8bit_resize(scale):
    # PIL's 'L' mode runs the same weights in two passes, rounding and clipping to 0..255 after each; doing that
    # with our matrices reproduces its output to the grey level, which pins the weights at the borders too.
    hr = np.random.default_rng(scale).integers(0, 256, (12 * scale, 10 * scale)).astype(np.uint8)
    ref = np.asarray(Image.fromarray(hr, mode="L").resize((10, 12), Image.LANCZOS)).astype(np.float64)
    op = make_degradation("lanczos", scale)
    rows = np.clip(np.floor(hr @ op.matrix(hr.shape[1]).T + 0.5), 0, 255)
    ours = np.clip(np.floor(op.matrix(hr.shape[0]) @ rows + 0.5), 0, 255)
    assert np.abs(ours - ref).max() <= 1 and np.mean(ours != ref) <= 0.005


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_to_dict_round_trips_through_json(variant):
    op = _op(variant, 3)
    d = json.loads(json.dumps(op.to_dict()))
    assert d["name"] == variant[0] and d["scale"] == 3
    assert None not in d.values()  # unset parameters are left out, as a manifest's task.degradation writes them
    assert degradation_from_dict(d) == op


def test_registry_names_are_the_public_ones():
    assert set(OPERATORS) == {"kspace", "area", "bicubic", "lanczos", "thick_slices"}  # thick slices: through-plane
    assert make_degradation("kspace", 2, window="tukey").alpha == 0.5


@pytest.mark.parametrize(
    "name, scale, params, match",
    [
        ("gaussian", 2, {}, "unknown degradation 'gaussian'"),
        ("area", 5, {}, "scale must be one of"),
        ("area", 2.0, {}, "scale must be one of"),
        ("area", True, {}, "scale must be one of"),
        ("bicubic", 2, {"a": -0.75}, "unknown \\['a'\\]"),
        ("kspace", 2, {"window": "hamming"}, "window must be one of"),
        ("kspace", 2, {"window": "hann", "alpha": 0.5}, "only to window='tukey'"),
        ("kspace", 2, {"window": "tukey", "alpha": 1.5}, "alpha must be in"),
    ],
)
def test_bad_operator_arguments_raise_input_error(name, scale, params, match):
    with pytest.raises(InputError, match=match):
        make_degradation(name, scale, **params)


@pytest.mark.parametrize("bad", [{"scale": 2}, {"name": "area"}, ["area", 2]])
def test_bad_dicts_raise_input_error(bad):
    with pytest.raises(InputError, match="'name' and 'scale'"):
        degradation_from_dict(bad)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_bad_shapes_and_dtypes_are_refused(variant):
    op = _op(variant, 4)
    with pytest.raises(ShapeError, match=r"\(2, 16, 18\)"):
        op.forward(np.zeros((2, 16, 18)))
    with pytest.raises(ShapeError, match=r"\(16,\)"):
        op.forward(np.zeros((2, 16))[0])
    with pytest.raises(ShapeError, match="at least 1"):
        op.adjoint(np.zeros((3, 0)))
    with pytest.raises(InputError, match="complex"):
        op.forward(np.zeros((8, 8), complex))


def test_package_imports_neither_torch_nor_scipy():
    code = "import sys, medsr.degrade; print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
