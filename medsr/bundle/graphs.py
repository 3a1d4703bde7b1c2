"""One I/O spec per exported network: names and dynamic axes shared by export, the engine and the tests.

The three graphs of a bundle (docs/bundle.md):

- ``vae_encoder``: ``image`` (B, C_img, H, W) -> ``latent_mean``, ``latent_logvar`` (B, C_lat, H/f, W/f).
  The posterior's moments, unscaled; the engine applies the manifest's latent shift/scale and decides between the
  mean and a seeded sample.
- ``vae_decoder``: ``latent`` (B, C_lat, h, w), unscaled -> ``image`` (B, C_img, h*f, w*f).
- ``denoiser``: ``sample`` (B, C_lat, h, w), ``lr_latent`` (B, C_lat, h/s, w/s), ``timestep`` (B,) float32 ->
  ``model_output`` (B, C_lat, h, w). The LR latent is upsampled and concatenated inside the graph; under the
  ``upsampled_latent_concat`` conditioning (medsr.bundle.conditioning) it is the latent of the LR slice already
  upsampled to the HR size, (B, C_lat, h, w), and is concatenated as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported network.

    ``dynamic_axes`` maps each input/output name to {axis index: symbolic dimension name}, the form
    ``torch.onnx.export`` takes and the manifest records.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]

    @property
    def file(self) -> str:
        """File name of the graph inside a bundle."""
        return f"{self.name}.onnx"

    def rank(self, tensor: str) -> int:
        """Number of axes of input or output ``tensor``: 1 for ``timestep`` (B,), else 4 (B, C, H, W); the last axis
        of each is dynamic."""
        return max(self.dynamic_axes[tensor]) + 1


_IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}
_LATENT_AXES = {0: "batch", 2: "latent_height", 3: "latent_width"}

VAE_ENCODER = GraphSpec(
    name="vae_encoder",
    inputs=("image",),
    outputs=("latent_mean", "latent_logvar"),
    dynamic_axes={"image": _IMAGE_AXES, "latent_mean": _LATENT_AXES, "latent_logvar": _LATENT_AXES},
)
VAE_DECODER = GraphSpec(
    name="vae_decoder",
    inputs=("latent",),
    outputs=("image",),
    dynamic_axes={"latent": _LATENT_AXES, "image": _IMAGE_AXES},
)
DENOISER = GraphSpec(
    name="denoiser",
    inputs=("sample", "lr_latent", "timestep"),
    outputs=("model_output",),
    dynamic_axes={
        "sample": _LATENT_AXES,
        "lr_latent": {0: "batch", 2: "lr_latent_height", 3: "lr_latent_width"},
        "timestep": {0: "batch"},
        "model_output": _LATENT_AXES,
    },
)

GRAPHS: dict[str, GraphSpec] = {spec.name: spec for spec in (VAE_ENCODER, VAE_DECODER, DENOISER)}
