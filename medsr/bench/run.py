"""One benchmark run: bundles, machine, ceilings, FLOPs, then every engine x batch size interleaved per repeat.

Interleaving (repeat 1: every batch size, every engine; repeat 2: again...) puts the engines under the same machine
conditions, so the ratios between engines hold even when a neighbour loads the machine; each ratio is taken inside
one repeat and the median over repeats is reported, as are the median seconds and the load average of each run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.bench.engines import EngineSpec, open_engine
from medsr.bench.flops import graph_flops
from medsr.bench.machine import describe_machine, gemm_ceilings
from medsr.bench.stages import (
    STAGES,
    run_volume,
    run_volume_as_infer,
    scheduler_step_seconds,
    staged_is_as_run,
    write_test_volume,
)
from medsr.engine.compare import compare_arrays
from medsr.engine.pipeline import SamplingOptions
from medsr.engine.profiles import graph_input_shapes


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``engines`` are EngineSpec labels; the first torch fp32 engine is the reference."""

    presets: tuple[str, ...]
    engines: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    slices: int = 4
    lr_size: int = 64
    steps: int = 10
    repeats: int = 3
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0
    consistency: str = "kspace"
    work_dir: Path = Path(tempfile.gettempdir()) / "medsr-bench"


def bundle_dir(preset, work_dir: Path) -> Path:
    """Where the random-weight bundle of ``preset`` (a medsr.export.presets.Preset) lives under ``work_dir``: named
    after a digest of the preset's whole definition, so a preset edited since (another architecture or conditioning)
    gets a fresh export instead of silently benchmarking the old one."""
    definition = json.dumps(dataclasses.asdict(preset), sort_keys=True, default=str)
    return work_dir / f"{preset.name}-{hashlib.sha256(definition.encode()).hexdigest()[:12]}"


def ensure_bundle(preset_name: str, work_dir: Path):
    """A random-weight bundle of ``preset_name`` under ``work_dir`` (:func:`bundle_dir`), exported once and reused
    while it validates."""
    from medsr.bundle import load_bundle
    from medsr.errors import BundleError
    from medsr.export.presets import get_preset

    preset = get_preset(preset_name)
    path = bundle_dir(preset, work_dir)
    try:
        return load_bundle(path)
    except BundleError:
        from medsr.export.builder import build_models
        from medsr.export.onnx import export_bundle

        vae, unet, provenance = build_models(preset, seed=0)
        export_bundle(vae, unet, preset, path, provenance, overwrite=True)
        return load_bundle(path)


def _open_all(bundle, specs: list[EngineSpec], config: BenchConfig) -> tuple[dict, dict, dict]:
    """Sessions and open seconds per engine label, and what each ``auto`` engine resolved to and why."""
    sessions, open_seconds, choices = {}, {}, {}
    for spec in specs:
        start = time.perf_counter()
        concrete, reason = spec.resolve(config.device)
        sessions[spec.label] = open_engine(bundle, concrete, config.device, config.threads)
        open_seconds[spec.label] = time.perf_counter() - start
        if reason:
            providers = {graph: list(session.providers) for graph, session in sessions[spec.label].items()}
            choices[spec.label] = {"engine": concrete.label, "reason": reason, "providers": providers}
    return sessions, open_seconds, choices


