"""medsr.eval.metrics against skimage, pywt and hand-built images with known answers."""

import itertools
import math

import numpy as np
import pytest

pywt = pytest.importorskip("pywt")
skmetrics = pytest.importorskip("skimage.metrics")

from medsr.errors import InputError, ShapeError
from medsr.eval import metrics


def _pair(shape, noise, seed=0):
    """A smooth-ish reference in [0, 1] and a noisy copy clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ref = 0.5 + 0.3 * np.sin(xx / 7.0) * np.cos(yy / 5.0) + 0.1 * rng.random(shape)
    pred = np.clip(ref + noise * rng.standard_normal(shape), 0.0, 1.0)
    return pred, ref


def _skimage_ssim(pred, ref, data_range, **kw):
    """skimage SSIM with the paper's (Wang 2004) settings."""
    return skmetrics.structural_similarity(
        ref, pred, data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw
    )


@pytest.mark.parametrize(
    "scale, offset, data_range",
    [
        (1.0, 0.0, 1.0),  # images in [0, 1]
        (2.0, -1.0, 2.0),  # images in [-1, 1], the model's convention
        (255.0, 0.0, 255.0),  # 8-bit scale as floats
    ],
)
def test_psnr_matches_skimage(scale, offset, data_range):
    pred, ref = _pair((48, 40), 0.05)
    pred, ref = pred * scale + offset, ref * scale + offset
    expected = skmetrics.peak_signal_noise_ratio(ref, pred, data_range=data_range)
    assert metrics.psnr(pred, ref, data_range) == pytest.approx(expected, rel=1e-12)


def test_psnr_uint8_does_not_wrap_and_identical_is_inf():
    black, white = np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8)
    assert metrics.psnr(black, white, 255) == pytest.approx(0.0, abs=1e-12)  # MSE = 255^2 exactly
    assert metrics.psnr(white, white, 255) == math.inf


@pytest.mark.parametrize(
    "args, error",
    [
        ((np.zeros((4, 4)), np.zeros((4, 5)), 1.0), ShapeError),  # shapes differ
        ((np.zeros((4, 4, 1)), np.zeros((4, 4, 1)), 1.0), ShapeError),  # not 2-D
        ((np.full((4, 4), np.nan), np.zeros((4, 4)), 1.0), InputError),  # NaN pixels
        ((np.zeros((4, 4)), np.zeros((4, 4)), 0.0), InputError),  # data_range not > 0
        ((np.zeros((4, 4)), np.zeros((4, 4)), math.inf), InputError),  # data_range not finite
    ],
)
def test_psnr_rejects_bad_input(args, error):
    with pytest.raises(error):
        metrics.psnr(*args)


def test_ssim_uses_gaussian_window_settings():
    pred, ref = _pair((40, 36), 0.1)
    value = metrics.ssim(pred, ref, 1.0)
    assert value == pytest.approx(_skimage_ssim(pred, ref, 1.0), abs=1e-12)
    # skimage's defaults (7x7 uniform window) give a different number: the settings are really in force
    assert abs(value - skmetrics.structural_similarity(ref, pred, data_range=1.0)) > 1e-3
    assert metrics.ssim(ref, ref, 1.0) == pytest.approx(1.0)


def test_ssim_rejects_images_smaller_than_window():
    with pytest.raises(ShapeError, match="11x11"):
        metrics.ssim(np.zeros((10, 30)), np.zeros((10, 30)), 1.0)


@pytest.mark.parametrize("seed, noise, data_range", [(0, 0.05, 1.0), (1, 0.2, 1.0), (2, 0.1, 2.0)])
def test_own_ssim_terms_match_skimage(seed, noise, data_range):
    # the hand-written SSIM used inside MS-SSIM against skimage; its cs term against skimage with the luminance
    # term switched off (K1 huge makes (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) = 1 to 1e-12)
    pred, ref = _pair((37, 45), noise, seed)
    full, cs = metrics._ssim_and_cs(pred, ref, data_range)
    assert full == pytest.approx(_skimage_ssim(pred, ref, data_range), abs=1e-10)
    assert cs == pytest.approx(_skimage_ssim(pred, ref, data_range, K1=1e6), abs=1e-9)


