"""The degradation operators A: HR (..., H, W) -> LR (..., H/s, W/s), with their exact adjoints.

All four share one geometry: LR pixel i sits on HR pixel centre s*i + (s-1)/2 (docs/conventions.md; the
centre-aligned convention of PIL/OpenCV resizing, area averaging, F.interpolate(align_corners=False) and the affine
update of docs/conventions.md). Each is linear and separable, applied as ``M_H @ x @ M_W.T`` with the cached
one-axis matrices of :mod:`medsr.degrade.matrices`; the adjoint uses the transposes, so <A x, y> = <x, A^T y> holds
to rounding. A constant image keeps its value under every operator.
"""

import abc
import dataclasses
import numbers
from typing import ClassVar

import numpy as np

from medsr.degrade import matrices
from medsr.errors import InputError, ShapeError

#: Scale factors the operators are defined and tested for.
SCALES = (2, 3, 4)
#: Windows of the k-space operator (None: plain truncation).
WINDOWS = (None, "hann", "tukey")


def check_scale(scale) -> int:
    """Return ``scale`` as an int, or raise InputError if it is not one of :data:`SCALES`."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or int(scale) not in SCALES:
        raise InputError(f"scale must be one of {SCALES}, got {scale!r}")
    return int(scale)


def as_image(x, what: str) -> np.ndarray:
    """``x`` as a real float array of at least 2 dims: float32/float64 kept, other real dtypes made float64."""
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise InputError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ShapeError(f"{what} must have shape (..., H, W), got {arr.shape}")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    return arr


def hr_size(shape: tuple, factors: tuple[int, int], what: str = "hr") -> tuple[int, int]:
    """(H, W) of an HR shape, or ShapeError when they are not positive multiples of the per-axis ``factors``
    (f_H, f_W): (s, s) in-plane, (1, s) for thick slices along W."""
    h, w = shape[-2:]
    if h < factors[0] or w < factors[1] or h % factors[0] or w % factors[1]:
        axes = f"H and W (the last two axes) must be positive multiples of scale {factors[1]}"
        if factors[0] != factors[1]:
            axes = f"W (the last axis, the slice direction) must be a positive multiple of scale {factors[1]}"
        raise ShapeError(f"{what} shape {shape}: {axes}; crop or pad the image first")
    return h, w


def lr_size(shape: tuple, what: str = "lr") -> tuple[int, int]:
    """(h, w) of an LR shape, or ShapeError when one of them is 0."""
    h, w = shape[-2:]
    if h < 1 or w < 1:
        raise ShapeError(f"{what} shape {shape}: h and w (the last two axes) must be at least 1")
    return h, w


def apply_separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``rows @ x @ cols.T`` over the last two axes of ``x`` (any leading dims), in ``x``'s dtype."""
    return rows.astype(x.dtype, copy=False) @ (x @ cols.T.astype(x.dtype, copy=False))


@dataclasses.dataclass(frozen=True)
class Degradation(abc.ABC):
    """A linear, separable degradation by an integer ``scale``; subclasses give the one-axis matrix.

    Parameters
    ----------
    scale : int
        The downsampling factor s, one of :data:`SCALES`.
    """

    scale: int
    name: ClassVar[str]

    def __post_init__(self):
        object.__setattr__(self, "scale", check_scale(self.scale))

    @property
    def factors(self) -> tuple[int, int]:
        """The downsampling factor of each image axis (H, W): (s, s), in-plane."""
        return (self.scale, self.scale)

    @abc.abstractmethod
    def matrix(self, n_hr: int) -> np.ndarray:
        """The (n_hr // scale, n_hr) float64 read-only matrix of one axis (n_hr a multiple of scale)."""

    def forward(self, hr) -> np.ndarray:
        """A(hr): (..., H, W) -> (..., H/s, W/s); float32 stays float32, anything else real becomes float64.

        Raises ShapeError if H or W is not a positive multiple of s.
        """
        x = as_image(hr, "hr")
        h, w = hr_size(x.shape, self.factors)
        return apply_separable(x, self.matrix(h), self.matrix(w))

    def adjoint(self, lr) -> np.ndarray:
        """A^T(lr): (..., h, w) -> (..., h*s, w*s), the exact adjoint of :meth:`forward` (same dtype rule)."""
        y = as_image(lr, "lr")
        h, w = lr_size(y.shape)
        return apply_separable(y, self.matrix(h * self.scale).T, self.matrix(w * self.scale).T)

    def to_dict(self) -> dict:
        """JSON-able ``{"name": ..., "scale": ..., **params}`` without the parameters left at None (the manifest's
        ``task.degradation``); :func:`degradation_from_dict` inverts it."""
        params = {key: value for key, value in dataclasses.asdict(self).items() if value is not None}
        return {"name": self.name, **params}


