"""medsr.eval.compare (pairing by id, report, markdown) and medsr.eval.figures (atomic PNG writers)."""

import json
import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")
pytest.importorskip("matplotlib")

from medsr.errors import InputError, OutputError, ShapeError
from medsr.eval import compare, figures, metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary(config, ids, psnr, dataset="knee", **columns):
    """A fidelity summary dict; ``psnr`` and each column are {id: value}, inserted in the order of ``ids``."""
    images = {i: {"psnr": psnr[i], **{name: values[i] for name, values in columns.items()}} for i in ids}
    return {"config": config, "dataset": dataset, "images": images, "summary": {}}


def _natural_and_lexicographic(n=12):
    natural = [f"img{k}" for k in range(1, n + 1)]  # img1, img2, ..., img12
    return natural, sorted(natural)  # img1, img10, img11, img12, img2, ...


def test_pairs_by_id_whatever_the_order_of_records():
    natural, lexicographic = _natural_and_lexicographic()
    rng = np.random.default_rng(0)
    psnr_a = {i: 24.0 + rng.normal() for i in natural}
    psnr_b = {i: psnr_a[i] - 1.0 - 0.1 * k for k, i in enumerate(natural)}  # A - B = 1.0 + 0.1 k by id
    a = compare.parse_summary(_summary("medvae", natural, psnr_a))
    b = compare.parse_summary(_summary("sdvae", lexicographic, psnr_b))
    result = compare.compare_pair(a, b, metrics=("psnr",), n_boot=500)["metrics"]["psnr"]
    by_id_a = np.array([psnr_a[i] for i in natural])
    by_id_b = np.array([psnr_b[i] for i in natural])
    assert result["mean_diff"] == pytest.approx(1.0 + 0.1 * 5.5)  # mean of 1.0 + 0.1 k, k = 0..11
    assert result["p_value"] == pytest.approx(scipy_stats.wilcoxon(by_id_a, by_id_b).pvalue)
    assert result["cohens_dz"] == pytest.approx(np.mean(by_id_a - by_id_b) / np.std(by_id_a - by_id_b, ddof=1))
    assert result["n"] == 12 and result["n_excluded"] == 0


def test_mismatched_ids_are_refused_naming_them():
    a = compare.parse_summary(_summary("a", ["img1", "img2", "img3"], {"img1": 1.0, "img2": 2.0, "img3": 3.0}))
    b = compare.parse_summary(_summary("b", ["img1", "img2", "img10"], {"img1": 1.0, "img2": 2.0, "img10": 3.0}))
    with pytest.raises(InputError, match=r"only in 'a': \['img3'\]; only in 'b': \['img10'\]"):
        compare.compare_pair(a, b)
    pairing = compare.pair_ids(a, b, intersect=True)
    assert pairing == (["img1", "img2"], ["img3"], ["img10"])


def test_intersection_reports_dropped_counts():
    ids = [f"s{k}" for k in range(6)]
    a = compare.parse_summary(_summary("a", ids, {i: 20.0 + k for k, i in enumerate(ids)}))
    b = compare.parse_summary(_summary("b", ids[1:], {i: 19.0 + k * 1.1 for k, i in enumerate(ids[1:])}))
    report = compare.compare_pair(a, b, metrics=("psnr",), intersect=True, n_boot=200)
    assert (report["n_paired"], report["n_dropped_a"], report["n_dropped_b"]) == (5, 1, 0)
    assert report["metrics"]["psnr"]["n"] == 5


def test_null_and_infinite_values_are_excluded_per_metric():
    ids = [f"s{k}" for k in range(5)]
    psnr_a = {i: 25.0 + k for k, i in enumerate(ids)}
    psnr_a["s0"] = math.inf  # an exact image
    ms = {i: None for i in ids}  # MS-SSIM undefined (small images)
    a = compare.parse_summary(_summary("a", ids, psnr_a, ms_ssim=ms))
    b = compare.parse_summary(_summary("b", ids, {i: 24.0 + k * 0.9 for k, i in enumerate(ids)}, ms_ssim=ms))
    report = compare.compare_pair(a, b, n_boot=200)
    assert (report["metrics"]["psnr"]["n"], report["metrics"]["psnr"]["n_excluded"]) == (4, 1)
    assert report["skipped"]["ms_ssim"].startswith("0 image")
    assert report["skipped"]["ssim"] == "not in 'a'"


