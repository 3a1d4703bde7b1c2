"""The paper's presets, and exporting them from checkpoints in the published formats (small look-alikes)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner
from compvis_reference import CompVisVAE, randomize_
from fresh_python import run_python

from medsr.bundle import load_bundle
from medsr.cli.export import export
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_ort_sessions
from medsr.export import presets as presets_module
from medsr.export.checkpoints import MEDVAE_MODELS
from medsr.export.models import build_unet
from medsr.export.presets import get_preset
from medsr.export.presets.paper import paper_unet
from medsr.export.reference import load_reference_models


@pytest.mark.parametrize("module", ["paper", "own", "base", "__init__"])
def test_each_preset_module_imports_first_in_a_fresh_interpreter(module):
    """No import cycle: the paper's presets imported before the registry used to fail half-initialised."""
    name = "medsr.export.presets" + ("" if module == "__init__" else f".{module}")
    result = run_python(f"import {name}; from medsr.export.presets import get_preset; get_preset('latentsr-medvae-4x3')")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("name", "attention_down", "attention_up", "millions"),
    [
        # MedVAE f=4: HR latent 64 -> levels at 64, 32, 16, 8; attention at 16 (512 channels): "about 101M"
        ("latentsr-medvae-4x3", 2, 1, (100, 102)),
        # SD-VAE f=8: HR latent 32 -> levels at 32, 16, 8, 4; attention at 16 sits on the 256-channel level
        ("latentsr-sdvae-ftema", 1, 2, (96, 98.5)),
    ],
)
def test_paper_unet_matches_the_paper(name, attention_down, attention_up, millions):
    preset = get_preset(name)
    with torch.device("meta"):
        unet = build_unet(preset.unet)
    params = sum(p.numel() for p in unet.parameters())
    assert millions[0] * 1e6 < params < millions[1] * 1e6
    assert [i for i, t in enumerate(preset.unet["down_block_types"]) if t.startswith("Attn")] == [attention_down]
    assert [i for i, t in enumerate(preset.unet["up_block_types"]) if t.startswith("Attn")] == [attention_up]
    assert preset.unet["in_channels"] == 2 * preset.latent_channels
    assert preset.scheduler["algorithm"] == "latentsr" and preset.scheduler["init_noise_sigma"] == 0.5
    assert preset.lr_latent == "sample" and preset.latent_scaling_factor == 1.0


def test_all_medvae_variants_have_presets():
    for tag in ("4x3", "8x4", "4x1", "8x1"):
        preset = get_preset(f"latentsr-medvae-{tag}")
        assert MEDVAE_MODELS[preset.vae_checkpoint]["vae"] == preset.vae


@pytest.fixture
def small_paper_preset(monkeypatch):
    """latentsr-medvae-4x3 at small widths, with a small MedVAE registered under its own name."""
    small_vae = {**MEDVAE_MODELS["medvae_4_3_2d"]["vae"], "block_out_channels": (32, 64, 128)}
    monkeypatch.setitem(MEDVAE_MODELS, "small_4_3", {**MEDVAE_MODELS["medvae_4_3_2d"], "vae": small_vae})
    unet = {**paper_unet(3, 16), "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1}
    preset = dataclasses.replace(
        get_preset("latentsr-medvae-4x3"), name="small-paper", vae=small_vae, unet=unet, vae_checkpoint="small_4_3"
    )
    monkeypatch.setitem(presets_module.PRESETS, "small-paper", preset)
    return preset


def test_export_from_published_formats_records_both_files(small_paper_preset, tmp_path):
    oracle = randomize_(
        CompVisVAE(ch=32, ch_mult=(1, 2, 4), num_res_blocks=2, image_channels=3, z_channels=3, rank=4, stage2=True),
        torch.Generator().manual_seed(0),
    )
    vae_path = tmp_path / "vae_4x_3c_2D.ckpt"
    torch.save({"state_dict": oracle.state_dict()}, vae_path)
    torch.manual_seed(1)
    unet = build_unet(small_paper_preset.unet)
    unet_path = tmp_path / "unet.ckpt"
    lightning = {"state_dict": {f"model.{k}": v for k, v in unet.state_dict().items()}, "hyper_parameters": {"hr_size": 64}}
    torch.save(lightning, unet_path)

    out = tmp_path / "bundle"
    args = ["--preset", "small-paper", "--vae-weights", str(vae_path), "--unet-weights", str(unet_path), "-o", str(out)]
    result = CliRunner().invoke(export, args)
    assert result.exit_code == 0, result.output

    bundle = load_bundle(out)
    weights = json.loads((out / "medsr.json").read_text())["provenance"]["weights"]
    assert weights["source"] == "checkpoints"
    assert weights["vae"]["file"] == "vae_4x_3c_2D.ckpt" and weights["vae"]["lora_merged"] > 0
    assert weights["unet"]["file"] == "unet.ckpt" and weights["unet"]["prefix"] == "model."
    _, reloaded_unet = load_reference_models(bundle)
    for key, value in unet.state_dict().items():
        assert torch.equal(reloaded_unet.state_dict()[key], value), key

    # The engine runs it with the paper's sampler (a few of its consecutive steps) on a 3-channel VAE.
    lr = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16)).astype(np.float32)
    result = LatentSRPipeline(bundle, open_ort_sessions(bundle)).super_resolve(lr, SamplingOptions(steps=3))
    assert result.images.shape == (1, 64, 64) and np.isfinite(result.images).all()


def test_unet_that_does_not_fit_the_preset_is_named(small_paper_preset, tmp_path):
    other = build_unet({**small_paper_preset.unet, "block_out_channels": (32, 32, 64, 128)})
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, path)
    args = ["--preset", "small-paper", "--unet-weights", str(path), "--random-init", "-o", str(tmp_path / "b")]
    result = CliRunner().invoke(export, args)
    assert result.exit_code == 1 and "block_out_channels" in result.output
    assert not (tmp_path / "b").exists()
