"""Tests of medsr.degrade's data consistency: k-space replacement, back-projection, residuals, zero-filling."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsr.degrade import (
    SCALES,
    apply_consistency,
    backproject,
    consistency_residual,
    kspace_consistency,
    make_degradation,
    upsample_baseline,
)
from medsr.degrade.operators import WINDOWS
from medsr.errors import InputError, ShapeError

OPERATOR_NAMES = ["kspace", "area", "bicubic", "lanczos"]


def _pair(seed, scale, lr_shape=(10, 9), batch=(2,), dtype=np.float64):
    """An SR guess and an LR measurement of a different (true) HR image, both random."""
    rng = np.random.default_rng(seed)
    shape = (*batch, lr_shape[0] * scale, lr_shape[1] * scale)
    truth, sr = rng.standard_normal(shape), rng.standard_normal(shape)
    return sr.astype(dtype), truth


@settings(max_examples=40, deadline=None)
@given(
    scale=st.sampled_from(SCALES),
    lr_shape=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    seed=st.integers(0, 2**32 - 1),
)
def test_zerofill_is_a_right_inverse_of_kspace(scale, lr_shape, seed):
    # A(zerofill(y)) = y for every LR image, including its Nyquist row/column (split half and half on the way up).
    y = np.random.default_rng(seed).standard_normal(lr_shape)
    np.testing.assert_allclose(
        make_degradation("kspace", scale).forward(upsample_baseline(y, "zerofill", scale)), y, atol=1e-12
    )


@pytest.mark.parametrize("window", [None, "hann"])
@pytest.mark.parametrize("scale", SCALES)
def test_kspace_consistency_replaces_only_the_central_block(window, scale):
    sr, truth = _pair(0, scale)
    op = make_degradation("kspace", scale, window=window)
    lr = op.forward(truth)
    out = kspace_consistency(sr, lr, scale, window=window)
    assert consistency_residual(out, lr, op).max() <= 1e-12
    np.testing.assert_allclose(kspace_consistency(out, lr, scale, window=window), out, atol=1e-12)  # idempotent
    # Frequencies beyond the LR band (|k| > n/2 on either axis) are the SR's own.
    changed = np.abs(np.fft.fft2(out - sr))
    for axis, n in ((-2, lr.shape[-2]), (-1, lr.shape[-1])):
        size = out.shape[axis]
        outside = np.abs(np.fft.fftfreq(size, 1 / size)) > n / 2
        assert np.take(changed, np.flatnonzero(outside), axis=axis).max() <= 1e-9


KSPACE_VARIANTS = [{"window": window} for window in WINDOWS] + [{"window": "tukey", "alpha": 0.2}]


@pytest.mark.parametrize("params", KSPACE_VARIANTS, ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_apply_consistency_projects_through_the_operators_own_window(params, scale):
    """The k-space mode uses every parameter of the operator it is given: A(result) = lr to 1e-12 for each window
    (ignoring the window left a residual of about 0.4 with Hann)."""
    sr, truth = _pair(1, scale)
    op = make_degradation("kspace", scale, **params)
    lr = op.forward(truth)
    out = apply_consistency(sr, lr, "kspace", op)
    assert consistency_residual(out, lr, op).max() <= 1e-12
    np.testing.assert_array_equal(out, kspace_consistency(sr, lr, scale, **params))
    assert consistency_residual(apply_consistency(sr, lr, "none", op), lr, op).min() > 0.1


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_apply_consistency_backprojects_through_any_operator(name):
    sr, truth = _pair(2, 2)
    op = make_degradation(name, 2)
    lr = op.forward(truth)
    np.testing.assert_array_equal(apply_consistency(sr, lr, "backproject", op), backproject(sr, lr, op))


@pytest.mark.parametrize(
    ("mode", "name", "message"),
    [
        ("kspace", "bicubic", "consistency 'kspace' needs the 'kspace' degradation, but the LR was made by 'bicubic'"),
        ("dc", "kspace", "consistency must be one of none, kspace, backproject, project, got 'dc'"),
    ],
)
def test_consistency_modes_that_cannot_hold_are_refused(mode, name, message):
    sr, truth = _pair(3, 2)
    op = make_degradation(name, 2)
    with pytest.raises(InputError, match=message):
        apply_consistency(sr, op.forward(truth), mode, op)


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.8])
def test_kspace_consistency_weight_blends_the_measurement(weight):
    sr, truth = _pair(1, 4)
    op = make_degradation("kspace", 4)
    lr = op.forward(truth)
    out = kspace_consistency(sr, lr, 4, weight=weight)
    np.testing.assert_allclose(op.forward(out), (1 - weight) * op.forward(sr) + weight * lr, atol=1e-12)


def test_kspace_consistency_keeps_float32():
    sr, truth = _pair(2, 2, dtype=np.float32)
    lr = make_degradation("kspace", 2).forward(truth)
    out = kspace_consistency(sr, lr, 2)
    assert out.dtype == np.float32
    assert consistency_residual(out, lr, make_degradation("kspace", 2)).max() <= 1e-5


@pytest.mark.parametrize("name", OPERATOR_NAMES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backproject_reaches_tolerance(name, scale, dtype):
    op = make_degradation(name, scale)
    sr, truth = _pair(scale, scale, dtype=dtype)
    lr = op.forward(truth).astype(dtype)
    before = consistency_residual(sr, lr, op)
    out = backproject(sr, lr, op)  # the defaults: 10 iterations, tol 1e-3
    after = consistency_residual(out, lr, op)
    assert out.dtype == dtype and out.shape == sr.shape
    assert np.all(before > 0.1) and np.all(after <= 1e-3)


@pytest.mark.parametrize("scale", SCALES)
def test_backproject_with_kspace_equals_kspace_consistency(scale):
    # Both give the image nearest to sr with A(image) = lr (an orthogonal projection), so they must agree.
    op = make_degradation("kspace", scale)
    sr, truth = _pair(3, scale)
    lr = op.forward(truth)
    np.testing.assert_allclose(backproject(sr, lr, op, tol=1e-12), kspace_consistency(sr, lr, scale), atol=1e-8)


def test_backproject_stops_per_slice_and_respects_iterations():
    op = make_degradation("bicubic", 2)
    sr, truth = _pair(4, 2)
    lr = op.forward(truth)
    lr[0] = op.forward(sr[0])  # slice 0 is already consistent: it must not move
    out = backproject(sr, lr, op, iterations=5)
    np.testing.assert_array_equal(out[0], sr[0])
    np.testing.assert_array_equal(backproject(sr, lr, op, iterations=0), sr)


def test_consistency_residual_is_per_slice():
    op = make_degradation("area", 2)
    sr, truth = _pair(5, 2, batch=(3, 2))
    lr = op.forward(truth)
    res = consistency_residual(sr, lr, op)
    assert res.shape == (3, 2)
    expected = [
        [np.linalg.norm(op.forward(sr[i, j]) - lr[i, j]) / np.linalg.norm(lr[i, j]) for j in range(2)] for i in range(3)
    ]
    np.testing.assert_allclose(res, expected, rtol=1e-12)


def test_consistency_residual_of_an_empty_lr_slice():
    op = make_degradation("area", 2)
    lr = np.zeros((2, 3, 3))
    sr = np.zeros((2, 6, 6))
    sr[1, 0, 0] = 1.0
    np.testing.assert_array_equal(consistency_residual(sr, lr, op), [0.0, np.inf])


def test_consistency_functions_refuse_mismatched_shapes_and_bad_values():
    op = make_degradation("area", 2)
    with pytest.raises(ShapeError, match=r"lr shape \(4, 4\) does not match sr shape \(6, 6\)"):
        consistency_residual(np.zeros((6, 6)), np.zeros((4, 4)), op)
    with pytest.raises(ShapeError, match=r"sr shape \(5, 6\)"):
        kspace_consistency(np.zeros((5, 6)), np.zeros((2, 3)), 2)
    with pytest.raises(InputError, match="weight must be in"):
        kspace_consistency(np.zeros((6, 6)), np.zeros((3, 3)), 2, weight=1.5)
    with pytest.raises(InputError, match="iterations must be"):
        backproject(np.zeros((6, 6)), np.zeros((3, 3)), op, iterations=-1)
    with pytest.raises(InputError, match="tol must be"):
        backproject(np.zeros((6, 6)), np.zeros((3, 3)), op, tol=float("nan"))
    with pytest.raises(InputError, match="unknown baseline 'nearest'"):
        upsample_baseline(np.zeros((3, 3)), "nearest", 2)
    with pytest.raises(InputError, match="scale must be one of"):
        upsample_baseline(np.zeros((3, 3)), "zerofill", 8)
