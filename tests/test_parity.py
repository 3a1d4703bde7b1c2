"""The ORT engine reproduces the PyTorch reference stage by stage (same bundle, seed and noise)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from medsr.bundle import load_bundle
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_ort_sessions
from medsr.eval.parity import compare_arrays, compare_pipelines
from medsr.export.reference import open_torch_sessions


def test_ort_matches_torch_reference_at_every_stage(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    lr = np.random.default_rng(0).uniform(-1, 1, (3, 16, 12)).astype(np.float32)
    options = SamplingOptions(steps=4, seed=3, batch_size=2, lr_latent="sample", consistency="kspace")
    report = compare_pipelines(
        LatentSRPipeline(bundle, open_ort_sessions(bundle)),
        LatentSRPipeline(bundle, open_torch_sessions(bundle)),
        lr,
        options,
        threshold_db=60.0,
    )
    names = [stage.stage for stage in report.stages]
    assert names == ["lr_latent", *[f"denoiser_output[{k}]" for k in range(4)], "final_latent", "decoded_image", "sr_image"]
    assert report.passed, report.to_dict()
    assert report.final.psnr_db >= 60.0


def test_parity_report_names_the_first_drifting_stage(tiny_bundle):
    """A reference whose denoiser is perturbed must be caught at the first denoiser output, not only at the end."""
    bundle = load_bundle(tiny_bundle)
    reference_sessions = open_torch_sessions(bundle)
    real = reference_sessions["denoiser"]

    class Perturbed:
        input_names, output_names, providers = real.input_names, real.output_names, real.providers

        def run(self, feeds):
            out = real.run(feeds)
            return {"model_output": out["model_output"] * 1.01}

    reference_sessions["denoiser"] = Perturbed()
    lr = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8)).astype(np.float32)
    report = compare_pipelines(
        LatentSRPipeline(bundle, open_ort_sessions(bundle)),
        LatentSRPipeline(bundle, reference_sessions),
        lr,
        SamplingOptions(steps=2),
    )
    assert not report.passed and report.first_drift == "denoiser_output[0]"
    assert report.stages[0].passed  # the LR latent is untouched


def test_compare_arrays_against_direct_formula():
    rng = np.random.default_rng(0)
    expected = rng.uniform(-1, 1, 1000)
    actual = expected + rng.normal(0, 1e-3, 1000)
    figures = compare_arrays(actual, expected)
    mse = np.mean((actual - expected) ** 2)
    assert figures["psnr_db"] == pytest.approx(10 * np.log10(np.ptp(expected) ** 2 / mse))
    assert figures["max_abs"] == pytest.approx(np.abs(actual - expected).max())
    assert compare_arrays(expected, expected)["psnr_db"] == float("inf")


def test_tiled_slices_compare_only_the_final_image_and_say_so(tiny_bundle):
    """Tiles trace no intermediate stage: the report lists the final image alone, with a note, never a stage list
    that claims more than was compared."""
    bundle = load_bundle(tiny_bundle)
    lr = np.random.default_rng(0).uniform(-1, 1, (1, 24, 24)).astype(np.float32)
    pipelines = (
        LatentSRPipeline(bundle, open_ort_sessions(bundle)),
        LatentSRPipeline(bundle, open_torch_sessions(bundle)),
    )
    tiled = compare_pipelines(*pipelines, lr, SamplingOptions(steps=1, tile_size=16, tile_overlap=8))
    assert [stage.stage for stage in tiled.stages] == ["sr_image"] and tiled.passed
    assert "24x24 LR pixels ran in tiles of 16" in tiled.note and tiled.to_dict()["note"] == tiled.note
    whole = compare_pipelines(*pipelines, lr, SamplingOptions(steps=1, tile_size=None))
    assert whole.note is None and len(whole.stages) == 5
