"""Super-resolving a slice larger than the tile size in overlapping tiles, blended smoothly in the SR domain.

Geometry: the LR slice, already padded to the model's size unit m (``bundle.lr_multiple``), is covered by square
tiles of T LR pixels (T a multiple of m) whose origins are multiples of m, a regular stride T - O apart with the last
tile flush with the far edge (so neighbours share at least O LR pixels). Every tile goes through encoder, denoiser and
decoder on its own, so the model's working memory is that of one batch of tiles, whatever the slice size.

Noise: the tiles run in lockstep through one sampler over the stack of tiles, and each tile's noise (LR posterior
sample, initial noise, per-step noise of stochastic samplers) is the crop of the array the untiled slice would have
drawn from its own generator (``default_rng([seed, slice_index])``, or the stack's with shared noise). Overlapping
tiles therefore start from the same noise, and a slice that fits in one tile gives exactly the untiled result. Under
the ``upsampled_latent_concat`` conditioning the whole slice is upsampled once and the tiles' conditioning images
are cut from it, as training cuts its crops from whole-slice upsamplings.

Scale: the SR domain is the LR one times the bundle's factors per axis (f_H, f_W): (s, s) in-plane, (1, s)
through-plane, where a square LR tile becomes T x sT.

Blending: each SR tile is weighted by a separable window that is 1 inside and ramps as sin^2 over its overlap with
each neighbour (cos^2 toward it), so two neighbours' weights sum to 1 across their overlap, and the tile's outermost
pixels, where its convolutions saw zero padding, weigh almost nothing. The blend is divided by the summed weights,
which on a product grid of tiles is the outer product of the row and column sums.

Memory, measured with ``medsr-infer`` on a 2000x2000 radiograph (RG1_UNCR padded) at x4, tiny bundle, tiles of 128
with overlap 32 (441 tiles), batch 4, on 2 CPU cores: peak RSS 1.85 GiB = about 0.1 GiB of runtime, about 0.6 GiB of
model working memory for one batch of tiles (fixed by the tile size, not the image), and about 20 bytes per output
pixel for the image arrays (8000x8000 output). 500x500 and 1000x1000 inputs peaked at 0.79 and 1.03 GiB. Untiled,
the same decoder would hold 16-channel float32 activations of 8000x8000 (4 GiB each).
"""

from __future__ import annotations

import math

import numpy as np

from medsr.errors import ShapeError


