"""The autoencoder-domain study (studies/autoencoder_domain/study.py): one recipe for both arms, its tables, and its
recorded result."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")

from medsr.eval.compare import compare_files, render_markdown
from medsr.io.formats import load_image

RECORDED = Path(__file__).resolve().parents[1] / "studies" / "autoencoder_domain"
sys.path.insert(0, str(RECORDED))  # the study is a script beside its results, not part of the package
import study


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` with each of ``options`` and the value after it removed."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        else:
            out.append(arg)
    return out


@pytest.fixture
def steps(tmp_path):
    photos = [tmp_path / "photos" / f"{name}.png" for name in study.PHOTOS]
    return {step.name: step for step in study.study_steps(study.StudyConfig(), tmp_path, photos)}


def test_both_arms_train_and_evaluate_with_one_recipe(steps):
    """The arms differ only in the VAE's training data (and where their files go): same preset, steps, seed,
    optimiser, denoiser data and evaluation."""
    vae = {arm: steps[f"vae-{arm}"].argv for arm in study.ARMS}
    assert _without(vae["medical"], "--source", "-o") == _without(vae["natural"], "--source", "-o")
    assert vae["medical"][vae["medical"].index("--source") + 1] == "default:train"
    assert sum(arg == "--source" for arg in vae["natural"]) == len(study.PHOTOS)
    later = {
        arm: [f"denoiser-{arm}", f"export-{arm}", *(f"fidelity-{arm}-{d}" for d in study.DATASETS)]
        for arm in study.ARMS
    }
    paths = ("-o", "--vae", "--weights", "--model", "--name")
    for medical, natural in zip(later["medical"], later["natural"]):
        assert _without(steps[medical].argv, *paths) == _without(steps[natural].argv, *paths), medical
    assert "--validate" in steps["export-medical"].argv
    assert steps["denoiser-medical"].argv[steps["denoiser-medical"].argv.index("--source") + 1] == "default:train-mri"


def test_every_held_out_dataset_is_measured_and_compared_by_arm(steps):
    for mode in study.MODES:
        summaries = [a for a in steps[f"compare-{mode}"].argv if a.endswith(".json") and "fidelity_" in a]
        assert len(summaries) == len(study.ARMS) * len(study.DATASETS)
        assert all(Path(s).name.endswith(f"+{mode}.json") for s in summaries)
    names = list(steps)
    assert names.index("export-natural") < names.index("fidelity-natural-epi") < names.index("compare-none")


def test_photographs_load_offline_as_grayscale_images(tmp_path):
    paths = study.write_photos(tmp_path)
    assert [p.stem for p in paths] == list(study.PHOTOS)
    for path in paths:
        image = load_image(path)  # medsr reads grayscale images only: a colour one would be refused here
        assert image.data.shape[2] == 1 and min(image.data.shape[:2]) >= 256 and np.isfinite(image.data).all()


def _fake_run(work: Path) -> None:
    """Fidelity summaries and compare reports of a study run with made-up values (medical ahead by 1 dB)."""
    rng = np.random.default_rng(0)
    for dataset in study.DATASETS:
        ids = [f"{dataset}_{k}" for k in range(1 if dataset == "shoulder" else 6)]
        base = {i: 25.0 + rng.normal() for i in ids}
        for arm, offset in (("medical", 1.0), ("natural", 0.0)):
            folder = work / "fidelity" / arm / dataset
            folder.mkdir(parents=True)
            configs = {f"{arm}+none": 0.0, f"{arm}+kspace": 2.0, "zerofill": 3.0, "bicubic": 2.5}
            for config, gain in configs.items():
                model = "+" in config
                images = {
                    i: {"psnr": base[i] + gain + (offset if model else 0.0), "ssim": 0.8, "wavelet_psnr_cD1": 19.0,
                        "hallucination_rate": 0.01, "loss_rate": 0.01,
                        **({"ae_psnr": base[i] + 3 + offset} if model else {})}
                    for i in ids
                }  # fmt: skip
                means = {m: float(np.mean([r[m] for r in images.values()])) for m in next(iter(images.values()))}
                summary = {"config": config, "dataset": dataset, "images": images, "summary": {"means": means}}
                (folder / f"fidelity_{config}.json").write_text(json.dumps(summary))
    for mode in study.MODES:
        files = [study.summary_path(work, a, d, f"{a}+{mode}") for d in study.DATASETS for a in study.ARMS]
        report = compare_files(files, metrics=study.METRICS, n_boot=200)
        (work / f"compare_{mode}.json").write_text(json.dumps(report))
        (work / f"compare_{mode}.md").write_text(render_markdown(report))
        (work / f"compare_{mode}.png").write_bytes(b"\x89PNG")


def test_results_tables_show_means_paired_differences_and_the_screening_fit(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_run(work)
    steps = study.study_steps(study.StudyConfig(), work, [work / "photos" / "camera.png"])
    study.write_results(work, out, study.StudyConfig(), steps, {"vae-medical": {"wall_s": 60.0, "cpu_s": 50.0}})
    text = (out / "RESULTS.md").read_text()
    assert "| epi | medical VAE | 6 |" in text and "| epi | bicubic | 6 |" in text
    assert "| epi | psnr | 6 | +1.000 |" in text  # medical minus natural, paired by id
    assert "| shoulder | psnr | 1 | skipped" in text  # one image: no paired statistics
    assert "R^2 = 1.000 over 6 (arm, dataset) points" in text  # SR = AE - 3 dB exactly in the fake run
    assert "medsr-train vae --source default:train" in text
    recorded = json.loads((out / "study.json").read_text())
    assert recorded["config"] == asdict(study.StudyConfig()) and set(recorded["compare"]) == set(study.MODES)
    assert (out / "compare_none.png").is_file()


def test_recorded_study_was_made_with_the_current_recipe():
    recorded = json.loads((RECORDED / "study.json").read_text())
    assert recorded["config"] == asdict(study.StudyConfig())
    results = (RECORDED / "RESULTS.md").read_text()
    assert all(f"| {dataset} | {arm} VAE |" in results for dataset in study.DATASETS for arm in study.ARMS)
