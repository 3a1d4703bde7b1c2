"""The Preset type: the architecture, latent convention, schedule and task of a model family.

A preset is everything needed to build the PyTorch networks and to write a bundle manifest except the weights.
This module imports no other preset module, so medsr's own presets (``own``) and the paper's (``paper``) can both
build on it and the registry (``medsr.export.presets``) imports them one way only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from medsr.bundle.conditioning import PAPER, Conditioning
from medsr.bundle.manifest import IN_PLANE, THROUGH_PLANE


@dataclass(frozen=True)
class Preset:
    """One model family.

    Attributes:
        name: preset name, as ``medsr-export --preset NAME`` takes it.
        description: one line for ``--help`` and the manifest.
        scale: super-resolution factor s (LR pixel i <-> HR pixel centre s*i + (s-1)/2), of both plane axes
            (``plane`` "in-plane") or of the second one, the slice direction ("through-plane").
        image_channels: channels the VAE takes; grayscale images are replicated to this many and averaged back.
        vae: diffusers AutoencoderKL keyword arguments.
        unet: diffusers UNet2DModel keyword arguments (in_channels = 2 * latent channels: noisy HR latent + LR latent).
        scheduler: medsr.engine.schedulers.SchedulerConfig fields (prediction type, schedule, sampler, steps).
        latent_scaling_factor, latent_shift_factor: z = (posterior latent - shift) * scale, as diffusers does.
        lr_latent: "mean" (deterministic) or "sample" (the paper's ``posterior.sample()``, seeded).
        intensity: normalization of input intensities to [-1, 1] (robust percentiles of the volume).
        degradation: the operator that made LR from HR in training (medsr.degrade), or None when unknown.
        consistency: the engine's default data-consistency mode ("none", "kspace", "backproject").
        conditioning: how the denoiser sees the LR slice (medsr.bundle.conditioning; default the paper's).
        plane: "in-plane" (s x s) or "through-plane" (1 x s on planes containing the slice axis; needs a
            ``thick_slices`` degradation), the manifest's ``task.plane``.
        vae_checkpoint: which published VAE ``--vae-weights`` holds: a medsr.export.checkpoints.MEDVAE_MODELS name,
            "sd-vae", or None (medsr's own safetensors via ``--weights``).
        scales: through-plane only: every factor the one network was trained for (``scale`` among them), its
            degradation's FWHM scaling with the factor (FWHM / s as at ``scale``); empty: ``scale`` alone.
    """

    name: str
    description: str
    scale: int
    image_channels: int
    vae: dict
    unet: dict
    scheduler: dict
    latent_scaling_factor: float = 1.0
    latent_shift_factor: float = 0.0
    lr_latent: str = "mean"
    intensity: dict = field(default_factory=lambda: {"method": "percentile", "low": 0.5, "high": 99.5})
    degradation: dict | None = None
    consistency: str = "none"
    conditioning: Conditioning = PAPER
    plane: str = IN_PLANE
    vae_checkpoint: str | None = None
    scales: tuple[int, ...] = ()

    def __post_init__(self):
        if self.scales and (self.plane != THROUGH_PLANE or self.scale not in self.scales or min(self.scales) < 2):
            raise ValueError(
                f"preset {self.name}: scales {self.scales} need plane {THROUGH_PLANE!r}, factors >= 2 "
                f"and the scale {self.scale} among them"
            )

    @property
    def trained_scales(self) -> tuple[int, ...]:
        """The factors this preset's network serves: ``scales``, or ``(scale,)``."""
        return tuple(sorted(self.scales)) if self.scales else (self.scale,)

    def degradation_at(self, scale: int) -> dict:
        """The degradation dict at factor ``scale``: the preset's, with a thick-slice FWHM in proportion to s."""
        degradation = dict(self.degradation or {})
        if scale != self.scale and "fwhm" in degradation:
            degradation["fwhm"] = degradation["fwhm"] * scale / self.scale
        return {**degradation, "scale": scale} if degradation else degradation

    @property
    def vae_factor(self) -> int:
        """Spatial downsampling factor f of the VAE (2 per level after the first)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae["latent_channels"]

    @property
    def factors(self) -> tuple[int, int]:
        """Upsampling factor of each plane axis (H, W): (s, s) in-plane, (1, s) through-plane."""
        return (1, self.scale) if self.plane == THROUGH_PLANE else (self.scale, self.scale)

    def crop_multiple(self, scale: int | None = None) -> int:
        """Square HR training crops at factor ``scale`` (default ``scale``) have sides a multiple of this: in-plane
        the LR crop (side / s) must be a multiple of ``lr_multiple``; through-plane only the second axis is thinned,
        so the side must be a multiple of s and of ``lr_multiple`` (the first axis is the LR's own)."""
        scale = scale or self.scale
        if self.plane == THROUGH_PLANE:
            return math.lcm(self.lr_multiple, scale)
        return self.lr_multiple * scale

    @property
    def lr_multiple(self) -> int:
        """LR sizes must be multiples of this: the LR latent is LR/f and the HR latent s*LR/f must pass the UNet's
        2**(levels-1) downsampling, so m = f * d / gcd(s, d) with d = 2**(UNet levels - 1); through-plane the
        first axis is not upsampled, so m = f * d."""
        d = 2 ** (len(self.unet["block_out_channels"]) - 1)
        return self.vae_factor * d // math.gcd(min(self.factors), d)