@dataclasses.dataclass(frozen=True)
class KSpaceTruncation(Degradation):
    """MRI-like LR: keep the central (H/s, W/s) block of the 2D Fourier transform, centre-aligned.

    Per axis this is :func:`medsr.degrade.matrices.kspace_matrices`: the HR image truncated to |k| <= n/2 (n the LR
    size) and sampled at the LR pixel centres, the (s-1)/2 shift done by a Fourier phase ramp (docs/sources.md,
    "Degradations and fair baselines"). The usual crop of ``fftshift(fft2(hr))`` would put LR pixel i on HR pixel
    s*i instead.

    Parameters
    ----------
    window : {None, "hann", "tukey"}
        Optional apodisation of the kept frequencies (weight 1 at k = 0, 0 at the LR Nyquist frequency).
    alpha : float, optional
        Tukey taper fraction in (0, 1]; only with ``window="tukey"``, where it defaults to 0.5.
    """

    window: str | None = None
    alpha: float | None = None
    name: ClassVar[str] = "kspace"

    def __post_init__(self):
        super().__post_init__()
        if self.window not in WINDOWS:
            raise InputError(f"kspace window must be one of {WINDOWS}, got {self.window!r}")
        if self.window != "tukey":
            if self.alpha is not None:
                raise InputError(f"kspace alpha applies only to window='tukey', got window={self.window!r}")
            return
        alpha = 0.5 if self.alpha is None else self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha <= 1.0:
            raise InputError(f"kspace alpha must be in (0, 1], got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))

    def matrix(self, n_hr: int) -> np.ndarray:
        return matrices.kspace_matrices(n_hr, self.scale, self.window, self.alpha)[0]

    def pseudo_inverse(self, lr) -> np.ndarray:
        """A^+(lr): (..., h, w) -> (..., h*s, w*s), zero-filled k-space interpolation (divided by the window).

        Unwindowed this is the zero-filled (sinc) baseline; A(A^+(y)) = y, and A^+ A is the orthogonal projection
        onto the image's central k-space block.
        """
        y = as_image(lr, "lr")
        h, w = lr_size(y.shape)
        rows = matrices.kspace_matrices(h * self.scale, self.scale, self.window, self.alpha)[1]
        cols = matrices.kspace_matrices(w * self.scale, self.scale, self.window, self.alpha)[1]
        return apply_separable(y, rows, cols)


@dataclasses.dataclass(frozen=True)
class AreaAverage(Degradation):
    """Mean of each s x s block (a detector integrating over its pixel; PIL's BOX and OpenCV's INTER_AREA)."""

    name: ClassVar[str] = "area"

    def matrix(self, n_hr: int) -> np.ndarray:
        return matrices.area_matrix(n_hr, self.scale)


@dataclasses.dataclass(frozen=True)
class BicubicDownsample(Degradation):
    """Antialiased Keys bicubic (a = -0.5, stretched by s) as PIL's ``resize(BICUBIC)``; see ``resample_matrix``."""

    name: ClassVar[str] = "bicubic"

    def matrix(self, n_hr: int) -> np.ndarray:
        return matrices.resample_matrix(n_hr, n_hr // self.scale, self.name)


@dataclasses.dataclass(frozen=True)
class LanczosDownsample(Degradation):
    """Antialiased Lanczos-3 (stretched by s) as PIL's ``resize(LANCZOS)``, how the paper made its LR images."""

    name: ClassVar[str] = "lanczos"

    def matrix(self, n_hr: int) -> np.ndarray:
        return matrices.resample_matrix(n_hr, n_hr // self.scale, self.name)


#: Operators by manifest name; medsr.degrade.slices registers the through-plane ``thick_slices`` with
#: :func:`register_degradation`.
OPERATORS: dict[str, type[Degradation]] = {
    cls.name: cls for cls in (KSpaceTruncation, AreaAverage, BicubicDownsample, LanczosDownsample)
}


def register_degradation(cls: type[Degradation]) -> type[Degradation]:
    """Make ``cls`` known to :func:`make_degradation` and :func:`degradation_from_dict` under ``cls.name``."""
    OPERATORS[cls.name] = cls
    return cls


def make_degradation(name: str, scale: int, **params) -> Degradation:
    """The operator called ``name`` (one of :data:`OPERATORS`) at ``scale``, with its optional ``params``.

    Raises InputError for an unknown name, scale or parameter, naming what is accepted.
    """
    if not isinstance(name, str) or name not in OPERATORS:
        raise InputError(f"unknown degradation {name!r}; expected one of {sorted(OPERATORS)}")
    cls = OPERATORS[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.name != "scale"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InputError(f"degradation {name!r} takes parameters {accepted}, got unknown {unknown}")
    return cls(scale, **params)


def degradation_from_dict(d: dict) -> Degradation:
    """Inverse of :meth:`Degradation.to_dict` (e.g. read back from a bundle manifest)."""
    if not isinstance(d, dict) or "name" not in d or "scale" not in d:
        raise InputError(f"a degradation must be a dict with 'name' and 'scale', got {d!r}")
    params = {k: v for k, v in d.items() if k not in ("name", "scale")}
    return make_degradation(d["name"], d["scale"], **params)
