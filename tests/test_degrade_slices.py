"""Tests of medsr.degrade.slices: the thick-slice operator, its adjoint, exact data consistency, slice baselines."""

import math

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import scipy.stats

from medsr.degrade import SLICE_BASELINES, AreaAverage, SliceProfile, ThickSlices, matrices, slices, upsample_slices
from medsr.errors import InputError, ShapeError

#: Slice spacings under test (HR voxels): 1 (a slice blur only), medsr's in-plane SCALES, 5-6 mm slices of 1 mm
#: volumes.
SPACINGS = (1, 2, 3, 4, 5, 6)
#: Thickness over spacing: a gap, contiguous slices, overlaps.
RATIOS = (0.5, 1.0, 1.5, 2.0)
PROFILES = ("gaussian", "box")


def _inner(a, b):
    return float(np.sum(a * b))


def _lr_coords(n_lr, s):
    """LR index coordinate of each HR voxel, the inverse of the one geometry (LR slice i at HR s*i + (s-1)/2)."""
    return (np.arange(n_lr * s) - (s - 1) / 2) / s


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("scale", SPACINGS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_adjoint_is_exact(profile, scale, ratio):
    # <A x, y> = <x, A^T y> to 1e-12, for every axis of a 3D array.
    rng = np.random.default_rng(scale)
    for axis in (0, 1, -1):
        op = ThickSlices(scale, axis=axis, profile=profile, fwhm=ratio * scale)
        shape = [3, 5, 4]
        shape[axis] = 7 * scale
        x = rng.standard_normal(shape)
        lr_shape = list(shape)
        lr_shape[axis] = 7
        y = rng.standard_normal(lr_shape)
        ax, aty = op.forward(x), op.adjoint(y)
        assert ax.shape == y.shape and aty.shape == x.shape
        assert abs(_inner(ax, y) - _inner(x, aty)) <= 1e-12 * np.linalg.norm(ax) * np.linalg.norm(y)


def test_lr_slice_i_sits_on_hr_voxel_s_i_plus_half_s_minus_1():
    # Interior rows are symmetric about their centre, and the Gaussian integrated over HR voxels matches the
    # difference of the normal CDF at the voxel edges (scipy.stats as reference).
    for scale, fwhm in [(2, 2.0), (3, 5.0), (4, 4.0), (5, 3.0), (6, 9.0)]:
        n_lr = 30
        a = ThickSlices(scale, fwhm=fwhm).matrix(n_lr * scale)
        j = np.arange(n_lr * scale)
        sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
        for i in (10, 15, 20):
            centre = scale * i + (scale - 1) / 2
            assert abs(a[i] @ j - centre) <= 1e-12 * centre
            reference = scipy.stats.norm.cdf(j + 0.5, centre, sigma) - scipy.stats.norm.cdf(j - 0.5, centre, sigma)
            np.testing.assert_allclose(a[i], reference, rtol=0, atol=1e-15)


@pytest.mark.parametrize("fwhm", [4.0, 6.0, 8.0])
def test_gaussian_is_integrated_over_each_voxel_not_sampled(fwhm):
    # Integrating over unit voxels adds a unit box to the profile: variance sigma^2 + 1/12 (Sheppard), where
    # point sampling would give sigma^2. Exact up to terms of order exp(-2 pi^2 sigma^2) < 1e-20 here.
    a = ThickSlices(4, fwhm=fwhm).matrix(4 * 30)
    sigma = fwhm / slices.GAUSSIAN_FWHM_PER_SIGMA
    offsets = np.arange(4 * 30) - (4 * 15 + 1.5)
    assert abs(a[15] @ offsets**2 - (sigma**2 + 1 / 12)) <= 1e-12


def test_fwhm_is_the_full_width_at_half_maximum():
    # A wide Gaussian (sigma ~ 17 voxels, so voxel integration changes values by ~1e-4) falls to half its peak at
    # +-fwhm/2; a box is flat at 1/fwhm inside and 0 outside, ramping over the one voxel each edge cuts.
    gaussian = SliceProfile("gaussian", 40.0).voxel_weights(np.array([0.0, 20.0, -20.0]))
    np.testing.assert_allclose(gaussian[1:] / gaussian[0], 0.5, rtol=1e-3)
    box = SliceProfile("box", 4.0).voxel_weights(np.arange(-5.0, 6.0))
    np.testing.assert_allclose(box, np.array([0, 0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0]) / 4.0, rtol=0, atol=1e-16)


@pytest.mark.parametrize("scale", SPACINGS)
def test_box_of_fwhm_s_is_area_averaging(scale):
    # The box profile with thickness = spacing is the existing AreaAverage, one axis at a time.
    n_hr = 6 * scale
    np.testing.assert_allclose(
        ThickSlices(scale, profile="box").matrix(n_hr), matrices.area_matrix(n_hr, scale), rtol=0, atol=1e-15
    )
    if scale in (2, 3, 4):
        hr = np.random.default_rng(scale).standard_normal((2, n_hr, 5 * scale))
        twice = ThickSlices(scale, axis=-1, profile="box").forward(
            ThickSlices(scale, axis=-2, profile="box").forward(hr)
        )
        np.testing.assert_allclose(twice, AreaAverage(scale).forward(hr), rtol=0, atol=1e-14)


@pytest.mark.parametrize("profile", PROFILES)
def test_edges_drop_outside_voxels_and_renormalise(profile):
    # The boundary rule of matrices.resample_matrix: rows sum to 1 (a constant keeps its value), and an edge row
    # is the untruncated profile restricted to the volume and renormalised.
    op = ThickSlices(4, profile=profile, fwhm=10.0)
    a = op.matrix(40)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    full = op.slice_profile.voxel_weights(np.arange(40) - 1.5)
    np.testing.assert_allclose(a[0], full / full.sum(), rtol=0, atol=1e-16)
    assert full.sum() < 0.9  # the profile does reach past the first voxel
    np.testing.assert_allclose(op.forward(np.full((3, 40), 2.5)), 2.5, rtol=1e-15)


def test_any_axis_any_ndim_and_dtypes():
    op = ThickSlices(3, axis=1)
    hr = np.random.default_rng(0).standard_normal((2, 12, 4, 5))
    lr = op.forward(hr)
    assert lr.shape == (2, 4, 4, 5)
    np.testing.assert_allclose(lr, np.einsum("ij,ajbc->aibc", op.matrix(12), hr), rtol=0, atol=1e-14)
    np.testing.assert_allclose(ThickSlices(3, axis=-3).forward(hr), lr, rtol=0, atol=0)
    assert ThickSlices(3).forward(np.arange(6.0)).shape == (2,)
    assert op.forward(hr.astype(np.float32)).dtype == np.float32
    assert op.adjoint(lr.astype(np.float32)).dtype == np.float32
    assert op.forward(np.ones((1, 6, 1), np.int16)).dtype == np.float64
    assert op.project(hr.astype(np.float32), lr).dtype == np.float32


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("scale", SPACINGS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_projection_reproduces_the_slices_and_is_the_nearest_such_volume(profile, scale, ratio):
    rng = np.random.default_rng(10 * scale + int(4 * ratio))
    op = ThickSlices(scale, axis=0, profile=profile, fwhm=ratio * scale)
    shape = (9 * scale, 4, 3)
    truth, sr = rng.standard_normal(shape), rng.standard_normal(shape)
    lr = op.forward(truth)
    out = op.project(sr, lr)
    # Exact: the measured slices are reproduced to rounding.
    assert np.linalg.norm(op.forward(out) - lr) <= 1e-12 * np.linalg.norm(lr)
    # Idempotent: projecting again changes nothing.
    np.testing.assert_allclose(op.project(out, lr), out, rtol=0, atol=1e-12)
    # Nearest: the correction is orthogonal to every move that keeps A x = lr (the null space of A, reached by
    # projecting a random u onto A x = 0), so any other consistent volume is farther from sr. At s = 1 A is square
    # and invertible, its null space is {0}, and the projection is A^-1 lr.
    u = rng.standard_normal(shape)
    null = op.project(u, np.zeros_like(lr))
    assert np.linalg.norm(op.forward(null)) <= 1e-12 * np.linalg.norm(u)
    correction = out - sr
    assert abs(_inner(correction, null)) <= 1e-12 * np.linalg.norm(correction) * np.linalg.norm(u)
    if scale > 1:
        assert np.linalg.norm(null) >= 0.1 * np.linalg.norm(u)
        assert np.linalg.norm(out + 0.1 * null - sr) > np.linalg.norm(correction)


@pytest.mark.parametrize("axis", [1, -2])
def test_projection_broadcasts_and_caches_its_solve(axis):
    # lr without sr's leading dim: the slice axis is still the one counted on sr.
    op = ThickSlices(4, axis=axis, fwhm=6.0)
    rng = np.random.default_rng(3)
    sr = rng.standard_normal((2, 32, 3))
    lr = rng.standard_normal((8, 3))
    out = op.project(sr, lr)
    assert out.shape == sr.shape
    assert np.linalg.norm(op.forward(out) - lr) <= 1e-12 * np.linalg.norm(np.broadcast_to(lr, (2, 8, 3)))
    with pytest.raises(ShapeError, match="needs 8 slices"):
        op.project(sr, lr[0])
    pinv = slices.thick_slice_pinv(32, 4, op.slice_profile)
    assert slices.thick_slice_pinv(32, 4, op.slice_profile) is pinv and not pinv.flags.writeable
    np.testing.assert_allclose(op.matrix(32) @ pinv, np.eye(8), rtol=0, atol=1e-14)


def test_projection_refuses_profiles_too_wide_for_exact_consistency():
    # A Gaussian 4.5 slices wide: cond(A A^T) ~ 2e14 with 40 slices, far above MAX_CONDITION.
    op = ThickSlices(4, fwhm=18.0)
    with pytest.raises(InputError, match="overlaps its neighbours"):
        op.project(np.zeros(160), np.zeros(40))
    op.forward(np.zeros(160))  # the forward model itself stays available


@pytest.mark.parametrize("order, method, modes", [(1, "linear", ("reflect", "nearest")), (3, "bspline", ("reflect",))])
@pytest.mark.parametrize("scale", SPACINGS)
def test_spline_baselines_match_scipy_map_coordinates(order, method, modes, scale):
    # Same coordinates (HR voxel j at LR index (j - (s-1)/2) / s), same half-sample symmetric edges. scipy's
    # 'reflect' prefilter is itself approximate on short signals (measured: 4e-12 at 10 slices, 1e-3 at 2), so
    # those are checked against scipy on the explicitly reflected signal, padded far enough for its error to vanish.
    rng = np.random.default_rng(scale)
    for n_lr in (1, 2, 3, 5, 13, 24):
        lr = rng.standard_normal(n_lr)
        coords = _lr_coords(n_lr, scale)
        got = upsample_slices(lr, scale, method=method)
        pad = 48
        padded = scipy.ndimage.map_coordinates(
            np.pad(lr, pad, mode="symmetric"), [coords + pad], order=order, mode="reflect"
        )
        np.testing.assert_allclose(got, padded, rtol=0, atol=1e-12)
        if n_lr >= 13 or order == 1:
            for mode in modes:
                reference = scipy.ndimage.map_coordinates(lr, [coords], order=order, mode=mode, prefilter=True)
                np.testing.assert_allclose(got, reference, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method, order", [("linear", 1), ("bspline", 3)])
def test_baselines_along_an_axis_of_a_volume(method, order):
    lr = np.random.default_rng(7).standard_normal((5, 14, 3))
    got = upsample_slices(lr, 4, axis=1, method=method)
    assert got.shape == (5, 56, 3)
    reference = np.apply_along_axis(
        lambda row: scipy.ndimage.map_coordinates(row, [_lr_coords(14, 4)], order=order, mode="reflect"), 1, lr
    )
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-13)
    assert upsample_slices(lr.astype(np.float32), 4, axis=0, method=method).dtype == np.float32


@pytest.mark.parametrize("scale", SPACINGS)
@pytest.mark.parametrize("n_lr", [1, 2, 7, 16])
def test_sinc_reproduces_a_band_limited_signal(scale, n_lr):
    # A cosine series with frequencies below the LR Nyquist frequency, symmetric about the volume's edges (the
    # reflected extension), sampled at the LR slice centres, is interpolated exactly at every HR voxel.
    rng = np.random.default_rng(n_lr)
    amplitudes = rng.standard_normal(n_lr)

    def signal(t):
        return np.cos(np.pi * np.outer(t + 0.5, np.arange(n_lr)) / n_lr) @ amplitudes

    got = upsample_slices(signal(np.arange(n_lr)), scale, method="sinc")
    np.testing.assert_allclose(got, signal(_lr_coords(n_lr, scale)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", SPACINGS)
def test_sinc_is_dct_zero_padding(scale):
    # Fourier interpolation of the reflected signal is DCT-II, zero-padding to n_hr, inverse DCT (orthonormal
    # transforms, times sqrt(s) for the length change).
    lr = np.random.default_rng(scale).standard_normal(11)
    padded = np.zeros(11 * scale)
    padded[:11] = scipy.fft.dct(lr, norm="ortho")
    reference = scipy.fft.idct(padded, norm="ortho") * math.sqrt(scale)
    np.testing.assert_allclose(upsample_slices(lr, scale, method="sinc"), reference, rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", SLICE_BASELINES)
def test_baselines_pass_through_the_slices_and_keep_constants(method):
    # At odd s HR voxel s*i + (s-1)/2 is the centre of LR slice i, where every interpolating baseline returns it.
    lr = np.random.default_rng(1).standard_normal((3, 9))
    for scale in (1, 3, 5):
        hr = upsample_slices(lr, scale, method=method)
        np.testing.assert_allclose(hr[:, (scale - 1) // 2 :: scale], lr, rtol=0, atol=1e-13)
    np.testing.assert_allclose(upsample_slices(np.full(9, -1.5), 4, method=method), -1.5, rtol=1e-14)


def test_errors_name_what_is_accepted():
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(InputError, match="slice scale"):
            ThickSlices(bad)
    with pytest.raises(InputError, match="slice profile"):
        ThickSlices(4, profile="sinc")
    for bad in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(InputError, match="fwhm"):
            ThickSlices(4, fwhm=bad)
    with pytest.raises(InputError, match="axis"):
        ThickSlices(4, axis=1.0)
    with pytest.raises(ShapeError, match="multiple of the slice spacing 4"):
        ThickSlices(4).forward(np.zeros((3, 10)))
    with pytest.raises(ShapeError, match="no axis 2"):
        ThickSlices(4, axis=2).forward(np.zeros((3, 8)))
    with pytest.raises(ShapeError, match="scalar"):
        ThickSlices(4).forward(1.0)
    with pytest.raises(InputError, match="real numeric"):
        ThickSlices(4).forward(np.zeros(8, complex))
    with pytest.raises(ShapeError, match="needs 2 slices"):
        ThickSlices(4).project(np.zeros(8), np.zeros(3))
    with pytest.raises(ShapeError, match="no slices"):
        ThickSlices(4).adjoint(np.zeros((3, 0)))
    with pytest.raises(InputError, match="unknown slice baseline"):
        upsample_slices(np.zeros(4), 4, method="cubic")
    with pytest.raises(ShapeError, match="no slices"):
        upsample_slices(np.zeros(0), 4)
