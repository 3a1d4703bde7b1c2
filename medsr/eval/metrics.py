"""Per-image fidelity metrics of a super-resolved (SR) image against the true high-resolution (HR) image.

Images are 2-D arrays ``(H, W)`` of one intensity scale (any dtype; computed in float64, so uint8 inputs cannot
wrap around). ``data_range`` is the span of that scale (1.0 for [0, 1], 2.0 for [-1, 1], 255 for 8-bit): it is the
peak of PSNR and sets the SSIM constants. The definitions follow the evaluation of arXiv 2604.12152
(docs/sources.md, "The method"), always against the true HR image, never against a decoded HR latent.

Conventions chosen here:

- PSNR of identical images is ``math.inf`` (the value of 10 log10(peak^2 / 0)); statistics downstream exclude
  non-finite values and say how many.
- SSIM uses the settings of Wang et al. 2004 (and of torchmetrics, which the paper's MS-SSIM came from): 11x11
  Gaussian window, sigma 1.5, population (not sample) covariances, K1 = 0.01, K2 = 0.03, mean over the pixels whose
  window lies inside the image. These are not skimage's defaults (7x7 uniform window, sample covariance).
- MS-SSIM (Wang, Simoncelli, Bovik 2003) uses the same SSIM at 5 scales; it is ``math.nan`` for images too small
  for 5 scales (a side under 161 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from medsr.errors import InputError, ShapeError

SSIM_SIGMA = 1.5
"""Standard deviation (pixels) of the SSIM Gaussian window (Wang et al. 2004)."""
SSIM_TRUNCATE = 3.5
"""Window radius in units of sigma: int(3.5 * 1.5 + 0.5) = 5 pixels, an 11x11 window (skimage's convention)."""
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Exponents of the 5 scales, finest first (Wang, Simoncelli, Bovik 2003, table 1; torchmetrics' ``betas``)."""


def _image(name: str, x) -> np.ndarray:
    """Return ``x`` as a finite float64 (H, W) array, or raise naming ``name``."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ShapeError(f"{name} must be a 2-D (H, W) image, got shape {arr.shape}")
    if arr.size == 0:
        raise ShapeError(f"{name} is empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} has {int(np.sum(~np.isfinite(arr)))} NaN or Inf pixels")
    return arr


def _images(**named) -> list[np.ndarray]:
    """Validate several images of one shape, given by keyword so that errors name them."""
    arrays = {name: _image(name, x) for name, x in named.items()}
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ShapeError(f"images must have the same shape, got {shapes}")
    return list(arrays.values())


def _data_range(data_range: float) -> float:
    value = float(data_range)
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"data_range must be a finite number > 0, got {data_range!r}")
    return value


def psnr(pred, ref, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(data_range^2 / MSE(pred, ref)).

    Args:
        pred: (H, W) image under test (SR output).
        ref: (H, W) reference image (true HR).
        data_range: span of the intensity scale, the peak of the ratio (1.0 for images in [0, 1]).

    Returns:
        PSNR in dB; ``math.inf`` for identical images.
    """
    pred, ref = _images(pred=pred, ref=ref)
    peak = _data_range(data_range)
    mse = float(np.mean((pred - ref) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak**2 / mse)


def _require_side(shape: tuple[int, ...], side: int, what: str) -> None:
    if min(shape) < side:
        raise ShapeError(f"{what} needs images of at least {side}x{side} pixels, got shape {shape}")


def ssim(pred, ref, data_range: float) -> float:
    """Mean structural similarity (Wang et al. 2004) computed by ``skimage.metrics.structural_similarity``.

    Settings: Gaussian 11x11 window with sigma 1.5, population covariances, K1 = 0.01, K2 = 0.03 (the paper's
    settings, not skimage's defaults), constants C1 = (K1 data_range)^2, C2 = (K2 data_range)^2.

    Args:
        pred, ref: (H, W) images, both sides >= 11 pixels.
        data_range: span of the intensity scale.

    Returns:
        SSIM in [-1, 1]; 1.0 for identical images.
    """
    from skimage.metrics import structural_similarity

    pred, ref = _images(pred=pred, ref=ref)
    _require_side(ref.shape, 2 * SSIM_RADIUS + 1, "SSIM")
    return float(
        structural_similarity(
            ref,
            pred,
            data_range=_data_range(data_range),
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            K1=SSIM_K1,
            K2=SSIM_K2,
        )
    )


def _ssim_and_cs(x: np.ndarray, y: np.ndarray, peak: float) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term cs = (2 cov + C2) / (var_x + var_y + C2) of two images.

    Same window, constants and border crop as :func:`ssim` (a test checks the SSIM value against skimage).
    """
    from scipy.ndimage import gaussian_filter

    def blur(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * peak) ** 2, (SSIM_K2 * peak) ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    inner = (slice(SSIM_RADIUS, -SSIM_RADIUS),) * 2  # pixels whose window lies inside the image
    return float(np.mean((luminance * cs)[inner])), float(np.mean(cs[inner]))


def _halve(x: np.ndarray) -> np.ndarray:
    """2x2 block mean, (H, W) -> (ceil(H/2), ceil(W/2)); an odd side is first extended by repeating its edge."""
    h, w = x.shape
    x = np.pad(x, ((0, h % 2), (0, w % 2)), mode="edge")
    return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))


def ms_ssim_min_side(n_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Smallest image side for which the coarsest of ``n_scales`` still holds one 11x11 window (161 for 5)."""
    return 2 * SSIM_RADIUS * 2 ** (n_scales - 1) + 1


def ms_ssim(pred, ref, data_range: float, weights: Sequence[float] = MS_SSIM_WEIGHTS) -> float:
    """Multi-scale SSIM (Wang, Simoncelli, Bovik 2003): prod_j cs_j^w_j over the finer scales times SSIM_M^w_M.

    Scale j+1 is the 2x2 block mean of scale j (odd sides edge-extended, so 161 -> 81 -> 41 -> 21 -> 11). Each
    term is the mean over the window-interior pixels with the settings of :func:`ssim`; negative terms are set to 0
    before the fractional powers (torchmetrics' ``normalize="relu"``), so the result lies in [0, 1].

    Args:
        pred, ref: (H, W) images.
        data_range: span of the intensity scale.
        weights: exponents, finest scale first; the default is the paper's 5 scales. ``(1.0,)`` gives SSIM.

    Returns:
        MS-SSIM, 1.0 for identical images; ``math.nan`` when min(H, W) < ``ms_ssim_min_side(len(weights))``.
    """
    pred, ref = _images(pred=pred, ref=ref)
    peak = _data_range(data_range)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(w > 0):
        raise InputError(f"weights must be a non-empty sequence of positive numbers, got {weights!r}")
    if min(ref.shape) < ms_ssim_min_side(w.size):
        return math.nan
    terms = []
    for scale in range(w.size):
        full, cs = _ssim_and_cs(pred, ref, peak)
        if scale == w.size - 1:
            terms.append(full)
        else:
            terms.append(cs)
            pred, ref = _halve(pred), _halve(ref)
    return float(np.prod(np.maximum(terms, 0.0) ** w))


def wavelet_band_names(level: int = 3) -> list[str]:
    """Names of the bands of ``pywt.wavedec2(..., level)``, coarse to fine: cA3, cH3, cV3, cD3, ..., cD1.

    cH/cV/cD are the horizontal/vertical/diagonal details; the number is the level (1 = finest).
    """
    names = [f"cA{level}"]
    for lev in range(level, 0, -1):
        names += [f"cH{lev}", f"cV{lev}", f"cD{lev}"]
    return names


def _band_psnr(coef_pred: np.ndarray, coef_ref: np.ndarray) -> float:
    """10 log10(max|ref coeff|^2 / MSE): inf when the band is reproduced exactly, -inf for an all-zero HR band."""
    mse = float(np.mean((coef_pred - coef_ref) ** 2))
    if mse == 0.0:
        return math.inf
    peak = float(np.max(np.abs(coef_ref)))
    if peak == 0.0:
        return -math.inf
    return 10.0 * math.log10(peak**2 / mse)


def wavelet_band_psnr(pred, ref, wavelet: str = "haar", level: int = 3) -> dict[str, float]:
    """PSNR of each band of a 2-D discrete wavelet decomposition, the paper's frequency analysis.

    Both images are decomposed with ``pywt.wavedec2(img, wavelet, level=level)`` (pywt's default symmetric
    extension); each band's PSNR is 10 log10(max|HR coeff|^2 / MSE(SR coeff, HR coeff)), its peak taken from the HR
    band itself (docs/sources.md, "The method"). Unlike the paper's script, no cap: an exact band gives ``inf`` (theirs
    gave 100 dB) and an all-zero HR band with an error gives ``-inf`` (theirs gave 0 dB).

    Args:
        pred: (H, W) SR image.
        ref: (H, W) true HR image.
        wavelet: a discrete pywt wavelet name.
        level: decomposition depth, 1 .. ``pywt.dwtn_max_level(shape, wavelet)``.

    Returns:
        ``{band: PSNR dB}`` in the order of :func:`wavelet_band_names`.
    """
    import pywt

    pred, ref = _images(pred=pred, ref=ref)
    if wavelet not in pywt.wavelist(kind="discrete"):
        raise InputError(f"wavelet must be a discrete pywt wavelet such as 'haar' or 'db2', got {wavelet!r}")
    max_level = pywt.dwtn_max_level(ref.shape, wavelet)
    if not (isinstance(level, (int, np.integer)) and 1 <= level <= max_level):
        raise InputError(f"level must be an int in [1, {max_level}] for shape {ref.shape} and {wavelet}, got {level!r}")
    bands_pred = _flatten_bands(pywt.wavedec2(pred, wavelet, level=level))
    bands_ref = _flatten_bands(pywt.wavedec2(ref, wavelet, level=level))
    return {name: _band_psnr(bp, br) for name, bp, br in zip(wavelet_band_names(level), bands_pred, bands_ref)}


def _flatten_bands(coeffs: list) -> list[np.ndarray]:
    """[cA, (cH, cV, cD), ...] as returned by pywt.wavedec2 -> [cA, cH, cV, cD, ...]."""
    return [coeffs[0]] + [band for details in coeffs[1:] for band in details]


class HallucinationRates(NamedTuple):
    """Per-image hallucination analysis. ``tau`` is in image intensity units; the rates are pixel fractions."""

    tau: float
    hallucination_rate: float
    loss_rate: float


def hallucination_rates(sr, hr, ae) -> HallucinationRates:
    """Fractions of pixels where SR adds or removes intensity beyond the autoencoder's own error (the paper's test).

    tau = mean(|AE - HR|) + 2 std(|AE - HR|) (population std, as the paper's np.std); hallucination rate =
    fraction of pixels with SR - HR > tau; loss rate = fraction with SR - HR < -tau (strict inequalities).

    Args:
        sr: (H, W) SR image.
        hr: (H, W) true HR image.
        ae: (H, W) autoencoder reconstruction of the HR image (decode(encode(HR))).
    """
    sr, hr, ae = _images(sr=sr, hr=hr, ae=ae)
    ae_error = np.abs(ae - hr)
    tau = float(ae_error.mean() + 2.0 * ae_error.std())
    signed = sr - hr
    return HallucinationRates(tau, float(np.mean(signed > tau)), float(np.mean(signed < -tau)))


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size of two proportions: 2 asin(sqrt(p1)) - 2 asin(sqrt(p2)) (Cohen 1988).

    |h| < 0.2 is conventionally negligible; the paper reports h < 0.02 between hallucination rates.
    """
    for name, p in (("p1", p1), ("p2", p2)):
        if not 0.0 <= float(p) <= 1.0:
            raise InputError(f"{name} must be a proportion in [0, 1], got {p!r}")
    return 2.0 * math.asin(math.sqrt(float(p1))) - 2.0 * math.asin(math.sqrt(float(p2)))


def wavelet_key(band: str) -> str:
    """Column name of a wavelet band's PSNR in :func:`image_metrics` (e.g. ``wavelet_psnr_cD1``)."""
    return f"wavelet_psnr_{band}"


def image_metrics(sr, hr, data_range: float, *, ae=None, wavelet: str = "haar", level: int = 3) -> dict[str, float]:
    """All fidelity metrics of one SR image against its true HR image: one row of the fidelity CSV.

    Args:
        sr: (H, W) SR image (or a baseline's upsampled image).
        hr: (H, W) true HR image, same intensity scale.
        data_range: span of that scale.
        ae: optional (H, W) autoencoder reconstruction of ``hr``; adds the autoencoder ceiling and the
            hallucination analysis.
        wavelet, level: the wavelet decomposition of :func:`wavelet_band_psnr`.

    Returns:
        Flat ``{column: value}``: ``psnr``, ``ssim``, ``ms_ssim`` (NaN below 161 px), ``wavelet_psnr_<band>`` for each
        band of :func:`wavelet_band_names`; with ``ae`` also ``ae_psnr`` (PSNR(AE, HR), the autoencoder ceiling),
        ``hallucination_tau``, ``hallucination_rate``, ``loss_rate``.
    """
    row = {
        "psnr": psnr(sr, hr, data_range),
        "ssim": ssim(sr, hr, data_range),
        "ms_ssim": ms_ssim(sr, hr, data_range),
    }
    bands = wavelet_band_psnr(sr, hr, wavelet=wavelet, level=level)
    row.update({wavelet_key(band): value for band, value in bands.items()})
    if ae is not None:
        rates = hallucination_rates(sr, hr, ae)
        row["ae_psnr"] = psnr(ae, hr, data_range)
        row["hallucination_tau"] = rates.tau
        row["hallucination_rate"] = rates.hallucination_rate
        row["loss_rate"] = rates.loss_rate
    return row
