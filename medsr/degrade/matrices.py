"""One-axis matrices of the degradation operators, built once per size and cached.

Every operator of :mod:`medsr.degrade` is separable: on an image ``x`` of shape (H, W) it computes
``M_H @ x @ M_W.T`` with ``M_n`` the (n // s, n) matrix of one axis built here, so its adjoint is exactly the
transpose. Matrices are float64, read-only (they are shared through the cache) and indexed ``[lr, hr]``.

Geometry (docs/conventions.md): HR pixel j covers [j, j + 1) in edge coordinates, so its centre is j + 0.5;
LR pixel i covers HR [s*i, s*i + s) and sits on HR pixel centre s*i + (s-1)/2.
"""

import functools

import numpy as np

#: Keys' cubic convolution parameter; -0.5 is PIL's, OpenCV's and MATLAB's bicubic.
KEYS_A = -0.5
#: Lanczos lobes; 3 is PIL's LANCZOS.
LANCZOS_A = 3


def keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (support [-2, 2]), at positions ``x`` in pixels."""
    ax = np.abs(x)
    near = ((KEYS_A + 2.0) * ax - (KEYS_A + 3.0)) * ax * ax + 1.0
    far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * KEYS_A
    return np.where(ax < 1.0, near, np.where(ax < 2.0, far, 0.0))


def lanczos3(x: np.ndarray) -> np.ndarray:
    """Lanczos kernel sinc(x) sinc(x/3) on [-3, 3], zero outside (``np.sinc`` is the normalised sinc)."""
    return np.where(np.abs(x) < LANCZOS_A, np.sinc(x) * np.sinc(x / LANCZOS_A), 0.0)


#: name -> (kernel, support radius in pixels of the unstretched kernel)
KERNELS = {"bicubic": (keys_cubic, 2.0), "lanczos": (lanczos3, float(LANCZOS_A))}


def _read_only(m: np.ndarray) -> np.ndarray:
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=128)
def resample_matrix(n_in: int, n_out: int, kernel: str) -> np.ndarray:
    """(n_out, n_in) matrix resampling one axis the way PIL's ``Image.resize`` does.

    Output pixel o sits at input edge coordinate (o + 0.5) * n_in / n_out (the shared centre-aligned geometry).
    When shrinking, the kernel is stretched by n_in / n_out so that it also low-passes (antialiasing, as PIL); when
    enlarging it is used as is. Boundary: taps that fall outside the image are dropped and each row is
    renormalised to sum to 1, which is PIL's rule (the paper made its LR images with PIL, docs/sources.md, "The method");
    it keeps constants constant, and differs from a symmetric reflection only within the kernel's reach of the
    border (2 output pixels for bicubic, 3 for Lanczos).
    """
    func, _ = KERNELS[kernel]
    ratio = n_in / n_out
    stretch = max(ratio, 1.0)
    centres = (np.arange(n_out) + 0.5) * ratio
    offsets = (np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / stretch
    weights = func(offsets)
    return _read_only(weights / weights.sum(axis=1, keepdims=True))


@functools.lru_cache(maxsize=128)
def area_matrix(n_hr: int, scale: int) -> np.ndarray:
    """(n_hr // scale, n_hr) matrix averaging each run of ``scale`` HR pixels into one LR pixel."""
    return _read_only(np.kron(np.eye(n_hr // scale), np.full((1, scale), 1.0 / scale)))


def kspace_window(n_lr: int, window: str | None, alpha: float | None) -> np.ndarray:
    """Weights of the kept frequencies k = -(n_lr // 2) .. n_lr // 2, as a float64 array of that length.

    ``None`` keeps every frequency at weight 1; ``"tukey"`` is flat for |k| / n_lr <= (1 - alpha) / 2 and falls as
    a raised cosine to 0 at |k| / n_lr = 1/2 (the LR Nyquist frequency); ``"hann"`` is Tukey with alpha = 1. The
    weight at k = 0 is 1 for every window, so a constant image keeps its value.
    """
    k_max = n_lr // 2
    f = np.abs(np.arange(-k_max, k_max + 1)) / n_lr
    if window is None:
        return np.ones_like(f)
    alpha = 1.0 if window == "hann" else alpha
    flat = (1.0 - alpha) / 2.0
    taper = 0.5 * (1.0 + np.cos(np.pi * (f - flat) / (alpha / 2.0)))
    return np.where(f <= flat, 1.0, np.where(f >= 0.5, 0.0, taper))


def _circulant_rows(spectrum: np.ndarray, n_hr: int, scale: int, sign: int) -> np.ndarray:
    """(n_lr, n_hr) matrix R[i, m] = c[(sign * (s*i - m)) mod n_hr] with c = ifft(spectrum).real."""
    kernel = np.fft.ifft(spectrum).real
    i = np.arange(n_hr // scale)[:, None]
    m = np.arange(n_hr)[None, :]
    return kernel[(sign * (scale * i - m)) % n_hr]


@functools.lru_cache(maxsize=128)
def kspace_matrices(n_hr: int, scale: int, window: str | None, alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(T, U): k-space truncation (n_lr, n_hr) and its zero-filling pseudo-inverse (n_hr, n_lr) for one axis.

    With X the DFT of the HR row x, d = (s-1)/2 and a_k the window weights of :func:`kspace_window`,

        (T x)[i] = (1/N) sum_{|k| <= n/2} a_k X[k] exp(2 pi i k (s*i + d) / N),

    i.e. the HR signal truncated to its central band and sampled at the LR pixel centres. The phase ramp
    exp(2 pi i k d / N) is the (s-1)/2 shift of docs/conventions.md that puts LR pixel i on HR centre s*i + d
    instead of s*i. A constant keeps its value (a_0 = 1). For an even n_lr the LR Nyquist frequency n/2 is measured
    by both HR frequencies +n/2 and -n/2 folded together, as sampling does (scipy.signal.resample's convention);
    this keeps the output real, and a band-limited row (X[k] = 0 for |k| >= n/2) is sampled exactly.

    U is the Moore-Penrose pseudo-inverse of T: LR frequency k goes back to HR frequency k with the opposite phase
    ramp, scaled by 1 / a_k (frequencies of weight 0 are left empty), and the LR Nyquist value is split half and
    half between +n/2 and -n/2. Unwindowed, U is zero-filled k-space (sinc) interpolation, T @ U is the identity,
    and U @ T is the orthogonal projection onto the central band.
    """
    n_lr = n_hr // scale
    shift = (scale - 1) / 2.0
    k = np.arange(-(n_lr // 2), n_lr // 2 + 1)
    a = kspace_window(n_lr, window, alpha)
    nyquist = 2 * np.abs(k) == n_lr
    b = np.divide(1.0, a * np.where(nyquist, 2.0, 1.0), out=np.zeros_like(a), where=a > 0)
    ramp = np.exp(2j * np.pi * k * shift / n_hr)
    spec_t = np.zeros(n_hr, complex)
    spec_t[k % n_hr] = a * ramp
    spec_u = np.zeros(n_hr, complex)
    spec_u[k % n_hr] = b * np.conj(ramp) * scale
    forward = _circulant_rows(spec_t, n_hr, scale, 1)
    inverse = _circulant_rows(spec_u, n_hr, scale, -1).T
    return _read_only(forward), _read_only(np.ascontiguousarray(inverse))
