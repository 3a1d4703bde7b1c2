"""Input shapes of the three graphs for a slice size, and shape profiles for engines that compile per shape.

The shapes follow from the bundle (scale s, VAE factor f, channels, LR padding multiple) and the graph names of
medsr.bundle.graphs, so TensorRT profiles, OpenVINO static shapes, the benchmark's FLOP counts and the tests all
derive them in one place. medsr builds static profiles (min = opt = max, the fast path: one slice size, CUDA
graphs); a ShapeProfile may also hold a range (min < max), which TensorRT runs without CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

from medsr.bundle.graphs import GRAPHS
from medsr.errors import ShapeError

Shape = tuple[int, ...]


def padded_size(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (the pipeline pads LR slices so)."""
    return -(-size // multiple) * multiple


def graph_input_shapes(bundle, batch: int, lr_height: int, lr_width: int) -> dict[str, dict[str, Shape]]:
    """{graph: {input name: shape}} for ``batch`` LR slices of lr_height x lr_width pixels (before padding).

    The HR side of each axis is the LR side times the bundle's factor of that axis (``bundle.factors``: s x s
    in-plane, 1 x s through-plane, where the second axis is the slice direction).

    Args:
        bundle: a medsr.bundle.Bundle (or anything with factors, vae_factor, image_channels,
            latent_channels, lr_multiple and conditioning).
    """
    if batch < 1 or lr_height < 1 or lr_width < 1:
        raise ShapeError(f"batch and LR size must be positive, got batch {batch}, {lr_height}x{lr_width}")
    height, width = padded_size(lr_height, bundle.lr_multiple), padded_size(lr_width, bundle.lr_multiple)
    f, (s_h, s_w), c_lat = bundle.vae_factor, bundle.factors, bundle.latent_channels
    z_h, z_w = bundle.conditioning.zooms(bundle.factors)  # the encoder sees the LR or its upsampling
    lr_latent = (batch, c_lat, z_h * height // f, z_w * width // f)
    hr_latent = (batch, c_lat, s_h * height // f, s_w * width // f)
    shapes = {
        "vae_encoder": {"image": (batch, bundle.image_channels, z_h * height, z_w * width)},
        "vae_decoder": {"latent": hr_latent},
        "denoiser": {"sample": hr_latent, "lr_latent": lr_latent, "timestep": (batch,)},
    }
    assert all(tuple(shapes[name]) == spec.inputs for name, spec in GRAPHS.items())
    return shapes


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max shapes of every input of one graph (TensorRT's optimization profile).

    ``shapes`` maps input name -> (min, opt, max). Static when min == opt == max for every input.
    """

    graph: str
    shapes: tuple[tuple[str, tuple[Shape, Shape, Shape]], ...]

    @property
    def static(self) -> bool:
        return all(low == high for _, (low, _, high) in self.shapes)

    @property
    def tag(self) -> str:
        """A file-name-safe id: ``b1x3x64x64`` style dims of each input's min (and max when dynamic)."""
        parts = []
        for _, (low, _, high) in self.shapes:
            dims = "x".join(map(str, low))
            parts.append(dims if low == high else f"{dims}-{'x'.join(map(str, high))}")
        return "_".join(parts)

    def admits(self, shapes: dict[str, Shape]) -> bool:
        """Whether every input shape lies within [min, max] dimension by dimension."""
        bounds = dict(self.shapes)
        if set(shapes) != set(bounds):
            return False
        for name, shape in shapes.items():
            low, _, high = bounds[name]
            if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
                return False
        return True

    def to_dict(self) -> dict:
        return {name: {"min": list(low), "opt": list(opt), "max": list(high)} for name, (low, opt, high) in self.shapes}


def static_profiles(bundle, batch: int, lr_height: int, lr_width: int) -> dict[str, ShapeProfile]:
    """One static profile per graph for exactly this batch and slice size."""
    shapes = graph_input_shapes(bundle, batch, lr_height, lr_width)
    return {
        graph: ShapeProfile(graph, tuple((name, (shape, shape, shape)) for name, shape in inputs.items()))
        for graph, inputs in shapes.items()
    }


def choose_profile(profiles: list[ShapeProfile], shapes: dict[str, Shape]) -> ShapeProfile | None:
    """The profile to run ``shapes`` with: the static one that matches exactly, else the narrowest range that
    admits them (fewest admitted elements), else None (the caller builds a static profile for the new shape)."""
    admitting = [profile for profile in profiles if profile.admits(shapes)]
    if not admitting:
        return None

    def volume(profile: ShapeProfile) -> int:
        total = 0
        for _, (low, _, high) in profile.shapes:
            size = 1
            for lo, hi in zip(low, high):
                size *= hi - lo + 1
            total += size
        return total

    return min(admitting, key=volume)
