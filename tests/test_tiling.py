"""Overlapping tiles: geometry, the blend window, exactness with one tile, tiled vs whole on images that fit both ways.

Two models: the tiny random-init bundle (its GroupNorm layers use each tile's own statistics, so tiles differ from the
whole image everywhere, a little) and a local NumPy model behind the same Session interface (area encoder, box-blur
denoiser and decoder with zero padding), where tiled and whole must agree up to the tiles' border effects, which the
blend window suppresses. Any misplaced crop, latent offset or noise crop would show as a large difference.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from io_fixtures import pydicom_file

from medsr.bundle import load_bundle
from medsr.engine import tiling
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_sessions
from medsr.errors import ShapeError
from medsr.io.dicom import load_dicom
from medsr.io.normalize import fit_window, normalize


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(232, 128, 32), (96, 32, 16), (100, 100, 20), (4096, 128, 32), (132, 128, 0)],
)
def test_tiles_cover_the_image_with_at_least_the_overlap(length, tile, overlap):
    origins = tiling.tile_origins(length, tile, overlap)
    assert origins[0] == 0 and origins[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(origins))


@pytest.mark.parametrize(("length", "tile", "overlap"), [(232, 128, 32), (96, 32, 16), (400, 64, 48)])
def test_blend_weights_sum_to_one_and_vanish_at_inner_tile_edges(length, tile, overlap):
    origins = tiling.tile_origins(length, tile, overlap)
    windows = tiling.blend_window(origins, tile, 4)
    total = np.zeros(4 * length)
    for origin, window in zip(origins, windows):
        total[4 * origin : 4 * (origin + tile)] += window
        assert window.min() > 0
    if origins[-1] - origins[-2] >= tile / 2:  # no three-way overlaps: an exact partition of unity
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert total.min() > 0.5
    assert windows[0][0] == 1.0 and windows[-1][-1] == 1.0 and windows[1][0] < 1e-3


@pytest.mark.parametrize(("size", "overlap", "message"), [(30, 8, "multiple of 4"), (32, 32, r"\[0, 32\)")])
def test_bad_tile_options_name_the_option(size, overlap, message):
    with pytest.raises(ShapeError, match=message):
        tiling.check_tile_options(size, overlap, 4)


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return bundle, open_sessions(bundle, "ort", threads=1)


@pytest.fixture(scope="module")
def mr_slice() -> np.ndarray:
    """A 96x96 crop of the real shoulder MR (pydicom-data MR2_UNCR), normalized to [-1, 1]: (1, 96, 96)."""
    image = load_dicom(pydicom_file("MR2_UNCR.dcm")).data[400:496, 300:396, 0].T
    return normalize(image[None], fit_window(image))[0]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])  # deterministic, and stochastic with per-step noise
def test_one_tile_is_exactly_the_whole_slice(tiny, mr_slice, sampler):
    bundle, sessions = tiny
    config = dataclasses.replace(bundle.manifest.scheduler, algorithm=sampler)
    pipeline = LatentSRPipeline(bundle, sessions, config)
    options = SamplingOptions(steps=2, seed=3, lr_latent="sample", tile_size=None)
    lr = mr_slice[:, :40, :36]
    whole = pipeline.super_resolve(lr, options, first_index=7).images[0]
    rng = options.generators([7])[0]  # the slice's own generator, as the pipeline makes it
    np.testing.assert_array_equal(tiling.super_resolve_tiled(pipeline, lr[0], rng, options, 40, 8), whole)


def _box_windows(origins, tile, scale):
    """Hard stitching: each tile owns the pixels up to the middle of its overlaps (no blending)."""
    windows = []
    for i, origin in enumerate(origins):
        window = np.zeros(tile * scale)
        low = 0 if i == 0 else ((origins[i - 1] + tile + origin) // 2 - origin) * scale
        high = tile * scale if i == len(origins) - 1 else ((origin + tile + origins[i + 1]) // 2 - origin) * scale
        window[low:high] = 1.0
        windows.append(window)
    return windows


def _roughness_at(difference: np.ndarray, columns: list[int]) -> float:
    """Mean |horizontal step| of ``difference`` across ``columns`` over its mean everywhere (1: no seam there)."""
    steps = np.abs(np.diff(difference, axis=1)).mean(axis=0)
    return float(steps[[c - 1 for c in columns]].mean() / steps.mean())


@pytest.mark.parametrize(("size", "overlap"), [(64, 32), (32, 16)])
def test_tiled_random_model_has_no_seams(tiny, mr_slice, size, overlap, monkeypatch):
    """GroupNorm statistics differ per tile, so tiled != whole; blending keeps the difference smooth across the cut
    lines of hard stitching, where stitching leaves a step."""
    bundle, sessions = tiny
    pipeline = LatentSRPipeline(bundle, sessions)
    options = SamplingOptions(steps=4, tile_size=None)
    whole = pipeline.super_resolve(mr_slice, options).images[0]
    tiled_options = dataclasses.replace(options, tile_size=size, tile_overlap=overlap)
    blended = pipeline.super_resolve(mr_slice, tiled_options).images[0]
    monkeypatch.setattr(tiling, "blend_window", _box_windows)
    stitched = pipeline.super_resolve(mr_slice, tiled_options).images[0]
    origins = tiling.tile_origins(96, size, overlap)
    cuts = [4 * ((a + size + b) // 2) for a, b in itertools.pairwise(origins)]
    assert np.abs(blended - whole).mean() < 0.03 * np.ptp(whole)
    assert _roughness_at(blended - whole, cuts) < 1.0 < _roughness_at(stitched - whole, cuts)


class _LocalSession:
    """A NumPy stand-in for one graph: area encoder, box-blurred x0 denoiser, nearest-neighbour + blur decoder."""

    input_names: tuple = ()
    output_names: tuple = ()
    providers = ("numpy",)

    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def blur(x: np.ndarray) -> np.ndarray:
        padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
        return sum(padded[..., i : i + x.shape[2], j : j + x.shape[3]] for i in range(3) for j in range(3)) / 9

    def run(self, feeds):
        if self.name == "vae_encoder":
            image = feeds["image"]
            b, _, h, w = image.shape
            mean = image.reshape(b, 1, h // 4, 4, w // 4, 4).mean(axis=(3, 5)).repeat(4, axis=1)
            return {"latent_mean": mean, "latent_logvar": np.zeros_like(mean)}
        if self.name == "denoiser":
            cond = feeds["lr_latent"].repeat(4, axis=2).repeat(4, axis=3)
            return {"model_output": self.blur(cond + 0.05 * feeds["sample"]).astype(np.float32)}
        image = feeds["latent"].mean(axis=1, keepdims=True).repeat(4, axis=2).repeat(4, axis=3)
        return {"image": self.blur(image).astype(np.float32)}


@pytest.mark.parametrize(("size", "overlap"), [(32, 16), (48, 16), (64, 32)])
def test_tiled_local_model_matches_the_whole_slice(tiny, mr_slice, size, overlap):
    bundle, _ = tiny
    pipeline = LatentSRPipeline(bundle, {name: _LocalSession(name) for name in bundle.graphs})
    options = SamplingOptions(steps=3, tile_size=None)
    whole = pipeline.super_resolve(mr_slice, options).images[0]
    tiled = pipeline.super_resolve(mr_slice, dataclasses.replace(options, tile_size=size, tile_overlap=overlap))
    difference = np.abs(tiled.images[0] - whole)
    assert difference.max() < 2e-3 * np.ptp(whole), difference.max() / np.ptp(whole)
