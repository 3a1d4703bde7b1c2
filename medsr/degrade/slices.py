"""2D multi-slice acquisition along one axis: thick slices, their exact data consistency, and slice-axis baselines.

Most clinical MRI is acquired as 2D multi-slice: fine in-plane, thick slices (docs/sources.md, "Through-plane
super-resolution"). Along the slice axis the acquisition blurs by the slice profile (a Gaussian or a box whose FWHM is
the slice thickness) and keeps one slice every s HR voxels; the thickness may be smaller than the spacing (a gap) or
larger (an overlap). With an HR voxel of v mm, slices of thickness T mm every S mm are ``scale = S / v`` (an integer)
and ``fwhm = T / v`` in HR voxels.

Geometry (docs/conventions.md): HR voxel j spans [j - 0.5, j + 0.5] in index coordinates; LR slice i sits on HR
voxel centre s*i + (s-1)/2, as every operator of :mod:`medsr.degrade`. Everything here is a small one-axis matrix,
built once per size and cached read-only (the machinery of :mod:`medsr.degrade.matrices`), applied along ``axis`` of
an array of any number of dims. float32 stays float32, other real dtypes become float64. :class:`ThickSlicePlanes`
is the same acquisition as the degradation (``thick_slices``) of a through-plane task, on the planes its model sees.
"""

import dataclasses
import functools
import math
import numbers
from typing import ClassVar

import numpy as np

from medsr.degrade import matrices
from medsr.degrade.operators import Degradation, as_image, register_degradation
from medsr.errors import InputError, ShapeError

#: Slice profiles of :class:`SliceProfile`.
SLICE_PROFILES = ("gaussian", "box")
#: Methods of :func:`upsample_slices`.
SLICE_BASELINES = ("linear", "bspline", "sinc")
#: FWHM of a Gaussian over its standard deviation, 2 sqrt(2 ln 2).
GAUSSIAN_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Largest condition number of A A^T accepted by :func:`thick_slice_pinv`. Measured on random volumes with 40
#: slices and Gaussian profiles: the relative residual |A x' - y| / |y| of :meth:`ThickSlices.project` is <= 3e-15
#: for fwhm <= 2 s (s = 1 to 6, cond <= 740), and at s = 2, 4, 6 <= 5e-12 at fwhm = 3.25 s (cond 5.5e7) and <= 5e-10
#: at fwhm = 3.75 s (cond 1.7e10).
MAX_CONDITION = 1e10

_erfc = np.frompyfunc(math.erfc, 1, 1)