def check_tile_options(size: int, overlap: int, multiple: int) -> tuple[int, int]:
    """Validate ``--tile`` and ``--tile-overlap`` (LR pixels) for a model of size unit ``multiple``; return the
    tile size and the overlap rounded up to that unit."""
    if size < multiple or size % multiple:
        raise ShapeError(f"--tile must be a positive multiple of {multiple} (this model's LR size unit), got {size}")
    if not 0 <= overlap < size:
        raise ShapeError(f"--tile-overlap must be in [0, {size}) LR pixels for --tile {size}, got {overlap}")
    return size, min(-(-overlap // multiple) * multiple, size - multiple)


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of tiles of ``tile`` pixels covering [0, ``length``): a stride of ``tile - overlap``, the last tile
    flush with the end. ``length``, ``tile`` and ``overlap`` are multiples of the size unit.

    >>> tile_origins(232, 128, 32)
    [0, 96, 104]
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def blend_window(origins: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """The 1D SR-domain window (tile * scale,) of each tile along one axis: sin^2 up over the overlap with the previous
    tile, cos^2 down over the overlap with the next one, 1 elsewhere (and at the image's own edges)."""
    length = tile * scale
    windows = []
    for i, origin in enumerate(origins):
        window = np.ones(length, dtype=np.float64)
        if i > 0:
            ramp = (origins[i - 1] + tile - origin) * scale
            window[:ramp] *= np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        if i < len(origins) - 1:
            ramp = (origin + tile - origins[i + 1]) * scale
            window[length - ramp :] *= np.cos(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        windows.append(window)
    return windows


def super_resolve_tiled(
    pipeline, lr: np.ndarray, rng: np.random.Generator, options, size: int, overlap: int
) -> np.ndarray:
    """Super-resolve one padded LR slice (H, W) in [-1, 1] in tiles; return the SR slice (f_H*H, f_W*W) float32.

    ``pipeline`` is the LatentSRPipeline (its encode, sample_latents and decode run each stack of tiles), ``rng`` the
    slice's fresh noise generator (``options.generators``), ``options`` its SamplingOptions, ``size`` and
    ``overlap`` as ``check_tile_options`` returns.
    """
    bundle = pipeline.bundle
    (f_h, f_w), factor = bundle.factors, bundle.vae_factor
    height, width = lr.shape
    tile_h, tile_w = min(size, height), min(size, width)
    rows, cols = tile_origins(height, tile_h, overlap), tile_origins(width, tile_w, overlap)
    boxes = [(y, x) for y in rows for x in cols]
    channels = bundle.latent_channels
    lr_latent = options.lr_latent or bundle.manifest.vae.lr_latent
    zoom = pipeline.conditioning.zooms(bundle.factors)  # conditioning image size / LR size, per axis
    eps = None
    if lr_latent == "sample":
        eps = rng.standard_normal((channels, zoom[0] * height // factor, zoom[1] * width // factor), dtype=np.float32)
    hr_shape = (channels, f_h * height // factor, f_w * width // factor)

    def crops(array: np.ndarray, zoom: tuple[int, int]) -> np.ndarray:
        """The (n_tiles, C, ...) stack of tile crops of a latent array ``zoom`` (per axis) times the LR latent size."""
        return np.stack(
            [
                array[
                    :,
                    zoom[0] * y // factor : zoom[0] * (y + tile_h) // factor,
                    zoom[1] * x // factor : zoom[1] * (x + tile_w) // factor,
                ]
                for y, x in boxes
            ]
        )

    chunk = max(1, options.batch_size)
    condition = pipeline.conditioning.image(lr, bundle.scale)  # of the whole slice, as in training, then cut
    tiles = np.stack(
        [condition[zoom[0] * y : zoom[0] * (y + tile_h), zoom[1] * x : zoom[1] * (x + tile_w)] for y, x in boxes]
    ).astype(np.float32)
    image = np.repeat(tiles[:, None], bundle.image_channels, axis=1)
    eps_tiles = crops(eps, zoom) if eps is not None else None
    z_lr = np.concatenate(
        [
            pipeline.encode(image[a : a + chunk], [], lr_latent, eps=None if eps is None else eps_tiles[a : a + chunk])
            for a in range(0, len(boxes), chunk)
        ]
    )
    factors = bundle.factors
    noise = crops(rng.standard_normal(hr_shape, dtype=np.float32), factors)
    latent = pipeline.sample_latents(
        z_lr, noise, lambda: crops(rng.standard_normal(hr_shape, dtype=np.float32), factors), options.steps, chunk=chunk
    )
    return _blend(pipeline, latent, boxes, rows, cols, (tile_h, tile_w), (height, width), chunk)


def _blend(pipeline, latent, boxes, rows, cols, tile, shape, chunk) -> np.ndarray:
    """Decode the tiles' latents ``chunk`` at a time and blend them into the (f_H*H, f_W*W) SR slice."""
    f_h, f_w = pipeline.bundle.factors
    window_y = dict(zip(rows, blend_window(rows, tile[0], f_h)))
    window_x = dict(zip(cols, blend_window(cols, tile[1], f_w)))
    out = np.zeros((f_h * shape[0], f_w * shape[1]), dtype=np.float32)
    for a in range(0, len(boxes), chunk):
        decoded = pipeline.decode(latent[a : a + chunk]).mean(axis=1)
        for (y, x), sr in zip(boxes[a : a + chunk], decoded):
            weight = np.outer(window_y[y], window_x[x]).astype(np.float32)
            out[f_h * y : f_h * (y + tile[0]), f_w * x : f_w * (x + tile[1])] += sr * weight
    total_y = np.zeros(out.shape[0])
    total_x = np.zeros(out.shape[1])
    for y in rows:
        total_y[f_h * y : f_h * (y + tile[0])] += window_y[y]
    for x in cols:
        total_x[f_w * x : f_w * (x + tile[1])] += window_x[x]
    out /= total_y[:, None].astype(np.float32)
    out /= total_x[None, :].astype(np.float32)
    return out