def test_metric_present_in_some_images_only_is_an_error():
    ids = ["x1", "x2", "x3"]
    data = _summary("a", ids, {i: 1.0 for i in ids}, ssim={i: 0.5 for i in ids})
    del data["images"]["x2"]["ssim"]
    a = compare.parse_summary(data)
    b = compare.parse_summary(_summary("b", ids, {i: 2.0 for i in ids}, ssim={i: 0.4 for i in ids}))
    with pytest.raises(InputError, match=r"\['x2'\] lack metric 'ssim'"):
        compare.compare_pair(a, b)


def test_hallucination_rates_compared_by_cohens_h():
    ids = ["p", "q", "r", "s"]
    rates_a = {"p": 0.01, "q": 0.02, "r": 0.03, "s": 0.06}
    rates_b = {"p": 0.02, "q": 0.02, "r": 0.04, "s": 0.08}
    a = compare.parse_summary(_summary("a", ids, {i: 20.0 for i in ids}, hallucination_rate=rates_a))
    b = compare.parse_summary(_summary("b", ids, {i: 21.0 for i in ids}, hallucination_rate=rates_b))
    rate = compare.compare_pair(a, b, metrics=("psnr",), n_boot=200)["rates"]["hallucination_rate"]
    assert (rate["mean_a"], rate["mean_b"]) == (pytest.approx(0.03), pytest.approx(0.04))
    assert rate["cohens_h"] == pytest.approx(2 * math.asin(math.sqrt(0.03)) - 2 * math.asin(math.sqrt(0.04)))


@pytest.mark.parametrize(
    "data, match",
    [
        ({"dataset": "d", "images": {"i": {"psnr": 1.0}}}, "'config'"),  # no config
        ({"config": "c", "dataset": "d", "images": {}}, "'images'"),  # no images
        ({"config": "c", "dataset": "d", "images": {"i": {"psnr": "25"}}}, "number or null"),  # string value
        ({"config": "c", "dataset": "d", "images": {"i": [25.0]}}, "metric names"),  # record not an object
        ([1, 2], "JSON object"),
    ],
)
def test_parse_summary_rejects_bad_schema(data, match):
    with pytest.raises(InputError, match=match):
        compare.parse_summary(data, source="x.json")


def test_load_summary_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        compare.load_summary(bad)
    with pytest.raises(InputError, match="missing.json"):
        compare.load_summary(tmp_path / "missing.json")


def _study(tmp_path):
    """Two configs x three datasets written as JSON files, with autoencoder ceilings."""
    rng = np.random.default_rng(5)
    paths, points = [], []
    for dataset, base in (("knee", 22.0), ("brain", 24.0), ("cxr", 26.0)):
        ids = [f"{dataset}{k}" for k in range(1, 13)]
        hr_noise = rng.normal(0.0, 0.5, len(ids))
        for config, gain, ceiling in (("medvae", 2.0, 6.0), ("sdvae", 0.0, 2.0)):
            sr = {i: base + gain + hr_noise[k] + rng.normal(0, 0.2) for k, i in enumerate(ids)}
            ae = {i: base + ceiling + rng.normal(0, 0.3) for i in ids}
            path = tmp_path / f"{config}_{dataset}.json"
            path.write_text(json.dumps(_summary(config, ids, sr, dataset=dataset, ae_psnr=ae)))
            paths.append(path)
            points.append((np.mean(list(ae.values())), np.mean(list(sr.values()))))
    return paths, np.array(points)