def _check_scale(scale) -> int:
    """``scale`` as an int >= 1, or InputError. Not limited to medsr's in-plane SCALES: 3-6 mm slices over
    0.4-1 mm voxels are factors of 3 to 15 (docs/sources.md, "Through-plane super-resolution")."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1:
        raise InputError(f"slice scale must be an integer >= 1 (HR voxels per slice spacing), got {scale!r}")
    return int(scale)


@dataclasses.dataclass(frozen=True)
class SliceProfile:
    """The sensitivity of one slice along the slice axis: a ``"gaussian"`` or a ``"box"`` of full width at half
    maximum ``fwhm`` (the slice thickness, in HR voxels, > 0).

    The profile is integrated over each HR voxel, not sampled at its centre: an HR voxel is a volume the slice sees
    in part, and a box of FWHM s then averages exactly the s voxels of its slice (area averaging).
    """

    kind: str
    fwhm: float

    def __post_init__(self):
        if self.kind not in SLICE_PROFILES:
            raise InputError(f"slice profile must be one of {SLICE_PROFILES}, got {self.kind!r}")
        fwhm = self.fwhm
        if isinstance(fwhm, bool) or not isinstance(fwhm, numbers.Real) or not (0.0 < fwhm < math.inf):
            raise InputError(f"slice fwhm must be a finite number > 0 (HR voxels), got {fwhm!r}")
        object.__setattr__(self, "fwhm", float(fwhm))

    def voxel_weights(self, offsets: np.ndarray) -> np.ndarray:
        """The profile (unit area, centred on 0) integrated over the HR voxels [d - 0.5, d + 0.5] for each offset d
        (HR voxel centre minus slice centre, in HR voxels); float64, same shape as ``offsets``."""
        d = np.abs(np.asarray(offsets, np.float64))
        if self.kind == "box":
            half = self.fwhm / 2.0
            return np.clip(np.minimum(d + 0.5, half) - np.maximum(d - 0.5, -half), 0.0, None) / self.fwhm
        # Upper-tail difference of the normal CDF on |d|: accurate far in the tails and exactly symmetric.
        z = math.sqrt(2.0) * self.fwhm / GAUSSIAN_FWHM_PER_SIGMA
        return 0.5 * (_erfc((d - 0.5) / z) - _erfc((d + 0.5) / z)).astype(np.float64)


@functools.lru_cache(maxsize=128)
def thick_slice_matrix(n_hr: int, scale: int, profile: SliceProfile) -> np.ndarray:
    """(n_hr // scale, n_hr) matrix of one axis: row i is ``profile`` centred on HR voxel s*i + (s-1)/2, integrated
    over each HR voxel.

    Boundary: the rule of :func:`medsr.degrade.matrices.resample_matrix`. Weights of voxels outside the volume are
    dropped and each row is renormalised to sum to 1, so a constant keeps its value; only slices whose profile
    reaches past the first or last HR voxel change.
    """
    centres = scale * np.arange(n_hr // scale) + (scale - 1) / 2.0
    weights = profile.voxel_weights(np.arange(n_hr)[None, :] - centres[:, None])
    return matrices._read_only(weights / weights.sum(axis=1, keepdims=True))


@functools.lru_cache(maxsize=128)
def thick_slice_pinv(n_hr: int, scale: int, profile: SliceProfile) -> np.ndarray:
    """(n_hr, n_hr // scale) pseudo-inverse A^T (A A^T)^-1 of :func:`thick_slice_matrix`, solved once per size.

    Raises InputError when A A^T is too ill-conditioned (condition number above :data:`MAX_CONDITION`) for the
    measured slices to be reproduced to rounding: a profile much wider than the slice spacing.
    """
    a = thick_slice_matrix(n_hr, scale, profile)
    gram = a @ a.T
    condition = np.linalg.cond(gram)
    if not condition <= MAX_CONDITION:
        raise InputError(
            f"a {profile.kind} slice profile of fwhm {profile.fwhm} HR voxels at spacing {scale} overlaps its "
            f"neighbours too much for exact data consistency (cond(A A^T) = {condition:.3g} > {MAX_CONDITION:.0e})"
        )
    return matrices._read_only(np.ascontiguousarray(np.linalg.solve(gram, a).T))


def _as_array(x, what: str) -> np.ndarray:
    """``x`` as a real float array of at least 1 dim, by :func:`~medsr.degrade.operators.as_image`'s dtype rule
    (its leading axis is added only to pass its ndim >= 2 check and taken off again)."""
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ShapeError(f"{what} must be an array with a slice axis, got a scalar")
    return as_image(arr[None], what)[0]


def _axis_size(x: np.ndarray, axis: int, what: str) -> int:
    """Size of ``x`` along ``axis``, or ShapeError when the axis does not exist."""
    if not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"{what} shape {x.shape} has no axis {axis}")
    return x.shape[axis]


def _along(m: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """Apply the one-axis matrix ``m`` (n_out, n_in) along ``axis`` of ``x``, in ``x``'s dtype."""
    moved = np.moveaxis(x, axis, -1) @ m.T.astype(x.dtype, copy=False)
    return np.moveaxis(moved, -1, axis)


@dataclasses.dataclass(frozen=True)
class ThickSlices:
    """The 2D multi-slice acquisition A along one axis: HR (..., n_hr, ...) -> LR (..., n_hr / s, ...).

    LR slice i is the HR volume weighted by ``profile`` (integrated over each HR voxel, see :class:`SliceProfile`)
    centred on HR voxel s*i + (s-1)/2, and A^T is its exact adjoint. A box of FWHM s is area averaging along the axis.

    Parameters
    ----------
    scale : int
        Slice spacing s in HR voxels (>= 1); n_hr must be a multiple of it.
    axis : int
        The slice axis (negative counts from the end).
    profile : {"gaussian", "box"}
        Shape of the slice profile.
    fwhm : float, optional
        Slice thickness in HR voxels; defaults to ``scale`` (contiguous slices). Below ``scale`` leaves a gap,
        above it overlaps the neighbouring slices.
    """

    scale: int
    axis: int = -1
    profile: str = "gaussian"
    fwhm: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "scale", _check_scale(self.scale))
        if isinstance(self.axis, bool) or not isinstance(self.axis, numbers.Integral):
            raise InputError(f"slice axis must be an int, got {self.axis!r}")
        object.__setattr__(self, "axis", int(self.axis))
        fwhm = float(self.scale) if self.fwhm is None else self.fwhm
        object.__setattr__(self, "fwhm", SliceProfile(self.profile, fwhm).fwhm)

    @property
    def slice_profile(self) -> SliceProfile:
        """The :class:`SliceProfile` of this acquisition."""
        return SliceProfile(self.profile, self.fwhm)

    def matrix(self, n_hr: int) -> np.ndarray:
        """The (n_hr // scale, n_hr) float64 read-only matrix of the slice axis."""
        return thick_slice_matrix(n_hr, self.scale, self.slice_profile)

    def _hr(self, hr, what: str) -> tuple[np.ndarray, int]:
        x = _as_array(hr, what)
        n_hr = _axis_size(x, self.axis, what)
        if n_hr < self.scale or n_hr % self.scale:
            raise ShapeError(
                f"{what} shape {x.shape}: axis {self.axis} has {n_hr} voxels, not a positive multiple of the slice "
                f"spacing {self.scale}; crop or pad the volume first"
            )
        return x, n_hr

    def forward(self, hr) -> np.ndarray:
        """A(hr): the thick slices of ``hr``, n_hr / s of them along ``axis``. Raises ShapeError if the axis is
        missing or its size is not a positive multiple of s."""
        x, n_hr = self._hr(hr, "hr")
        return _along(self.matrix(n_hr), x, self.axis)

    def adjoint(self, lr) -> np.ndarray:
        """A^T(lr): (..., n_lr, ...) -> (..., n_lr * s, ...), the exact adjoint of :meth:`forward`."""
        y = _as_array(lr, "lr")
        n_lr = _axis_size(y, self.axis, "lr")
        if n_lr < 1:
            raise ShapeError(f"lr shape {y.shape} has no slices along axis {self.axis}")
        return _along(self.matrix(n_lr * self.scale).T, y, self.axis)

    def project(self, sr, lr) -> np.ndarray:
        """The volume nearest to ``sr`` whose thick slices are exactly ``lr``: sr + A^T (A A^T)^-1 (lr - A sr).

        This is the orthogonal projection onto {x : A x = lr}: the correction lies in the range of A^T, applying it
        again changes nothing, and what A cannot see (e.g. detail within a slice, or in a gap) is left as ``sr``
        has it. (A A^T)^-1 is solved once per size (:func:`thick_slice_pinv`). Along ``axis`` (counted on ``sr``)
        ``lr`` must have n_hr / s slices; its other dims broadcast against ``sr``'s as NumPy's do (leading dims
        may be missing). The result has ``sr``'s dtype.
        """
        x, n_hr = self._hr(sr, "sr")
        axis = self.axis if self.axis < 0 else self.axis - x.ndim
        y = _as_array(lr, "lr")
        if y.ndim < -axis or y.shape[axis] != n_hr // self.scale:
            raise ShapeError(
                f"lr shape {y.shape} does not match sr shape {x.shape}: axis {self.axis} of sr needs "
                f"{n_hr // self.scale} slices at spacing {self.scale}"
            )
        residual = y.astype(x.dtype, copy=False) - _along(self.matrix(n_hr), x, axis)
        return x + _along(thick_slice_pinv(n_hr, self.scale, self.slice_profile), residual, axis)


@register_degradation
@dataclasses.dataclass(frozen=True)
class ThickSlicePlanes(Degradation):
    """The degradation of a through-plane task (manifest ``{"name": "thick_slices", "scale": s, "profile": ...,
    "fwhm": ...}``): :class:`ThickSlices` along the last axis of planes (..., H, W) -> (..., H, W / s).

    The planes a through-plane model sees contain the slice axis as their second axis W (medsr.engine.volume), so
    H is kept and W is blurred by the slice profile and sampled every s HR voxels, LR slice i on HR voxel centre
    s*i + (s-1)/2. ``fwhm`` is the slice thickness in HR voxels (default s: contiguous slices). Unlike the in-plane
    operators ``scale`` may be any integer >= 2: 3-6 mm slices over 0.4-1 mm voxels are factors of 3 to 15.
    :meth:`project` is the exact data consistency (consistency mode ``"project"``).
    """

    profile: str = "gaussian"
    fwhm: float | None = None
    name: ClassVar[str] = "thick_slices"

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Integral) or self.scale < 2:
            raise InputError(f"thick_slices scale must be an integer >= 2 (HR voxels per slice), got {self.scale!r}")
        acquisition = ThickSlices(self.scale, -1, self.profile, self.fwhm)
        object.__setattr__(self, "scale", acquisition.scale)
        object.__setattr__(self, "fwhm", acquisition.fwhm)

    @property
    def factors(self) -> tuple[int, int]:
        """(1, s): only W, the slice direction, is downsampled."""
        return (1, self.scale)

    @property
    def acquisition(self) -> ThickSlices:
        """The :class:`ThickSlices` of the last axis."""
        return ThickSlices(self.scale, -1, self.profile, self.fwhm)

    def matrix(self, n_hr: int) -> np.ndarray:
        return self.acquisition.matrix(n_hr)

    def forward(self, hr) -> np.ndarray:
        """A(hr): (..., H, W) -> (..., H, W / s); ShapeError if W is not a positive multiple of s."""
        return self.acquisition.forward(as_image(hr, "hr"))

    def adjoint(self, lr) -> np.ndarray:
        """A^T(lr): (..., H, w) -> (..., H, w * s), the exact adjoint of :meth:`forward`."""
        return self.acquisition.adjoint(as_image(lr, "lr"))

    def project(self, sr, lr) -> np.ndarray:
        """The planes nearest to ``sr`` whose thick slices are exactly ``lr`` (:meth:`ThickSlices.project`)."""
        return self.acquisition.project(as_image(sr, "sr"), as_image(lr, "lr"))


