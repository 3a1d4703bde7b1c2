"""VAE checkpoints load exactly: the converted diffusers AutoencoderKL computes what the CompVis original computes.

Checkpoints are written in the published formats from the independent CompVis oracle (tests/compvis_reference.py)
with random weights and nonzero LoRA; the oracle runs the LoRA unmerged. Widths are small (ch 32) with the
published key structure; the full-size key lists are covered by test_checkpoints_keys.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from compvis_reference import CompVisVAE, randomize_
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from medsr.errors import CheckpointError
from medsr.export.checkpoints import MEDVAE_MODELS, SD_VAE_CONFIG, file_sha256, load_medvae, load_sd_vae
from medsr.export.checkpoints.vae import IGNORED_PREFIXES

# Relative error allowed between the merged/converted model and the unmerged oracle: float32 rounding of a few
# dozen layers (measured about 1e-6), far below the LoRA's own contribution (checked to exceed 1e-2).
TOLERANCE = 1e-4

# Small MedVAE look-alikes: (ch_mult, image channels, latent channels, LoRA rank), as medvae_4_1 / 4_3 / 8_4.
SMALL_MEDVAES = {
    "4x1 no LoRA": ((1, 2, 4), 1, 1, 0),
    "4x3 LoRA r=4": ((1, 2, 4), 3, 3, 4),
    "8x4 LoRA r=4": ((1, 2, 4, 4), 3, 4, 4),
}


def make_oracle(ch_mult, image_channels, latent_channels, rank, seed=0, stage2=True) -> CompVisVAE:
    model = CompVisVAE(ch=32, ch_mult=ch_mult, num_res_blocks=2, image_channels=image_channels,
                       z_channels=latent_channels, rank=rank, stage2=stage2)
    return randomize_(model, torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()


def assert_same_function(vae: AutoencoderKL, oracle: CompVisVAE, image_channels: int, latent_channels: int,
                         factor: int) -> dict[str, float]:
    """Encoder moments and decoder output of ``vae`` equal the oracle's to TOLERANCE; returns both errors."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, image_channels, 32, 32, generator=generator) * 2 - 1
    latent = torch.randn(2, latent_channels, 32 // factor, 32 // factor, generator=generator)
    with torch.no_grad():
        moments = vae.encode(image).latent_dist.parameters
        decoded = vae.decode(latent).sample
        errors = {"moments": relative_error(moments, oracle.encode(image)),
                  "decoded": relative_error(decoded, oracle.decode(latent))}
    assert max(errors.values()) < TOLERANCE, errors
    return errors


def save_medvae_ckpt(oracle: CompVisVAE, path) -> None:
    """A MedVAE-format file: ``torch.save({"state_dict": <CompVis keys, LoRA unmerged, stage-2 head>})``."""
    torch.save({"state_dict": oracle.state_dict()}, path)


@pytest.mark.parametrize("variant", list(SMALL_MEDVAES))
def test_medvae_ckpt_loads_exactly(variant, tmp_path):
    ch_mult, image_channels, latent_channels, rank = SMALL_MEDVAES[variant]
    oracle = make_oracle(ch_mult, image_channels, latent_channels, rank)
    path = tmp_path / "vae.ckpt"
    save_medvae_ckpt(oracle, path)

    vae, report = load_medvae(path)

    assert_same_function(vae, oracle, image_channels, latent_channels, 2 ** (len(ch_mult) - 1))
    assert report.file == "vae.ckpt" and report.sha256 == file_sha256(path)
    assert report.format == "medvae-ckpt" and report.model_name is None
    assert report.lora_merged == (0 if rank == 0 else sum(k.endswith("lora_down.weight") for k in oracle.state_dict()))
    assert report.ignored_keys == [k for k in oracle.state_dict() if k.startswith(("channel_ds.", "channel_proj."))]
    assert report.config["block_out_channels"] == tuple(32 * m for m in ch_mult)
    assert report.config["latent_channels"] == latent_channels and report.config["scaling_factor"] == 1.0
    assert report.assumed == {"norm_num_groups": 32}
    assert report.notes == ["8 keys ignored: " + IGNORED_PREFIXES["channel_ds."]]
    assert json.loads(json.dumps(report.to_dict()))["ignored_key_count"] == 8


def test_lora_matters_so_the_comparison_is_sensitive():
    """Dropping the LoRA pairs changes the oracle's outputs by far more than TOLERANCE."""
    oracle = make_oracle((1, 2, 4), 3, 3, 4)
    without = make_oracle((1, 2, 4), 3, 3, 4)
    with torch.no_grad():
        for name, param in without.named_parameters():
            if name.endswith("lora_up.weight"):
                param.zero_()
        image = torch.rand(1, 3, 32, 32) * 2 - 1
        assert relative_error(without.encode(image), oracle.encode(image)) > 1e-2


def test_medvae_safetensors_and_expected_model(tmp_path, monkeypatch):
    """A safetensors re-save loads the same way; ``expected`` passes when the named model matches."""
    oracle = make_oracle((1, 2, 4), 3, 3, 4)
    path = tmp_path / "vae.safetensors"
    save_file(oracle.state_dict(), path)
    small = {**MEDVAE_MODELS["medvae_4_3_2d"],
             "vae": {**MEDVAE_MODELS["medvae_4_3_2d"]["vae"], "block_out_channels": (32, 64, 128)}}
    monkeypatch.setitem(MEDVAE_MODELS, "small_4_3", small)

    vae, report = load_medvae(path, expected="small_4_3")

    assert report.model_name == "small_4_3" and report.config == small["vae"]
    assert_same_function(vae, oracle, 3, 3, 4)


def test_medvae_expected_mismatch_names_the_fields(tmp_path, monkeypatch):
    oracle = make_oracle((1, 2, 4), 3, 3, 0)
    path = tmp_path / "vae.ckpt"
    save_medvae_ckpt(oracle, path)
    with pytest.raises(CheckpointError) as error:
        load_medvae(path, expected="medvae_4_3_2d")
    assert "block_out_channels: expected (128, 256, 512), found (32, 64, 128)" in str(error.value)
    assert "lora_rank: expected 4, found 0" in str(error.value)
    with pytest.raises(CheckpointError, match="unknown MedVAE model 'medvae_9'.*medvae_4_3_2d"):
        load_medvae(path, expected="medvae_9")


def broken_checkpoint(tmp_path, edit) -> str:
    """A small 4x3 LoRA MedVAE checkpoint after ``edit(state_dict)``."""
    state_dict = make_oracle((1, 2, 4), 3, 3, 4).state_dict()
    edit(state_dict)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state_dict}, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a LoRA-wrapped conv without its bias: reported under both names
        (lambda sd: sd.pop("decoder.up.0.block.1.conv2.conv.bias"),
         r"missing keys \(1: decoder\.up_blocks\.2\.resnets\.1\.conv2\.bias \(CompVis decoder\.up\.0\.block\.1"),
        # a key no rule knows
        (lambda sd: sd.__setitem__("encoder.down.0.block.0.extra.weight", torch.zeros(3)),
         r"unexpected keys \(1: encoder\.down\.0\.block\.0\.extra\.weight\)"),
        # a plain (non-LoRA) tensor of the wrong size
        (lambda sd: sd.__setitem__("encoder.mid.block_2.norm1.weight", torch.ones(64)),
         (r"wrong-shaped keys \(1: encoder\.mid_block\.resnets\.1\.norm1\.weight \(CompVis encoder\.mid\.block_2"
          r"\.norm1\.weight\) expected \(128,\) found \(64,\)")),
        # a LoRA factor of the wrong rank
        (lambda sd: sd.__setitem__("encoder.mid.attn_1.q.lora_up.weight", torch.ones(128, 2, 1, 1)),
         r"LoRA of 'encoder\.mid\.attn_1\.q' does not compose: .*lora_up \(128, 2, 1, 1\)"),
        # a LoRA half without the other
        (lambda sd: sd.pop("encoder.down.0.block.0.conv1.lora_down.weight"),
         r"lora_up weights without lora_down \(1: encoder\.down\.0\.block\.0\.conv1\.lora_up\.weight\)"),
        # a key the configuration is read from
        (lambda sd: sd.pop("decoder.conv_in.weight"), r"'decoder\.conv_in\.weight' is missing \(needed to detect"),
    ],
    ids=["missing", "unexpected", "wrong-shape", "lora-rank", "orphan-lora", "undetectable"],
)
def test_bad_keys_are_reported_by_name(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_medvae(broken_checkpoint(tmp_path, edit))


def test_sd_vae_diffusers_folder(tmp_path):
    """A diffusers model folder loads with its own config.json; the weights equal the saved model's."""
    config = {**SD_VAE_CONFIG, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "sample_size": 64}
    original = AutoencoderKL(**config).eval()
    original.save_pretrained(tmp_path / "sd-vae")

    vae, report = load_sd_vae(tmp_path / "sd-vae")

    assert report.format == "diffusers-folder" and report.file == "diffusion_pytorch_model.safetensors"
    assert report.config["sample_size"] == 64 and report.config["scaling_factor"] == 0.18215
    assert report.assumed == {}
    for key, value in original.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key


def test_sd_vae_folder_config_must_match_weights(tmp_path):
    config = {**SD_VAE_CONFIG, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1}
    AutoencoderKL(**config).save_pretrained(tmp_path / "vae")
    stored = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**stored, "latent_channels": 8}))
    with pytest.raises(CheckpointError, match="config.json disagrees with the weights: latent_channels: expected 8, "
                                              "found 4"):
        load_sd_vae(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="needs config.json"):
        load_sd_vae(tmp_path)