def test_compare_files_pairs_within_datasets_and_fits_screening(tmp_path):
    paths, points = _study(tmp_path)
    report = compare.compare_files(paths, metrics=("psnr",), n_boot=500)
    assert [(p["dataset"], p["a"], p["b"]) for p in report["pairs"]] == [
        ("knee", "medvae", "sdvae"),
        ("brain", "medvae", "sdvae"),
        ("cxr", "medvae", "sdvae"),
    ]
    assert all(p["metrics"]["psnr"]["mean_diff"] > 1.5 for p in report["pairs"])
    fit = report["screening"]["fit"]
    ref = scipy_stats.linregress(points[:, 0], points[:, 1])
    assert (fit["slope"], fit["r_squared"]) == (pytest.approx(ref.slope), pytest.approx(ref.rvalue**2))
    assert len(fit["band_low"]) == len(fit["x_grid"])
    json.dumps(report)  # the report is plain JSON data
    text = compare.render_markdown(report)
    knee = report["pairs"][0]["metrics"]["psnr"]
    assert f"| psnr | 12 | {knee['mean_a']:.3f} | {knee['mean_b']:.3f} | {knee['mean_diff']:+.3f} |" in text
    assert f"R^2 = {fit['r_squared']:.3f}" in text


def test_screening_needs_three_points_and_skips_baselines():
    ids = ["a1", "a2"]
    with_ae = [
        compare.parse_summary(_summary(c, ids, {i: 20.0 for i in ids}, ae_psnr={i: x for i in ids}))
        for c, x in (("m1", 25.0), ("m2", 27.0))
    ]
    baseline = compare.parse_summary(_summary("bicubic", ids, {i: 21.0 for i in ids}))
    report = compare.compare_summaries([*with_ae, baseline], n_boot=200)
    assert report["screening"]["fit"] is None
    assert "got 2" in report["screening"]["note"]
    assert [p["config"] for p in report["screening"]["points"]] == ["m1", "m2"]
    assert "Not fitted" in compare.render_markdown(report)


def test_compare_summaries_refuses_duplicates_and_single_file():
    s = compare.parse_summary(_summary("a", ["i1", "i2"], {"i1": 1.0, "i2": 2.0}), source="one.json")
    with pytest.raises(InputError, match="at least 2"):
        compare.compare_summaries([s])
    with pytest.raises(InputError, match="both config 'a'"):
        compare.compare_summaries([s, s])


# ----------------------------------------------------------------------------------------------- figures


def _assert_png(path, min_side=50):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert min(imread(path).shape[:2]) >= min_side
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_figures_write_valid_pngs(tmp_path):
    hr = np.random.default_rng(0).random((32, 32))
    sr = np.clip(hr + 0.05, 0, 1)
    figures.save_image_panel(tmp_path / "panel.png", hr[::4, ::4], sr, hr, data_range=1.0, title="img1")
    _assert_png(tmp_path / "panel.png")
    bands = {c: metrics.wavelet_band_psnr(sr + off, hr) for c, off in (("medvae", 0.0), ("sdvae", 0.02))}
    figures.save_band_chart(tmp_path / "bands.png", bands, title="knee")
    _assert_png(tmp_path / "bands.png")
    paths, _ = _study(tmp_path)
    report = compare.compare_files(paths, metrics=("psnr",), n_boot=200)
    figures.save_screening_plot(tmp_path / "screening.png", report["screening"])
    _assert_png(tmp_path / "screening.png")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "bands.png"
    target.write_bytes(b"old figure")

    def broken_savefig(self, fh, **kwargs):
        fh.write(PNG_SIGNATURE + b"partial")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        figures.save_band_chart(target, {"a": {"cA1": 20.0}})
    assert target.read_bytes() == b"old figure"
    with pytest.raises(RuntimeError):
        figures.save_band_chart(tmp_path / "new.png", {"a": {"cA1": 20.0}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bands.png"]


def test_figure_input_errors(tmp_path):
    img = np.zeros((8, 8))
    with pytest.raises(OutputError, match="does not exist"):
        figures.save_band_chart(tmp_path / "no" / "bands.png", {"a": {"cA1": 20.0}})
    with pytest.raises(ShapeError, match="same shape"):
        figures.save_image_panel(tmp_path / "p.png", img, img, np.zeros((8, 9)), data_range=1.0)
    with pytest.raises(InputError, match="expected"):
        figures.save_band_chart(tmp_path / "b.png", {"a": {"cA1": 1.0}, "b": {"cD1": 1.0}})
    with pytest.raises(InputError, match="no screening fit"):
        figures.save_screening_plot(tmp_path / "s.png", {"points": [], "fit": None, "note": "needs >= 3"})
    assert list(tmp_path.iterdir()) == []