def _reflect(k: np.ndarray, n: int) -> np.ndarray:
    """Sample index k of the half-sample symmetric extension (x[-1] = x[0], x[n] = x[n-1]) mapped into 0 .. n-1."""
    k = np.mod(k, 2 * n)
    return np.where(k < n, k, 2 * n - 1 - k)


def _hat(t: np.ndarray) -> np.ndarray:
    """Linear B-spline on [-1, 1]."""
    return np.clip(1.0 - np.abs(t), 0.0, None)


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """Cubic B-spline on [-2, 2]."""
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a * a + a**3 / 2.0, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


@functools.lru_cache(maxsize=128)
def slice_baseline_matrix(n_lr: int, scale: int, method: str) -> np.ndarray:
    """(n_lr * scale, n_lr) matrix interpolating one axis from the LR slices to the HR voxels with ``method``.

    HR voxel j sits at LR index coordinate t = (j - (s-1)/2) / s, the inverse of the one geometry, so
    t runs over [-(s-1)/(2s), n_lr - 1 + (s-1)/(2s)]. Beyond the first and last slice centres the LR slices are
    extended by half-sample symmetric reflection (x[-1] = x[0], scipy.ndimage's ``mode="reflect"``), for every
    method:

    - ``"linear"``: linear interpolation (scipy ``order=1``); within half a slice of the edge the reflection gives
      the edge slice, which is also the drop-and-renormalise rule of the operators.
    - ``"bspline"``: cubic B-spline interpolation (scipy ``order=3`` with its prefilter): the B-spline coefficients
      c solve the tridiagonal system x_m = (c_{m-1} + 4 c_m + c_{m+1}) / 6 of the reflected signal.
    - ``"sinc"``: band-limited (Fourier) interpolation of the reflected signal of period 2 n_lr, i.e. DCT-II of the
      slices zero-padded to n_hr and inverted: a cosine series with frequencies below the LR Nyquist frequency is
      reproduced exactly, and the reflection avoids the wrap-around of plain FFT zero-padding.
    """
    n_hr = n_lr * scale
    if method == "sinc":
        k = np.arange(1, n_lr)
        hr_basis = np.cos(np.pi * np.outer((np.arange(n_hr) + 0.5) / n_hr, k))
        lr_basis = np.cos(np.pi * np.outer(k, (np.arange(n_lr) + 0.5) / n_lr))
        return matrices._read_only((1.0 + 2.0 * hr_basis @ lr_basis) / n_lr)
    t = (np.arange(n_hr) - (scale - 1) / 2.0) / scale
    taps = np.arange(-2, n_lr + 2)
    fold = (_reflect(taps, n_lr)[:, None] == np.arange(n_lr)[None, :]).astype(np.float64)
    kernel = _hat if method == "linear" else _cubic_bspline
    weights = kernel(t[:, None] - taps[None, :]) @ fold
    if method == "linear":
        return matrices._read_only(weights)
    # Interpolation matrix of the coefficients, times the inverse of the (symmetric) prefilter system.
    prefilter = _cubic_bspline(np.arange(n_lr)[:, None] - taps[None, :]) @ fold
    return matrices._read_only(np.ascontiguousarray(np.linalg.solve(prefilter.T, weights.T).T))


def upsample_slices(lr, scale: int, axis: int = -1, method: str = "bspline") -> np.ndarray:
    """Interpolate the slices of ``lr`` along ``axis`` onto the HR grid (n_lr * s voxels there), with the
    slice-axis baselines users compare with (``"linear"``, cubic ``"bspline"``) or ``"sinc"``; see
    :func:`slice_baseline_matrix`. Same geometry as :class:`ThickSlices`, so a baseline is not penalised by a shift
    (docs/sources.md, "Degradations and fair baselines")."""
    scale = _check_scale(scale)
    if method not in SLICE_BASELINES:
        raise InputError(f"unknown slice baseline {method!r}; expected one of {SLICE_BASELINES}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise InputError(f"slice axis must be an int, got {axis!r}")
    y = _as_array(lr, "lr")
    n_lr = _axis_size(y, axis, "lr")
    if n_lr < 1:
        raise ShapeError(f"lr shape {y.shape} has no slices along axis {axis}")
    return _along(slice_baseline_matrix(n_lr, scale, method), y, axis)
