"""The autoencoder-domain study of arXiv 2604.12152 in miniature (docs/sources.md, "The method").

Question: at the same latent geometry and with the same denoiser recipe, does an autoencoder trained on medical
images super-resolve held-out medical slices better than one trained on natural photographs, and does the
autoencoder ceiling predict the SR result?

Design (every step is a medsr command, listed by :func:`study_steps` and recorded with the results):

1. Two VAEs of one preset (same f, latent channels, architecture, steps, seed), trained by ``medsr-train vae``:
   ``medical`` on the default training split (Colin27 outside its held-out slab, chest and leg radiographs),
   ``natural`` on grayscale photographs that ship with scikit-image (:data:`PHOTOS`).
2. For each, the same denoiser recipe (``medsr-train denoiser``) on k-space pairs of the MRI training sources, on
   latents of that frozen VAE; exported with ``medsr-export --validate`` (the parity gate).
3. ``medsr-eval fidelity`` of each bundle on each held-out source (:data:`DATASETS`: unseen Colin27 slices, an
   unseen EPI subject, an unseen shoulder MRI), without and with k-space consistency; ``medsr-eval compare`` of
   the two arms per dataset (paired by image id) and the screening regression across arms and datasets.

Run it (about 15-20 CPU minutes on 2 cores; steps whose outputs exist are skipped, so an interrupted run resumes)::

    nice -n 19 python studies/autoencoder_domain/study.py --work runs/study --out studies/autoencoder_domain

It writes ``RESULTS.md`` (tables, commands, timings), ``study.json`` (every number), the compare reports and the
screening plot into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medsr.errors import InputError
from medsr.io.atomic import write_text_atomic

PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel", "moon", "rocket")
"""scikit-image photographs that load offline (no download): people, animals, objects, textures, the moon."""
ARMS = ("medical", "natural")
DATASETS = ("colin27-slab", "epi", "shoulder")
MEDICAL_VAE_DATA = ("default:train",)
DENOISER_DATA = ("default:train-mri",)
MODES = ("none", "kspace")
METRICS = ("psnr", "ssim", "wavelet_psnr_cD1", "ae_psnr")


@dataclass(frozen=True)
class StudyConfig:
    """The shared recipe of both arms (the paper's objective: x0 target, L1; sizes scaled to a CPU)."""

    preset: str = "tiny"
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    denoiser_steps: int = 2000
    denoiser_batch: int = 16
    denoiser_lr: float = 1e-3
    pairs: int = 2048
    crop: int = 64
    seed: int = 42
    threads: int = 1
    """torch threads of training: 1, because 2 threads next to another job on 2 cores ran 50x slower (measured)."""


@dataclass(frozen=True)
class Step:
    """One command of the study; skipped when ``done`` exists."""

    name: str
    argv: list[str]
    done: Path


def write_photos(folder: Path) -> list[Path]:
    """The :data:`PHOTOS` as 8-bit grayscale PNG files in ``folder`` (colour photographs converted to luma by PIL,
    L = 0.299 R + 0.587 G + 0.114 B: medsr reads grayscale images only)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if not path.is_file():
            Image.fromarray(np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)).convert("L").save(path)
        paths.append(path)
    return paths


def _loop_args(steps: int, batch: int, lr: float, ema: float, config: StudyConfig) -> list[str]:
    return [
        "--preset", config.preset, "--steps", str(steps), "--batch-size", str(batch), "--lr", str(lr),
        "--min-lr", "1e-5", "--warmup", "100", "--ema", str(ema), "--seed", str(config.seed),
        "--threads", str(config.threads), "--checkpoint-every", "500", "--log-every", "50", "--no-progress",
    ]  # fmt: skip


def _sources(items) -> list[str]:
    return [arg for item in items for arg in ("--source", str(item))]


def arm_steps(arm: str, vae_data: list, config: StudyConfig, work: Path) -> list[Step]:
    """Train, export and evaluate one arm."""
    root = work / arm
    vae = root / "vae" / "vae.safetensors"
    weights = root / "denoiser" / "weights.safetensors"
    bundle = root / "bundle"
    steps = [
        Step(f"vae-{arm}", ["medsr-train", "vae", *_sources(vae_data), "--crop", str(config.crop),
             *_loop_args(config.vae_steps, config.vae_batch, config.vae_lr, 0.99, config), "-o", str(root / "vae")],
             vae),
        Step(f"denoiser-{arm}", ["medsr-train", "denoiser", "--vae", str(vae), *_sources(DENOISER_DATA),
             "--pairs", str(config.pairs), "--crop", str(config.crop), "--loss", "l1",
             *_loop_args(config.denoiser_steps, config.denoiser_batch, config.denoiser_lr, 0.995, config),
             "-o", str(root / "denoiser")], weights),
        Step(f"export-{arm}", ["medsr-export", "--preset", config.preset, "--weights", str(weights), "-o",
             str(bundle), "--validate"], bundle / "medsr.json"),
    ]  # fmt: skip
    for dataset in DATASETS:
        out = work / "fidelity" / arm / dataset
        steps.append(
            Step(f"fidelity-{arm}-{dataset}", ["medsr-eval", "fidelity", "--model", str(bundle), "--data", dataset,
                 "--name", arm, "--dataset", dataset, "--consistency", ",".join(MODES), "--panels", "2",
                 "--baselines", "zerofill,bicubic", "--threads", str(config.threads), "-o", str(out)],
                 out / "summary.md")
        )  # fmt: skip
    return steps


def summary_path(work: Path, arm: str, dataset: str, config: str) -> Path:
    from medsr.eval.fidelity_report import summary_name

    return work / "fidelity" / arm / dataset / summary_name(config)


def study_steps(config: StudyConfig, work: Path, photos: list[Path]) -> list[Step]:
    """Every command of the study, in order (see the module docstring)."""
    steps = arm_steps("medical", list(MEDICAL_VAE_DATA), config, work)
    steps += arm_steps("natural", photos, config, work)
    for mode in MODES:
        summaries = [str(summary_path(work, arm, d, f"{arm}+{mode}")) for d in DATASETS for arm in ARMS]
        out = work / f"compare_{mode}"
        steps.append(
            Step(f"compare-{mode}", ["medsr-eval", "compare", *summaries, "--metrics", ",".join(METRICS),
                 "-o", f"{out}.md", "--json", f"{out}.json", "--plot", f"{out}.png", "--overwrite"],
                 Path(f"{out}.json"))
        )  # fmt: skip
    return steps


def run_step(step: Step, logs: Path, threads: int) -> dict:
    """Run one step (its console script from this Python's environment) with ``threads`` OpenMP threads (torch's
    default in the export's parity gate), its output logged; returns its wall and CPU seconds."""
    script = Path(sys.executable).parent / step.argv[0]
    program = str(script) if script.is_file() else shutil.which(step.argv[0])
    if program is None:
        raise InputError(f"{step.argv[0]} not found: install medsr (pip install -e '.[torch,eval]')")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(logs / f"{step.name}.log", "w") as log:
        code = subprocess.run(
            [program, *step.argv[1:]], check=False, stdout=log, stderr=subprocess.STDOUT, env=env
        ).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise InputError(f"study step {step.name} failed (exit {code}); see {logs / step.name}.log")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(cpu, 1)}


def _mean(summary: dict, metric: str) -> float | None:
    return summary["summary"]["means"].get(metric)


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def results_table(work: Path) -> str:
    """Per dataset and arm: n, autoencoder ceiling, SR PSNR without and with k-space consistency, finest diagonal
    band PSNR and hallucination rate (without consistency), from the fidelity summaries; baselines for context."""
    lines = [
        (
            "| dataset | configuration | n | AE ceiling dB | SR PSNR dB | SR+kspace PSNR dB | SSIM | cD1 PSNR dB | "
            "hallucination | loss |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        for arm in ARMS:
            plain = json.loads(summary_path(work, arm, dataset, f"{arm}+none").read_text())
            kspace = json.loads(summary_path(work, arm, dataset, f"{arm}+kspace").read_text())
            cells = [
                _fmt(_mean(plain, "ae_psnr"), ".2f"), _fmt(_mean(plain, "psnr"), ".2f"),
                _fmt(_mean(kspace, "psnr"), ".2f"), _fmt(_mean(plain, "ssim"), ".4f"),
                _fmt(_mean(plain, "wavelet_psnr_cD1"), ".2f"), _fmt(_mean(plain, "hallucination_rate"), ".4f"),
                _fmt(_mean(plain, "loss_rate"), ".4f"),
            ]  # fmt: skip
            lines.append(f"| {dataset} | {arm} VAE | {len(plain['images'])} | " + " | ".join(cells) + " |")
        for baseline in ("zerofill", "bicubic"):
            base = json.loads(summary_path(work, "medical", dataset, baseline).read_text())
            cells = ["", _fmt(_mean(base, "psnr"), ".2f"), "", _fmt(_mean(base, "ssim"), ".4f"),
                     _fmt(_mean(base, "wavelet_psnr_cD1"), ".2f"), "", ""]  # fmt: skip
            lines.append(f"| {dataset} | {baseline} | {len(base['images'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(report: dict, mode: str) -> str:
    """medical minus natural, per dataset: PSNR, cD1 PSNR and AE ceiling differences with their statistics, and
    Cohen's h of the hallucination rates; then the screening regression."""
    lines = [
        f"| dataset | metric ({mode}) | n | medical - natural | 95% CI | Wilcoxon p | d (pooled) | d_z |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pair in report["pairs"]:
        for metric in ("psnr", "wavelet_psnr_cD1", "ae_psnr"):
            m = pair["metrics"].get(metric)
            if m is None:
                lines.append(f"| {pair['dataset']} | {metric} | {pair['n_paired']} | skipped: "
                             f"{pair['skipped'].get(metric, 'n/a')} | | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {pair['dataset']} | {metric} | {m['n']} | {m['mean_diff']:+.3f} | [{m['ci_low']:+.3f}, "
                f"{m['ci_high']:+.3f}] | {m['p_value']:.2e} | {m['cohens_d']:.2f} | {m['cohens_dz']:.2f} |"
            )
        rate = pair["rates"].get("hallucination_rate")
        if rate is not None:
            lines.append(f"| {pair['dataset']} | hallucination rate, Cohen's h | {rate['n']} | {rate['cohens_h']:+.3f} "
                         "| | | | |")  # fmt: skip
    fit = report["screening"]["fit"]
    if fit is not None:
        lines += [
            "",
            (
                f"Screening ({mode}): SR PSNR = {fit['slope']:.3f} x AE PSNR {fit['intercept']:+.2f} dB, "
                f"R^2 = {fit['r_squared']:.3f} over {fit['n']} (arm, dataset) points."
            ),
        ]
    return "\n".join(lines) + "\n"


def write_results(work: Path, out: Path, config: StudyConfig, steps: list[Step], timings: dict) -> None:
    """RESULTS.md, study.json and the compare reports and plots, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    reports = {mode: json.loads((work / f"compare_{mode}.json").read_text()) for mode in MODES}
    commands = "\n".join(" ".join(step.argv) for step in steps)
    cpu_min = sum(t.get("cpu_s", 0.0) for t in timings.values()) / 60
    text = "\n".join([
        "# Autoencoder domain study (miniature of arXiv 2604.12152): results", "",
        (
            "Made by `nice -n 19 python studies/autoencoder_domain/study.py --work runs/study "
            "--out studies/autoencoder_domain` "
            f"({cpu_min:.1f} CPU minutes for the steps run last). Design: study.py and README.md here."
        ), "",
        f"Recipe (both arms): `{json.dumps(asdict(config))}`.", "",
        "## Means per dataset (held-out medical slices, x4 k-space LR, [-1, 1] scale)", "", results_table(work),
        "## Paired statistics, medical VAE minus natural VAE (paired by image id)", "",
        *(paired_table(reports[mode], mode) + "\n" for mode in MODES),
        "## Commands", "", "```", commands, "```", "",
        "## Timings (seconds)", "", "```", json.dumps(timings, indent=1), "```", "",
    ])  # fmt: skip
    write_text_atomic(out / "RESULTS.md", text)
    record = {"config": asdict(config), "timings": timings, "compare": reports}
    write_text_atomic(out / "study.json", json.dumps(record, indent=1) + "\n")
    for mode in MODES:
        for suffix in (".md", ".png"):
            shutil.copyfile(work / f"compare_{mode}{suffix}", out / f"compare_{mode}{suffix}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python studies/autoencoder_domain/study.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--work", type=Path, required=True, help="Directory for runs, bundles and fidelity outputs.")
    parser.add_argument("--out", type=Path, required=True, help="Where the recorded results go (studies/...).")
    args = parser.parse_args(argv)
    config = StudyConfig()
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = study_steps(config, args.work, write_photos(args.work / "photos"))
    timings_path = args.work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for step in steps:
        if step.done.exists():
            continue
        print(f"[study] {step.name}: {' '.join(step.argv)}", flush=True)
        timings[step.name] = run_step(step, logs, config.threads)
        write_text_atomic(timings_path, json.dumps(timings, indent=1) + "\n")
    write_results(args.work, args.out, config, steps, timings)
    print(f"[study] wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
