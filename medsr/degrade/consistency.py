"""Fair baselines and data consistency: making a super-resolved image agree with the measured LR image.

Everything here uses the operators of :mod:`medsr.degrade.operators` and so their one geometry (LR pixel i on HR
pixel centre s*i + (s-1)/2, docs/conventions.md). Arrays are (..., H, W) HR and (..., H/f_H, W/f_W) LR with the
operator's ``factors`` ((s, s) in-plane, (1, s) for thick slices along W); leading dims broadcast. Results keep the SR image's dtype (float32 stays float32).
"""

import numbers

import numpy as np

from medsr.degrade import matrices
from medsr.degrade.operators import (
    Degradation,
    KSpaceTruncation,
    apply_separable,
    as_image,
    check_scale,
    hr_size,
    lr_size,
)
from medsr.degrade.slices import ThickSlicePlanes
from medsr.errors import InputError, ShapeError

#: Methods of :func:`upsample_baseline`.
BASELINES = ("zerofill", "bicubic", "lanczos")
#: Modes of :func:`apply_consistency`.
CONSISTENCY_MODES = ("none", "kspace", "backproject", "project")


def upsample_baseline(lr, method: str, scale: int) -> np.ndarray:
    """Upsample ``lr`` (..., h, w) to (..., h*s, w*s) with a grid-aligned baseline.

    ``"zerofill"`` is zero-filled k-space (sinc) interpolation, the pseudo-inverse of the ``kspace`` operator: the
    fair baseline for MRI-like LR. ``"bicubic"`` and ``"lanczos"`` interpolate as PIL's ``resize`` enlarges (Keys
    a = -0.5 / Lanczos-3, taps outside the image dropped and renormalised). All put LR pixel i on HR centre
    s*i + (s-1)/2, so a baseline is not penalised by a shift (docs/sources.md, "Degradations and fair baselines").
    """
    scale = check_scale(scale)
    if method not in BASELINES:
        raise InputError(f"unknown baseline {method!r}; expected one of {BASELINES}")
    y = as_image(lr, "lr")
    h, w = lr_size(y.shape)
    if method == "zerofill":
        return KSpaceTruncation(scale).pseudo_inverse(y)
    return apply_separable(
        y, matrices.resample_matrix(h, h * scale, method), matrices.resample_matrix(w, w * scale, method)
    )


