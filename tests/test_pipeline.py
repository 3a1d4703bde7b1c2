"""The engine's loop: wiring, latent scaling, seeding, batching and the NaN guard, on fake and real sessions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from manifests import fake_bundle as typed_bundle

from medsr.bundle import Bundle, load_bundle
from medsr.bundle.manifest import Denoiser, Task, Vae
from medsr.degrade import consistency_residual, make_degradation
from medsr.degrade.operators import WINDOWS
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions, pad_to_multiple
from medsr.engine.schedulers import SchedulerConfig
from medsr.engine.sessions import open_ort_sessions
from medsr.errors import InputError, NonFiniteError, ShapeError

F, S = 2, 4  # fake VAE factor and SR scale


class FakeSession:
    def __init__(self, function, outputs):
        self.function, self.output_names, self.providers = function, outputs, ("fake",)

    def run(self, feeds):
        return dict(zip(self.output_names, self.function(**feeds)))


def _pool(x, f):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).mean(axis=(3, 5))


def _repeat(x, f):
    return np.repeat(np.repeat(x, f, axis=2), f, axis=3)


def fake_sessions(denoise=None):
    """Encoder = f x f average, decoder = f x f repeat, denoiser = x0 estimate = LR latent repeated s times."""
    return {
        "vae_encoder": FakeSession(lambda image: (_pool(image, F), np.zeros_like(_pool(image, F))), ("latent_mean", "latent_logvar")),
        "vae_decoder": FakeSession(lambda latent: (_repeat(latent, F),), ("image",)),
        "denoiser": FakeSession(denoise or (lambda sample, lr_latent, timestep: (_repeat(lr_latent, S),)), ("model_output",)),
    }


def fake_bundle(degradation=None, **scheduler) -> Bundle:
    """x4, f = 2, 2 image and latent channels, scaled and shifted latents, an x0 DDIM of 3 default steps."""
    return typed_bundle(
        Task(scale=S, image_channels=2, lr_multiple=F, degradation=degradation),
        Vae(downsample_factor=F, latent_channels=2, scaling_factor=0.18215, shift_factor=0.1),
        Denoiser("sample"),
        SchedulerConfig(algorithm="ddim", prediction_type="sample", default_steps=3, **scheduler),
    )


def test_loop_wiring_and_latent_scaling_with_fake_graphs():
    """With an x0 denoiser, DDIM (alpha_bar_prev = 1 at the end) returns the last x0 exactly, so SR must equal
    decode(repeat_s(encode(lr))) whatever the latent scale/shift, and the padding must be cropped away."""
    lr = np.random.default_rng(0).uniform(-1, 1, (3, 7, 5)).astype(np.float32)
    result = LatentSRPipeline(fake_bundle(), fake_sessions()).super_resolve(lr, SamplingOptions(batch_size=2))
    padded = pad_to_multiple(lr, F)[:, None]
    expected = _repeat(_repeat(_pool(padded, F), S), F)[:, 0, : 7 * S, : 5 * S]
    assert result.images.shape == (3, 28, 20)
    np.testing.assert_allclose(result.images, expected, rtol=1e-5, atol=1e-6)
    assert result.residuals.shape == (3,)


def test_nonfinite_denoiser_output_names_the_stage():
    def broken(sample, lr_latent, timestep):
        return (np.full(sample.shape, np.nan, np.float32),)

    pipeline = LatentSRPipeline(fake_bundle(), fake_sessions(broken))
    with pytest.raises(NonFiniteError, match="denoiser step 0"):
        pipeline.super_resolve(np.zeros((1, 4, 4), np.float32))


def test_bad_shapes_are_refused():
    pipeline = LatentSRPipeline(fake_bundle(), fake_sessions())
    with pytest.raises(ShapeError, match=r"\(N, H, W\)"):
        pipeline.super_resolve(np.zeros((4, 4), np.float32))
    with pytest.raises(ShapeError, match="batch size"):
        pipeline.super_resolve(np.zeros((1, 4, 4), np.float32), SamplingOptions(batch_size=0))


@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 8, 8), (1, 1, 3)])
def test_pad_to_multiple_keeps_content(shape):
    images = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    padded = pad_to_multiple(images, 4)
    assert padded.shape[-2] % 4 == 0 and padded.shape[-1] % 4 == 0
    np.testing.assert_array_equal(padded[:, : shape[1], : shape[2]], images)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    return bundle, open_ort_sessions(bundle)


@pytest.mark.parametrize("algorithm", ["ddim", "ddpm"])  # deterministic and stochastic per-step noise
def test_results_do_not_depend_on_batching(tiny_pipeline, algorithm):
    bundle, sessions = tiny_pipeline
    config = dataclasses.replace(bundle.manifest.scheduler, algorithm=algorithm)
    pipeline = LatentSRPipeline(bundle, sessions, config)
    lr = np.random.default_rng(1).uniform(-1, 1, (3, 12, 16)).astype(np.float32)
    one = pipeline.super_resolve(lr, SamplingOptions(steps=3, seed=5, batch_size=1)).images
    three = pipeline.super_resolve(lr, SamplingOptions(steps=3, seed=5, batch_size=3)).images
    np.testing.assert_allclose(one, three, atol=1e-4)
    other_seed = pipeline.super_resolve(lr, SamplingOptions(steps=3, seed=6, batch_size=3)).images
    assert np.abs(other_seed - three).max() > 1e-3


def test_kspace_consistency_makes_sr_agree_with_lr(tiny_pipeline):
    bundle, sessions = tiny_pipeline
    pipeline = LatentSRPipeline(bundle, sessions)
    lr = np.random.default_rng(2).uniform(-1, 1, (2, 8, 12)).astype(np.float32)
    free = pipeline.super_resolve(lr, SamplingOptions(steps=2, consistency="none"))
    kept = pipeline.super_resolve(lr, SamplingOptions(steps=2, consistency="kspace"))
    assert free.residuals.min() > 1e-2
    assert kept.residuals.max() < 1e-5


def test_networks_see_clipped_lr_but_consistency_uses_the_measured_values():
    seen = []

    def encoder(image):
        seen.append(image.max())
        return _pool(image, F), np.zeros_like(_pool(image, F))

    sessions = fake_sessions()
    sessions["vae_encoder"] = FakeSession(encoder, ("latent_mean", "latent_logvar"))
    lr = np.random.default_rng(3).uniform(-1.5, 1.5, (2, 8, 8)).astype(np.float32)  # beyond the window
    result = LatentSRPipeline(fake_bundle(), sessions).super_resolve(lr, SamplingOptions(consistency="kspace"))
    assert max(seen) <= 1.0
    assert result.residuals.max() < 1e-5  # agreement with the unclipped LR


@pytest.mark.parametrize(("window", "alpha"), [(window, None) for window in WINDOWS] + [("tukey", 0.25)])
def test_kspace_consistency_uses_the_bundles_window(window, alpha):
    """The consistency step projects through the bundle's own k-space operator, window included: the residual
    under that operator is float32 rounding (it was 0.36 with a Hann window when the step ignored the window)."""
    degradation = make_degradation("kspace", S, window=window, alpha=alpha)
    hr = np.random.default_rng(4).uniform(-1, 1, (2, 8 * S, 12 * S))
    lr = degradation.forward(hr).astype(np.float32)  # a measurement the operator can make
    pipeline = LatentSRPipeline(fake_bundle(degradation), fake_sessions())
    free = pipeline.super_resolve(lr, SamplingOptions(consistency="none")).residuals
    kept = pipeline.super_resolve(lr, SamplingOptions(consistency="kspace")).residuals
    assert free.min() > 1e-2 and kept.max() < 1e-5
    # in float64 the step is exact: A(result) = LR to 1e-12
    sr = np.random.default_rng(5).uniform(-1, 1, hr.shape)
    exact = pipeline.enforce_consistency(sr, degradation.forward(hr), "kspace")
    assert consistency_residual(exact, degradation.forward(hr), degradation).max() <= 1e-12


def test_kspace_consistency_is_refused_for_another_degradation():
    pipeline = LatentSRPipeline(fake_bundle(make_degradation("bicubic", S)), fake_sessions())
    lr = np.zeros((1, 4, 4), np.float32)
    with pytest.raises(InputError, match="consistency 'kspace' needs the 'kspace' degradation.*'bicubic'"):
        pipeline.super_resolve(lr, SamplingOptions(consistency="kspace"))
    back = pipeline.super_resolve(lr + 0.5, SamplingOptions(consistency="backproject")).residuals
    assert back.max() < 1e-3