def test_sd_vae_whole_stable_diffusion_ckpt(tmp_path):
    """A CompVis LatentDiffusion checkpoint: first_stage_model.* converted, the rest ignored and reported."""
    oracle = make_oracle((1, 2, 4, 4), 3, 4, 0, stage2=False)
    state_dict = {f"first_stage_model.{k}": v for k, v in oracle.state_dict().items()}
    state_dict["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state_dict, "global_step": 470000}, path)

    vae, report = load_sd_vae(path)

    assert report.format == "compvis" and report.prefix == "first_stage_model."
    assert report.ignored_keys == ["model.diffusion_model.input_blocks.0.0.weight"]
    assert report.notes == ["1 keys outside first_stage_model.* ignored (the rest of the Stable Diffusion checkpoint)"]
    assert report.assumed == {"norm_num_groups": 32, "scaling_factor": 0.18215}
    assert_same_function(vae, oracle, 3, 4, 8)
    with pytest.raises(CheckpointError, match=r"block_out_channels: expected \(128, 256, 512, 512\), found \(32, "):
        load_sd_vae(path, expected=SD_VAE_CONFIG)


def test_sd_vae_single_safetensors_with_diffusers_and_legacy_names(tmp_path):
    """A single safetensors file of AutoencoderKL names, including pre-0.14 attention names, loads exactly."""
    config = {**SD_VAE_CONFIG, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1}
    original = AutoencoderKL(**config).eval()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, value in original.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state_dict[key] = value.clone()
    save_file(state_dict, tmp_path / "vae.safetensors")

    vae, report = load_sd_vae(tmp_path / "vae.safetensors")

    assert report.format == "diffusers" and report.config["block_out_channels"] == (32, 64)
    for key, value in original.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key