def _pair(sr, lr, op: Degradation) -> tuple[np.ndarray, np.ndarray]:
    """``sr`` and ``lr`` as float arrays of one dtype (sr's), checking that lr is sr's size divided by op's
    factors."""
    x = as_image(sr, "sr")
    (h, w), (f_h, f_w) = hr_size(x.shape, op.factors, "sr"), op.factors
    y = as_image(lr, "lr")
    if y.shape[-2:] != (h // f_h, w // f_w):
        raise ShapeError(f"lr shape {y.shape} does not match sr shape {x.shape} at scale {f_h}x{f_w}")
    return x, y.astype(x.dtype, copy=False)


def _sq_norm(x: np.ndarray) -> np.ndarray:
    """Squared Frobenius norm over the last two axes, kept as (..., 1, 1) for broadcasting."""
    return np.sum(x * x, axis=(-2, -1), keepdims=True)


def _ratio(num: np.ndarray, den: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """num / den where ``mask`` and den > 0, else 0 (a converged or exactly solved slice stops moving)."""
    ok = mask & (den > 0)
    return np.where(ok, num / np.where(ok, den, 1), 0).astype(num.dtype)


def kspace_consistency(
    sr, lr, scale: int, weight: float = 1.0, window: str | None = None, alpha: float | None = None
) -> np.ndarray:
    """Replace the central k-space block of ``sr`` by that of the measured ``lr``.

    Computes sr + weight * A^+(lr - A(sr)) with A the ``kspace`` operator (``window``, ``alpha`` as in
    :class:`~medsr.degrade.operators.KSpaceTruncation`). With weight 1 this is the orthogonal projection of sr onto
    the images whose central block is the measured one: afterwards A(result) = lr, frequencies outside the block are
    untouched, and applying it again changes nothing. A weight in [0, 1) blends softly,
    A(result) = (1 - weight) A(sr) + weight lr, for noisy measurements.

    Parameters
    ----------
    sr : (..., H, W) float array
        The super-resolved image(s).
    lr : (..., H/s, W/s) float array
        The measured LR image(s), made (or modelled) by the ``kspace`` operator.
    """
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0.0 <= weight <= 1.0:
        raise InputError(f"weight must be in [0, 1], got {weight!r}")
    op = KSpaceTruncation(scale, window, alpha)
    x, y = _pair(sr, lr, op)
    return x + weight * op.pseudo_inverse(y - op.forward(x))


def backproject(sr, lr, op: Degradation, iterations: int = 10, tol: float = 1e-3) -> np.ndarray:
    """Iterative back-projection of the LR error until ||A(sr) - lr|| / ||lr|| <= tol per slice.

    Each iteration back-projects the LR residual through A^T with conjugate-gradient step sizes (Craig's method:
    CG on A A^T z = lr - A(sr), then sr + A^T z). It converges to the image closest to ``sr`` that reproduces
    ``lr`` exactly (for an ``lr`` that A can produce, as any image made by A is), and costs one A and one A^T per iteration. Slices stop moving once they meet ``tol``; the loop
    ends when all do or after ``iterations``. An all-zero LR slice only meets tol when A(sr) is exactly zero.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
        raise InputError(f"iterations must be an int >= 0, got {iterations!r}")
    if not isinstance(tol, numbers.Real) or not tol >= 0:
        raise InputError(f"tol must be a number >= 0, got {tol!r}")
    x, y = _pair(sr, lr, op)
    target = tol * tol * _sq_norm(y)
    r = y - op.forward(x)
    p = r
    rr = _sq_norm(r)
    for _ in range(iterations):
        active = rr > target
        if not active.any():
            break
        q = op.adjoint(p)
        step = _ratio(rr, _sq_norm(q), active)
        x = x + step * q
        r = r - step * op.forward(q)
        rr_next = _sq_norm(r)
        p = r + _ratio(rr_next, rr, active) * p
        rr = rr_next
    return x


def check_consistency(mode: str, op: Degradation) -> None:
    """Refuse a consistency ``mode`` that is unknown or that cannot make A(sr) = lr for the degradation ``op``:
    ``"kspace"`` replaces a central k-space block, so it needs the ``kspace`` operator; ``"project"`` is the exact
    projection of thick slices, so it needs ``thick_slices``; ``"backproject"`` and ``"none"`` work with any."""
    if mode not in CONSISTENCY_MODES:
        raise InputError(f"consistency must be one of {', '.join(CONSISTENCY_MODES)}, got {mode!r}")
    if mode == "kspace" and not isinstance(op, KSpaceTruncation):
        exact = "'project'" if isinstance(op, ThickSlicePlanes) else "'backproject'"
        raise InputError(
            f"consistency 'kspace' needs the 'kspace' degradation, but the LR was made by {op.name!r}; use {exact}"
        )
    if mode == "project" and not isinstance(op, ThickSlicePlanes):
        exact = "'kspace'" if isinstance(op, KSpaceTruncation) else "'backproject'"
        raise InputError(
            f"consistency 'project' needs the 'thick_slices' degradation, but the LR was made by {op.name!r}; "
            f"use {exact}"
        )


def apply_consistency(sr, lr, mode: str, op: Degradation) -> np.ndarray:
    """Make ``sr`` (..., H, W) agree with the measured ``lr`` (..., H/f_H, W/f_W) under the degradation ``op`` that
    made it, with all of op's parameters (e.g. the k-space window):

    - ``"kspace"``: :func:`kspace_consistency` with op's window and alpha (the exact projection, A(result) = lr);
    - ``"project"``: op's exact projection :meth:`~medsr.degrade.slices.ThickSlicePlanes.project` (thick slices,
      A(result) = lr to rounding);
    - ``"backproject"``: :func:`backproject` through op;
    - ``"none"``: ``sr`` as it is.
    """
    check_consistency(mode, op)
    if mode == "kspace":
        return kspace_consistency(sr, lr, op.scale, window=op.window, alpha=op.alpha)
    if mode == "project":
        x, y = _pair(sr, lr, op)
        return op.project(x, y)
    if mode == "backproject":
        return backproject(sr, lr, op)
    return sr


def consistency_residual(sr, lr, op: Degradation) -> np.ndarray:
    """Per-slice relative residual ||A(sr) - lr|| / ||lr|| (Frobenius norms over the last two axes).

    Returns a float64 array of the leading shape (sr.shape[:-2] broadcast with lr's). A slice whose LR is all zero
    gets 0 if A(sr) is zero too, else inf.
    """
    x, y = _pair(sr, lr, op)
    num = np.sqrt(_sq_norm(op.forward(x) - y).astype(np.float64))[..., 0, 0]
    den = np.sqrt(_sq_norm(y).astype(np.float64))[..., 0, 0]
    den = np.broadcast_to(den, num.shape)
    out = np.where(num == 0, 0.0, np.inf)
    return np.divide(num, den, out=out, where=den > 0)
