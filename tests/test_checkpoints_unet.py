"""latent-sr denoiser checkpoints: a Lightning .ckpt around a diffusers UNet2DModel loads with its architecture
inferred from the shapes and computes exactly what the original module computes."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from medsr.errors import CheckpointError
from medsr.export.checkpoints import UNET_ASSUMED_DEFAULTS, file_sha256, load_latentsr_unet

# Small UNets in the paper's layout family; each row: (UNet2DModel kwargs, LightningModule attribute).
UNETS = {
    # the paper's pattern: attention at one resolution and in the mid block, 2 layers per block, x0 UNet on 2C in
    "paper-like": ({"sample_size": 16, "in_channels": 6, "out_channels": 3, "block_out_channels": (32, 64, 64),
                    "layers_per_block": 2, "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}, "model."),
    # other inferable choices: no mid attention, scale-shift time conditioning, Fourier time embedding; and one
    # that is not inferable (attention_head_dim, passed with assume=)
    "variant": ({"sample_size": 8, "in_channels": 8, "out_channels": 4, "block_out_channels": (32, 64),
                 "layers_per_block": 1, "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "AttnUpBlock2D"), "add_attention": False,
                 "resnet_time_scale_shift": "scale_shift", "time_embedding_type": "fourier",
                 "time_embedding_dim": 96, "attention_head_dim": 16}, "unet."),
}


def random_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel whose every parameter is perturbed, so that no zero-initialised layer hides a bad load."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def save_lightning_ckpt(model: UNet2DModel, attribute: str, path, hr_size: int | None = None) -> None:
    """What ``Trainer.save_checkpoint`` writes for latent-sr's LightningModule (plain types only)."""
    state_dict = {f"{attribute}{key}": value for key, value in model.state_dict().items()}
    state_dict["alphas"] = torch.linspace(0.99, 0.01, 1000)
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    state_dict["model_ema.conv_inweight"] = model.conv_in.weight.detach().clone()
    checkpoint = {
        "epoch": 99, "global_step": 12345, "pytorch-lightning_version": "2.1.3", "state_dict": state_dict,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 99}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.1),
                                                                 "dirpath": "/runs/ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"T_max": 100, "eta_min": 1e-6}],
        "hyper_parameters": {"learning_rate": 1e-4, "channel_mult": (1, 2, 2), "attention_resolutions": (16,),
                             **({"hr_size": hr_size} if hr_size else {})},
    }
    torch.save(checkpoint, path)


def outputs(model: UNet2DModel, config: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    size = config["sample_size"]
    sample = torch.randn(2, config["in_channels"], size, size, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor([999, 17])).sample


@pytest.mark.parametrize("name", list(UNETS))
def test_lightning_unet_loads_exactly(name, tmp_path):
    config, attribute = UNETS[name]
    original = random_unet(config)
    path = tmp_path / "epoch=99.ckpt"
    save_lightning_ckpt(original, attribute, path, hr_size=config["sample_size"])

    assume = {"attention_head_dim": 16} if name == "variant" else None
    unet, report = load_latentsr_unet(path, assume=assume)

    inferred = {key: report.config[key] for key in config}
    assert inferred == config
    assert torch.equal(outputs(unet, config), outputs(original, config))
    assert report.prefix == attribute and report.format == "lightning-ckpt"
    assert report.file == "epoch=99.ckpt" and report.sha256 == file_sha256(path)
    assert report.ignored_keys == ["alphas", "model_ema.decay", "model_ema.conv_inweight"]
    assert report.notes == ["2 EMA entries (model_ema.*) present and not loaded; the raw weights were used"]
    expected_assumed = {k: v for k, v in UNET_ASSUMED_DEFAULTS.items() if k != "sample_size"}
    if assume:
        del expected_assumed["attention_head_dim"]
    assert report.assumed == expected_assumed


def test_attention_head_dim_is_assumed_and_matters(tmp_path):
    """The head count cannot be read off the weights: with the wrong assumption the outputs differ."""
    config, attribute = UNETS["variant"]
    original = random_unet(config)
    path = tmp_path / "unet.ckpt"
    save_lightning_ckpt(original, attribute, path)
    unet, report = load_latentsr_unet(path)
    assert report.assumed["attention_head_dim"] == 8 and report.assumed["sample_size"] is None
    assert not torch.allclose(outputs(unet, config), outputs(original, config), atol=1e-4)


def test_bare_state_dict_and_explicit_prefix(tmp_path):
    config, _ = UNETS["paper-like"]
    original = random_unet(config)
    torch.save(original.state_dict(), tmp_path / "bare.pt")
    unet, report = load_latentsr_unet(tmp_path / "bare.pt")
    assert report.prefix == "" and report.format == "unet-state-dict" and report.ignored_keys == []
    assert torch.equal(outputs(unet, config), outputs(original, config))

    two = {**{f"model.{k}": v for k, v in original.state_dict().items()},
           **{f"teacher.{k}": v for k, v in original.state_dict().items()}}
    torch.save({"state_dict": two}, tmp_path / "two.ckpt")
    with pytest.raises(CheckpointError, match=r"several UNets in one checkpoint \(prefixes \['model\.', 'teacher\.'\]"):
        load_latentsr_unet(tmp_path / "two.ckpt")
    unet, report = load_latentsr_unet(tmp_path / "two.ckpt", prefix="teacher.")
    assert report.prefix == "teacher." and len(report.ignored_keys) == len(original.state_dict())


def test_unet_errors_are_named(tmp_path):
    config, _ = UNETS["paper-like"]
    original = random_unet(config)
    torch.save({"state_dict": {"alphas": torch.zeros(3)}}, tmp_path / "none.ckpt")
    with pytest.raises(CheckpointError, match=r"no diffusers UNet2DModel weights found.*top-level names: 1: alphas"):
        load_latentsr_unet(tmp_path / "none.ckpt")

    state_dict = {f"model.{k}": v for k, v in original.state_dict().items()}
    state_dict["model.up_blocks.1.attentions.0.to_k.weight"] = torch.zeros(64, 32)
    del state_dict["model.conv_norm_out.bias"]
    torch.save({"state_dict": state_dict}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1: model\.conv_norm_out\.bias\).*wrong-shaped keys "
                                              r"\(1: model\.up_blocks\.1\.attentions\.0\.to_k\.weight expected"):
        load_latentsr_unet(tmp_path / "bad.ckpt")

    torch.save(original.state_dict(), tmp_path / "good.pt")
    with pytest.raises(CheckpointError, match=r"assume= got unknown fields \['block_out_channels'\]"):
        load_latentsr_unet(tmp_path / "good.pt", assume={"block_out_channels": (1,)})
    with pytest.raises(CheckpointError, match="cannot be built"):
        load_latentsr_unet(tmp_path / "good.pt", assume={"norm_num_groups": 7})