def test_halve_is_block_mean_with_edge_extension():
    x = np.array([[1.0, 3.0, 5.0], [3.0, 5.0, 7.0], [10.0, 20.0, 30.0]])
    # blocks: [[1,3],[3,5]] -> 3; [[5,5],[7,7]] -> 6; [[10,20],[10,20]] -> 15; [[30,30],[30,30]] -> 30
    np.testing.assert_allclose(metrics._halve(x), [[3.0, 6.0], [15.0, 30.0]])


def test_ms_ssim_identity_one_scale_and_size_limit():
    pred, ref = _pair((170, 176), 0.1)
    assert metrics.ms_ssim(ref, ref, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ms_ssim(pred, ref, 1.0, weights=(1.0,)) == pytest.approx(metrics.ssim(pred, ref, 1.0), abs=1e-10)
    assert metrics.ms_ssim_min_side() == 161
    assert math.isnan(metrics.ms_ssim(pred[:160], ref[:160], 1.0))
    assert math.isfinite(metrics.ms_ssim(pred[:161], ref[:161], 1.0))


def test_ms_ssim_matches_product_of_skimage_terms():
    # Wang 2003: prod_{j<5} cs_j^w_j * SSIM_5^w_5, each term from skimage at the successive 2x2-mean scales
    pred, ref = _pair((170, 185), 0.15, seed=3)
    expected = 1.0
    for j, w in enumerate(metrics.MS_SSIM_WEIGHTS):
        last = j == len(metrics.MS_SSIM_WEIGHTS) - 1
        term = _skimage_ssim(pred, ref, 1.0) if last else _skimage_ssim(pred, ref, 1.0, K1=1e6)
        expected *= max(term, 0.0) ** w
        pred, ref = metrics._halve(pred), metrics._halve(ref)
    assert metrics.ms_ssim(*_pair((170, 185), 0.15, seed=3), 1.0) == pytest.approx(expected, abs=1e-9)


def test_ms_ssim_decreases_with_noise():
    values = [metrics.ms_ssim(*_pair((176, 176), noise, seed=4), 1.0) for noise in (0.01, 0.03, 0.1, 0.3)]
    assert all(a > b for a, b in itertools.pairwise(values)), values
    assert 0.0 <= values[-1] < values[0] < 1.0


def test_ms_ssim_rejects_bad_weights():
    with pytest.raises(InputError, match="weights"):
        metrics.ms_ssim(np.zeros((200, 200)), np.zeros((200, 200)), 1.0, weights=(0.5, -0.5))


def test_wavelet_band_names():
    assert metrics.wavelet_band_names(2) == ["cA2", "cH2", "cV2", "cD2", "cH1", "cV1", "cD1"]
    assert len(metrics.wavelet_band_names(3)) == 10


def test_wavelet_band_psnr_matches_direct_pywt():
    pred, ref = _pair((64, 48), 0.05)
    got = metrics.wavelet_band_psnr(pred, ref, wavelet="haar", level=3)
    cp, cr = pywt.wavedec2(pred, "haar", level=3), pywt.wavedec2(ref, "haar", level=3)
    direct = {"cA3": (cp[0], cr[0])}
    for k, lev in enumerate((3, 2, 1), start=1):
        for name, p, r in zip("HVD", cp[k], cr[k]):
            direct[f"c{name}{lev}"] = (p, r)
    assert list(got) == list(direct)
    for band, (p, r) in direct.items():
        expected = 10 * np.log10(np.max(np.abs(r)) ** 2 / np.mean((p - r) ** 2))
        assert got[band] == pytest.approx(expected, rel=1e-12), band


@pytest.mark.parametrize("band_index, band", list(enumerate(metrics.wavelet_band_names(3))))
def test_error_injected_in_one_band_changes_only_that_band(band_index, band):
    rng = np.random.default_rng(band_index)
    ref = rng.random((64, 64))
    coeffs = pywt.wavedec2(ref, "haar", level=3)
    flat = [coeffs[0]] + [list(d) for d in coeffs[1:]]
    error = 0.05 * rng.standard_normal(flat[0].shape if band_index == 0 else flat[1 + (band_index - 1) // 3][0].shape)
    if band_index == 0:
        flat[0] = flat[0] + error
        ref_band = coeffs[0]
    else:
        level_k, which = 1 + (band_index - 1) // 3, (band_index - 1) % 3
        ref_band = coeffs[level_k][which]
        flat[level_k][which] = ref_band + error
    pred = pywt.waverec2([flat[0]] + [tuple(d) for d in flat[1:]], "haar")
    got = metrics.wavelet_band_psnr(pred, ref)
    expected = 10 * np.log10(np.max(np.abs(ref_band)) ** 2 / np.mean(error**2))
    assert got[band] == pytest.approx(expected, abs=1e-6)
    others = [v for name, v in got.items() if name != band]
    assert min(others) > 200.0  # untouched bands differ only by float round-off (~1e-16)


def test_wavelet_band_psnr_edge_values_and_errors():
    flat_image = np.full((16, 16), 0.5)
    bumped = flat_image + 0.01 * np.random.default_rng(0).standard_normal((16, 16))
    assert all(v == math.inf for v in metrics.wavelet_band_psnr(flat_image, flat_image, level=2).values())
    assert metrics.wavelet_band_psnr(bumped, flat_image, level=2)["cD1"] == -math.inf  # HR band all zero
    with pytest.raises(InputError, match="level"):
        metrics.wavelet_band_psnr(flat_image, flat_image, level=5)  # 16 px allows 4 haar levels
    with pytest.raises(InputError, match="wavelet"):
        metrics.wavelet_band_psnr(flat_image, flat_image, wavelet="nope")


def test_hallucination_rates_zero_threshold():
    hr = np.zeros((10, 10))
    sr = hr.copy()
    sr.flat[:7] = 0.5  # 7 pixels brighter than HR
    sr.flat[10:13] = -0.2  # 3 pixels darker
    rates = metrics.hallucination_rates(sr, hr, ae=hr)  # a perfect autoencoder: tau = 0
    assert rates == (0.0, 0.07, 0.03)


def test_hallucination_rates_known_threshold():
    hr = np.full((10, 10), 0.4)
    ae = hr.copy()
    ae.flat[::2] += 0.2  # |AE - HR| is 0 on half the pixels, 0.2 on the other: mean 0.1, std 0.1 -> tau 0.3
    sr = hr.copy()
    sr.flat[0:5] += 0.31  # above tau: hallucinated
    sr.flat[5:9] += 0.29  # below tau: not counted
    sr.flat[20:26] -= 0.35  # below -tau: lost
    sr.flat[30:32] -= 0.25  # within tau: not counted
    tau, hallucination, loss = metrics.hallucination_rates(sr, hr, ae)
    assert tau == pytest.approx(0.3, abs=1e-12)
    assert (hallucination, loss) == (0.05, 0.06)


def test_hallucination_rates_shape_mismatch_names_images():
    with pytest.raises(ShapeError, match="ae"):
        metrics.hallucination_rates(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 3)))


def test_cohens_h_hand_values():
    assert metrics.cohens_h(0.5, 0.25) == pytest.approx(math.pi / 6)  # pi/2 - pi/3
    assert metrics.cohens_h(1.0, 0.0) == pytest.approx(math.pi)
    assert metrics.cohens_h(0.25, 0.5) == pytest.approx(-math.pi / 6)
    assert metrics.cohens_h(0.3, 0.3) == 0.0
    with pytest.raises(InputError, match="p2"):
        metrics.cohens_h(0.5, 1.5)


def test_image_metrics_row():
    pred, ref = _pair((48, 48), 0.05)
    ae = np.clip(ref + 0.02, 0, 1)
    row = metrics.image_metrics(pred, ref, 1.0, ae=ae)
    assert row["psnr"] == metrics.psnr(pred, ref, 1.0)
    assert row["ssim"] == metrics.ssim(pred, ref, 1.0)
    assert math.isnan(row["ms_ssim"])  # 48 px < 161
    assert row["wavelet_psnr_cD1"] == metrics.wavelet_band_psnr(pred, ref)["cD1"]
    assert row["ae_psnr"] == metrics.psnr(ae, ref, 1.0)
    assert (row["hallucination_tau"], row["hallucination_rate"], row["loss_rate"]) == metrics.hallucination_rates(
        pred, ref, ae
    )
    without_ae = metrics.image_metrics(pred, ref, 1.0)
    assert set(row) - set(without_ae) == {"ae_psnr", "hallucination_tau", "hallucination_rate", "loss_rate"}
    assert len(without_ae) == 3 + 10
