"""An independent CompVis LDM autoencoder (Encoder, Decoder, KL head), the oracle of the checkpoint tests.

Written from the architecture description (docs/sources.md, "MedVAE and SD-VAE checkpoints"; latent-diffusion's
``ldm/modules/diffusionmodules/model.py`` layout) without diffusers, so that a test comparing it with the converted
diffusers AutoencoderKL checks the key conversion and the LoRA merge rather than one implementation against
itself. Module attribute names reproduce the published state-dict keys exactly (``encoder.down.0.block.1.conv1.
conv.weight``, ``decoder.up.2.upsample.conv.weight``, ...), and LoRA convs stay UNMERGED:
``conv(x) + lora_up(lora_down(x))``, as MedVAE runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """CompVis ``Normalize``: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class LoraConv(nn.Module):
    """MedVAE's LoRA-injected Conv2d: ``conv(x) + lora_up(lora_down(x))`` (scale 1, no dropout at eval).

    lora_down has the conv's kernel, stride and padding and maps to ``rank`` channels; lora_up is 1x1, no bias.
    """

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, rank: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding)
        self.lora_down = nn.Conv2d(cin, rank, kernel, padding=padding, bias=False)
        self.lora_up = nn.Conv2d(rank, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.lora_up(self.lora_down(x))


def conv(cin: int, cout: int, kernel: int, rank: int) -> nn.Module:
    """A 'same'-padded conv of a ResnetBlock/AttnBlock: LoRA-wrapped when ``rank`` > 0, plain otherwise."""
    padding = kernel // 2
    return LoraConv(cin, cout, kernel, padding, rank) if rank else nn.Conv2d(cin, cout, kernel, padding=padding)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus the input (through nin_shortcut if widths differ)."""

    def __init__(self, cin: int, cout: int, rank: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), conv(cin, cout, 3, rank)
        self.norm2, self.conv2 = group_norm(cout), conv(cout, cout, 3, rank)
        if cin != cout:
            self.nin_shortcut = conv(cin, cout, 1, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv q, k, v and proj_out, plus the input."""

    def __init__(self, channels: int, rank: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (conv(channels, channels, 1, rank) for _ in range(3))
        self.proj_out = conv(channels, channels, 1, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(b, c, -1)  # (B, C, HW)
        v = self.v(h).reshape(b, c, -1)  # (B, C, HW)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (B, HW_query, HW_key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) with zeros, then a stride-2 3x3 conv without padding (never LoRA-wrapped)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (never LoRA-wrapped)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int, rank: int) -> nn.Module:
    """``mid`` = block_1, attn_1, block_2 at the bottom width."""
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (ResnetBlock(channels, channels, rank), AttnBlock(channels, rank),
                                            ResnetBlock(channels, channels, rank))
    return mid


def run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """conv_in -> per level: num_res_blocks ResnetBlocks (+ Downsample except last) -> mid -> norm, swish, conv_out.

    Output has 2 * z_channels (mean and log-variance).
    """

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, in_channels: int,
                 z_channels: int, rank: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(cin, ch * mult, rank))
                cin = ch * mult
            if level < len(ch_mult) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = mid_block(cin, rank)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in -> mid -> levels from the bottom (``up[L-1]``) to the top (``up[0]``): num_res_blocks + 1
    ResnetBlocks (+ Upsample except ``up[0]``) -> norm, swish, conv_out."""

    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, out_channels: int,
                 z_channels: int, rank: int):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin, rank)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(cin, ch * ch_mult[level], rank))
                cin = ch * ch_mult[level]
            if level > 0:
                stage.upsample = Upsample(cin)
            stages.insert(0, stage)  # up[i] is level i: indices run top-down while the loop runs bottom-up
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CompVisVAE(nn.Module):
    """CompVis AutoencoderKL (embed_dim = z_channels) with MedVAE's stage-2 head (channel_ds, channel_proj).

    ``encode(x)`` -> moments (B, 2 * z, H/f, W/f); ``decode(z)`` -> image. The stage-2 head only produces the
    checkpoint's ``channel_ds.*`` / ``channel_proj.*`` keys; SR never runs it.
    """

    def __init__(self, ch: int = 128, ch_mult: tuple[int, ...] = (1, 2, 4), num_res_blocks: int = 2,
                 image_channels: int = 3, z_channels: int = 3, rank: int = 0, stage2: bool = True):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, image_channels, z_channels, rank)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, image_channels, z_channels, rank)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        if stage2:
            self.channel_ds = nn.Sequential(nn.Conv2d(z_channels, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                                            nn.ReLU(), nn.Conv2d(64, z_channels, 1))
            self.channel_proj = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every weight a random value of a sensible scale, LoRA pairs and norms included (in place).

    Convs: N(0, 1/fan_in); LoRA down N(0, 1/fan_in) and up N(0, 0.25/r), so that up @ down is about half the
    size of the base kernel and a wrong merge cannot hide; norms: weight 1 + N(0, 0.1), bias N(0, 0.1).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 4:
                fan_in = param.shape[1] * param.shape[2] * param.shape[3]
                scale = (0.25 / param.shape[1]) ** 0.5 if name.endswith("lora_up.weight") else fan_in**-0.5
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()
