"""Training a through-plane model for several factors at once (``Preset.scales``): one latent-cache entry per
factor, of thick slices at that factor's FWHM, aligned windows cut per sample, and the recipe registry that
``medsr-train recipe`` offers without importing torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file
from test_train import one_thread, smooth_slices  # noqa: F401 (one_thread: an autouse fixture)

from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.cli.train import RECIPE_NAMES
from medsr.data.pairs import Slice
from medsr.errors import InputError
from medsr.export.models import build_vae
from medsr.export.presets import get_preset
from medsr.export.train import denoiser as denoiser_module
from medsr.export.train.denoiser import DenoiserConfig, crop_batch, train_denoiser
from medsr.export.train.loop import LoopConfig
from medsr.export.train.recipe import RECIPES
from medsr.export.train.weights import save_prefixed

MULTI = dataclasses.replace(
    get_preset("tiny-through-plane"),
    scales=(2, 3, 4),
    conditioning=Conditioning(UPSAMPLED, "bspline", residual=True),
    scheduler={**get_preset("tiny-through-plane").scheduler, "prediction_type": "sample"},
)


@pytest.fixture(scope="module")
def slices() -> list[Slice]:
    """Eight smooth 72 x 72 images (72: room for the 24-pixel multiple of factor 3)."""
    return smooth_slices(72)


def test_recipe_names_known_to_the_cli_are_the_registry():
    assert set(RECIPE_NAMES) == set(RECIPES)


def test_the_through_plane_recipe_trains_the_preset_for_factors_2_to_6():
    preset = get_preset(RECIPES["through-plane"].preset)
    assert preset.trained_scales == (2, 3, 4, 5, 6)
    assert preset.degradation_at(6) == {"name": "thick_slices", "scale": 6, "profile": "gaussian", "fwhm": 6.0}
    assert preset.degradation_at(preset.scale) == preset.degradation


def test_scales_need_a_through_plane_preset_that_includes_its_scale():
    with pytest.raises(ValueError, match="scales"):
        dataclasses.replace(get_preset("tiny"), scales=(2, 4))
    with pytest.raises(ValueError, match="scales"):
        dataclasses.replace(get_preset("tiny-through-plane"), scales=(2, 3))


def test_multi_factor_cache_has_one_entry_per_factor_blurred_by_its_own_slices(tmp_path, slices):
    torch.manual_seed(0)
    vae_file = tmp_path / "vae.safetensors"
    save_prefixed(vae_file, {"vae.": build_vae(MULTI.vae).state_dict()})
    loop = LoopConfig(steps=4, batch_size=4, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=4)
    objective = DenoiserConfig(pairs=96, crop=32, loss="l2", terminal_fraction=0.5)
    train_denoiser(tmp_path / "run", MULTI, vae_file, slices, loop, objective, torch.device("cpu"), progress=False)
    cache = load_file(str(tmp_path / "run" / denoiser_module.LATENT_CACHE))
    assert set(cache) == {f"{kind}_x{s}" for kind in ("hr", "lr") for s in (2, 3, 4)}
    multiple = MULTI.lr_multiple  # tiny: f=4 VAE, 2 UNet levels: 8
    for s in (2, 3, 4):
        side = int(np.lcm(multiple, s)) * -(-32 // int(np.lcm(multiple, s)))
        latent_side = side // MULTI.vae_factor
        assert cache[f"hr_x{s}"].shape == cache[f"lr_x{s}"].shape == (32, 4, latent_side, latent_side)
    # Thicker slices at larger factors: the conditioning latents keep less of the HR latents' detail.
    errors = [float((cache[f"lr_x{s}"] - cache[f"hr_x{s}"]).abs().mean()) for s in (2, 3, 4)]
    assert errors[0] < errors[1] < errors[2]


def test_crop_batch_cuts_the_same_window_of_both_latents_and_is_seeded():
    rng = np.random.default_rng(1)
    hr = [rng.standard_normal((5, 2, side, side)).astype(np.float32) for side in (16, 24)]
    lr = [h + 1.0 for h in hr]
    x0, z_lr = crop_batch(hr, lr, 8, 64, np.random.default_rng(7))
    assert x0.shape == z_lr.shape == (64, 2, 8, 8)
    np.testing.assert_array_equal(z_lr, x0 + 1.0)
    again = crop_batch(hr, lr, 8, 64, np.random.default_rng(7))
    np.testing.assert_array_equal(again[0], x0)
    drawn = np.random.default_rng(7).integers(0, 2, size=64)  # crop_batch's first draw: each sample's factor
    for sample, k in zip(x0, drawn):
        h = hr[k]
        assert any(
            np.array_equal(h[n, :, i : i + 8, j : j + 8], sample)
            for n in range(len(h))
            for i in range(h.shape[2] - 7)
            for j in range(h.shape[3] - 7)
        )
    assert set(drawn) == {0, 1}


def test_several_factors_need_conditioning_on_the_hr_grid(tmp_path, slices):
    preset = dataclasses.replace(get_preset("tiny-through-plane"), scales=(2, 4))
    torch.manual_seed(0)
    vae_file = tmp_path / "vae.safetensors"
    save_prefixed(vae_file, {"vae.": build_vae(preset.vae).state_dict()})
    loop = LoopConfig(steps=2, batch_size=2, checkpoint_every=2)
    with pytest.raises(InputError, match="upsampled_latent_concat"):
        train_denoiser(tmp_path, preset, vae_file, slices, loop, DenoiserConfig(pairs=4, crop=32), torch.device("cpu"))
