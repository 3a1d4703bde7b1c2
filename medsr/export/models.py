"""The PyTorch networks medsr exports: a diffusers AutoencoderKL split into encoder and decoder graphs, and a
diffusers UNet2DModel conditioned on the low-resolution latent.

Each wrapper is exactly the computation of one bundle graph (medsr.bundle.graphs), so the ONNX export, the
``--engine torch`` path and the parity harness all run the same modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from medsr.bundle.conditioning import PAPER, Conditioning

# Posterior log-variance clamp of the CompVis/diffusers DiagonalGaussianDistribution (docs/sources.md,
# "MedVAE and SD-VAE checkpoints").
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def build_vae(config: dict) -> AutoencoderKL:
    """A diffusers AutoencoderKL from its constructor keyword arguments."""
    return AutoencoderKL(**config)


def build_unet(config: dict) -> UNet2DModel:
    """A diffusers UNet2DModel from its constructor keyword arguments."""
    return UNet2DModel(**config)


class VaeEncoderGraph(nn.Module):
    """``image`` (B, C_img, H, W) in [-1, 1] -> posterior ``(mean, logvar)``, each (B, C_lat, H/f, W/f), unscaled."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)


class VaeDecoderGraph(nn.Module):
    """``latent`` (B, C_lat, h, w), unscaled -> ``image`` (B, C_img, h*f, w*f) in about [-1, 1]."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = vae.post_quant_conv

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        return self.decoder(latent)


class ConditionedDenoiser(nn.Module):
    """The latent-SR denoiser of arXiv 2604.12152: UNet2DModel on [noisy HR latent, conditioning latent].

    Under the paper's conditioning the LR latent, encoded at the LR image's own size, is upsampled bilinearly
    (align_corners=False, the one centre-aligned geometry of medsr) to the sample's size inside the graph, so the
    engine never resizes latents; under ``upsampled_latent_concat`` it already has the sample's size
    (medsr.bundle.conditioning). The output is what the manifest's ``denoiser.prediction_type`` says (x0, epsilon, v
    or flow velocity); a residual denoiser adds the conditioning latent to the network's x0.
    """

    def __init__(self, unet: UNet2DModel, conditioning: Conditioning = PAPER):
        super().__init__()
        self.unet = unet
        self.upsample = conditioning.upsamples_in_graph
        self.residual = conditioning.residual

    def forward(self, sample: torch.Tensor, lr_latent: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        condition = lr_latent
        if self.upsample:
            condition = F.interpolate(lr_latent, size=sample.shape[-2:], mode="bilinear", align_corners=False)
        output = self.unet(torch.cat([sample, condition], dim=1), timestep).sample
        return output + condition if self.residual else output


def graph_modules(vae: AutoencoderKL, unet: UNet2DModel, conditioning: Conditioning = PAPER) -> dict[str, nn.Module]:
    """The three bundle graphs as eval-mode modules, keyed by graph name."""
    modules = {
        "vae_encoder": VaeEncoderGraph(vae),
        "vae_decoder": VaeDecoderGraph(vae),
        "denoiser": ConditionedDenoiser(unet, conditioning),
    }
    return {name: module.eval() for name, module in modules.items()}
