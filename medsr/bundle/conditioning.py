"""How the denoiser sees the low-resolution slice: the manifest's ``denoiser`` conditioning fields.

Two modes, both concatenating a conditioning latent to the noisy HR latent on channels inside the denoiser graph:

- ``lr_latent_bilinear_concat`` (the paper's): the LR slice is encoded at its own size, and the graph upsamples that
  latent bilinearly (centre-aligned) to the HR latent size.
- ``upsampled_latent_concat``: the engine first upsamples the LR slice to the HR size with ``upsampler``, a fair
  baseline of medsr.degrade (``zerofill`` is the pseudo-inverse of k-space truncation: every measured frequency kept
  exactly, nothing invented), and encodes that HR-size image; the graph takes the latent as it is. The denoiser then
  only has to add what the baseline lacks, and the measured data reach it without a learned upsampling. An in-plane
  task (s x s) takes the in-plane baselines ``zerofill``, ``bicubic``, ``lanczos``; a through-plane task (1 x s)
  the slice-axis baselines ``linear``, ``bspline``, ``sinc`` (medsr.degrade.upsample_slices), which upsample the
  plane's second axis, the slice direction, only (the manifest refuses the other combinations).

``residual``: the graph returns the conditioning latent (at the HR latent size) plus the network's output, so an x0
model learns the correction to the baseline rather than the whole image. Only meaningful for x0 prediction.

Older manifests name only the mode; the other fields default to the paper's convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsr.degrade import BASELINES, SLICE_BASELINES, upsample_baseline, upsample_slices
from medsr.errors import BundleError

BILINEAR = "lr_latent_bilinear_concat"
UPSAMPLED = "upsampled_latent_concat"
MODES = (BILINEAR, UPSAMPLED)
#: Upsamplers of a through-plane task: they upsample the last axis (the slice direction) only.
SLICE_UPSAMPLERS = SLICE_BASELINES
UPSAMPLERS = BASELINES + SLICE_UPSAMPLERS


@dataclass(frozen=True)
class Conditioning:
    """The denoiser's conditioning convention (see the module docstring)."""

    mode: str = BILINEAR
    upsampler: str | None = None
    residual: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise BundleError(f"denoiser.conditioning must be one of {MODES}, got {self.mode!r}")
        if (self.mode == UPSAMPLED) != (self.upsampler is not None):
            raise BundleError(
                f"denoiser.conditioning {self.mode!r} with denoiser.upsampler {self.upsampler!r}: an upsampler is "
                f"needed in mode {UPSAMPLED!r} and taken only there"
            )
        if self.upsampler is not None and self.upsampler not in UPSAMPLERS:
            raise BundleError(f"denoiser.upsampler must be one of {UPSAMPLERS}, got {self.upsampler!r}")
        if not isinstance(self.residual, bool):
            raise BundleError(f"denoiser.residual must be of type bool, got {self.residual!r}")

    @classmethod
    def from_manifest(cls, denoiser: dict) -> Conditioning:
        """From the manifest's ``denoiser`` section (a missing mode is the paper's)."""
        conditioning = cls(
            mode=denoiser.get("conditioning", BILINEAR),
            upsampler=denoiser.get("upsampler"),
            residual=denoiser.get("residual", False),
        )
        conditioning.check_prediction(denoiser.get("prediction_type"))
        return conditioning

    def check_prediction(self, prediction_type: str) -> None:
        """Refuse a residual graph whose output is not x0: the skip path adds an image latent, not noise."""
        if self.residual and prediction_type != "sample":
            raise BundleError(
                "denoiser.residual: a residual denoiser must predict x0 (denoiser.prediction_type 'sample'), got "
                f"{prediction_type!r}"
            )

    def to_manifest(self) -> dict:
        """The manifest's ``denoiser`` fields of this convention."""
        fields = {"conditioning": self.mode, "residual": self.residual}
        if self.upsampler is not None:
            fields["upsampler"] = self.upsampler
        return fields

    @property
    def upsamples_in_graph(self) -> bool:
        """Whether the denoiser graph resizes its conditioning latent (else it comes at the HR latent size)."""
        return self.mode == BILINEAR

    def zooms(self, factors: tuple[int, int]) -> tuple[int, int]:
        """Size of the encoded conditioning image relative to the LR slice, per axis (H, W): (1, 1), or the task's
        upsampling ``factors`` ((s, s) in-plane, (1, s) through-plane) when upsampled first."""
        return (1, 1) if self.mode == BILINEAR else tuple(factors)

    def image(self, lr: np.ndarray, scale: int) -> np.ndarray:
        """The image the VAE encoder sees for LR slices (..., h, w) in [-1, 1]: themselves, or upsampled by
        ``scale`` to (..., s*h, s*w) float32 (in-plane upsamplers) or (..., h, s*w) (slice-axis upsamplers, along
        the last axis, the slice direction)."""
        if self.mode == BILINEAR:
            return lr
        if self.upsampler in SLICE_UPSAMPLERS:
            return upsample_slices(lr, scale, axis=-1, method=self.upsampler).astype(np.float32)
        return upsample_baseline(lr, self.upsampler, scale).astype(np.float32)


#: The paper's convention: what a manifest without conditioning fields means.
PAPER = Conditioning()