def bench_preset(preset_name: str, config: BenchConfig, log=print) -> dict:
    """Every engine x batch size x repeat on one model: raw runs, FLOPs, open times, sampler step, parity."""
    bundle = ensure_bundle(preset_name, config.work_dir)
    specs = [EngineSpec.parse(text) for text in config.engines]
    volume = write_test_volume(
        config.work_dir / f"lr_{config.lr_size}_{config.slices}.nii.gz", config.lr_size, config.slices
    )
    flops = graph_flops(bundle, config.lr_size, config.lr_size)
    sessions, open_seconds, choices = _open_all(bundle, specs, config)
    scheduler_config = bundle.manifest.scheduler
    runs, outputs = [], {}
    timed_apart = [
        label for label, engine_sessions in sessions.items() if not staged_is_as_run(bundle, engine_sessions)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        out_path = Path(scratch) / "sr.nii.gz"
        for batch in config.batch_sizes:  # warm-up on one batch: allocations, kernel choice, per-shape compiles
            warm_volume = write_test_volume(
                config.work_dir / f"warm_{config.lr_size}_{batch}.nii.gz", config.lr_size, batch
            )
            warm = SamplingOptions(steps=1, seed=config.seed, batch_size=batch, consistency=config.consistency)
            for label, engine_sessions in sessions.items():
                run_volume(bundle, engine_sessions, warm_volume, out_path, warm)
                if label in timed_apart:
                    for _ in range(2):  # the second run of a shape captures whole-loop CUDA graphs
                        run_volume_as_infer(bundle, engine_sessions, warm_volume, out_path, warm)
        for repeat in range(config.repeats):
            for batch in config.batch_sizes:
                options = SamplingOptions(
                    steps=config.steps, seed=config.seed, batch_size=batch, consistency=config.consistency
                )
                for label, engine_sessions in sessions.items():
                    load = os.getloadavg()[0]
                    seconds, data = run_volume(bundle, engine_sessions, volume, out_path, options)
                    as_run, identical = seconds["end_to_end"], True
                    if label in timed_apart:
                        as_run, as_run_data = run_volume_as_infer(bundle, engine_sessions, volume, out_path, options)
                        identical = bool(np.array_equal(as_run_data, data))
                    runs.append(
                        {
                            "engine": label,
                            "batch": batch,
                            "repeat": repeat,
                            "load_1min": load,
                            **seconds,
                            "as_run": as_run,
                            "as_run_identical": identical,
                        }
                    )
                    outputs.setdefault((label, batch), data)
                    log(
                        f"{preset_name} repeat {repeat} batch {batch} {label}: {as_run:.2f} s as run, "
                        f"{seconds['end_to_end']:.2f} s staged (load {load:.1f})"
                    )
    shape = graph_input_shapes(bundle, 1, config.lr_size, config.lr_size)["denoiser"]["sample"]
    return {
        "preset": preset_name,
        "scale": bundle.scale,
        "hr_size": bundle.scale * config.lr_size,
        "bundle": {
            "name": bundle.name,
            "weights": "random-init",
            "graph_sha256": {k: v.sha256[:16] for k, v in bundle.graphs.items()},
        },
        "parameters": _parameter_counts(bundle),
        "flops_per_slice": flops,
        "open_seconds": open_seconds,
        "engine_choices": choices,
        "scheduler_step_seconds": scheduler_step_seconds(scheduler_config, shape, config.steps),
        "parity_db": _parity(outputs, specs, config.batch_sizes),
        "runs": runs,
    }


def _parameter_counts(bundle) -> dict[str, int]:
    from medsr.export.reference import load_reference_models

    vae, unet = load_reference_models(bundle)
    return {"vae": sum(p.numel() for p in vae.parameters()), "unet": sum(p.numel() for p in unet.parameters())}


def _parity(outputs: dict, specs: list[EngineSpec], batches: tuple[int, ...]) -> dict[str, float]:
    """PSNR (dB) of each engine's SR volume against the eager torch fp32 one, at the first batch size."""
    reference = outputs.get(("torch", batches[0]))
    if reference is None:
        return {}
    return {
        spec.label: compare_arrays(outputs[(spec.label, batches[0])], reference)["psnr_db"]
        for spec in specs
        if spec.label != "torch"
    }


def run_benchmark(config: BenchConfig, log=print) -> dict:
    """The whole report: machine, ceilings before and after (the max is used), and every preset's runs."""
    config.work_dir.mkdir(parents=True, exist_ok=True)
    threads = config.threads or describe_machine()["cores"]
    config = dataclasses.replace(config, threads=threads)
    started = time.time()
    machine = describe_machine()
    before = gemm_ceilings(threads, config.device)
    models = [bench_preset(name, config, log) for name in config.presets]
    after = gemm_ceilings(threads, config.device)
    machine["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    if config.device == "cuda":
        machine["gpu"] = _gpu_name()
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "machine": machine,
        "gemm_gflops": {key: max(before[key], after[key]) for key in before},
        "gemm_gflops_runs": {"before": before, "after": after},
        "started_unix": started,
        "wall_seconds": time.time() - started,
        "models": models,
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def summarize(report: dict) -> list[dict]:
    """One row per (model, batch, engine): medians per slice, speedup against torch fp32, GFLOP/s, peak fractions."""
    ceilings = report["gemm_gflops"]
    steps = report["config"]["steps"]
    rows = []
    for model in report["models"]:
        slices = report["config"]["slices"]
        flops = model["flops_per_slice"]
        runs = model["runs"]
        for batch in sorted({run["batch"] for run in runs}):
            for engine in dict.fromkeys(run["engine"] for run in runs):
                mine = [run for run in runs if run["engine"] == engine and run["batch"] == batch]
                torch_runs = {run["repeat"]: run for run in runs if run["engine"] == "torch" and run["batch"] == batch}
                ratios = [torch_runs[r["repeat"]]["as_run"] / r["as_run"] for r in mine if r["repeat"] in torch_runs]
                median = {stage: float(np.median([run[stage] for run in mine])) for stage in STAGES}
                step = float(np.median([s for run in mine for s in run["per_step"]])) / batch
                denoiser_gflops = flops["denoiser"] / step / 1e9
                rows.append(
                    {
                        "model": model["preset"],
                        "batch": batch,
                        "engine": engine,
                        "as_run_s_per_slice": float(np.median([run["as_run"] for run in mine])) / slices,
                        "as_run_identical": all(run["as_run_identical"] for run in mine),
                        "end_to_end_s_per_slice": median["end_to_end"] / slices,
                        "stages_s_per_slice": {k: v / slices for k, v in median.items()},
                        "step_s_per_slice": step,
                        "speedup_vs_torch": float(np.median(ratios)) if ratios else None,
                        "gflops": {
                            "vae_encoder": flops["vae_encoder"] * slices / median["encode"] / 1e9,
                            "denoiser": denoiser_gflops,
                            "vae_decoder": flops["vae_decoder"] * slices / median["decode"] / 1e9,
                        },
                        "denoiser_peak_fraction": {k: denoiser_gflops / v for k, v in ceilings.items()},
                        "parity_db": model["parity_db"].get(engine),
                        "load_1min": [run["load_1min"] for run in mine],
                        "steps": steps,
                    }
                )
    return rows
