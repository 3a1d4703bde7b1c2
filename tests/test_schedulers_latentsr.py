"""The paper's own sampler and its flow-matching ablation against direct transcriptions of its code.

Transcribed from github.com/sebasmos/latent-sr, medvae_diffusion_pipeline/scripts/03_train_diffusion.py
(`_cosine_schedule`, `_diffusion_step`, `sample`) and 03_train_flow_matching.py (`_flow_step`, `sample`), in
float64 where the paper computes in float32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsr.engine.schedulers import SchedulerConfig, add_noise, alphas_cumprod, make_scheduler, training_target

torch = pytest.importorskip("torch")

SHAPE = (2, 3, 4, 4)

#: the paper's system: x0 prediction, uncapped cosine table stored reversed, 0.5 N(0, I) start
PAPER = SchedulerConfig(
    algorithm="latentsr",
    beta_schedule="cosine",
    prediction_type="sample",
    reversed_table=True,
    init_noise_sigma=0.5,
    default_steps=1000,
)
PAPER_FLOW = SchedulerConfig(
    algorithm="flow_euler", prediction_type="flow", flow_convention="latentsr", default_steps=16
)


def paper_cosine_schedule(T: int, s: float = 0.008, dtype=torch.float64) -> torch.Tensor:
    """LatentDiffusionSR._cosine_schedule (the paper builds it in float32)."""
    x = torch.linspace(0, T + 1, T + 1, dtype=dtype)
    a = torch.cos(((x / (T + 1)) + s) / (1 + s) * torch.pi * 0.5) ** 2
    return torch.flip((a / a[0])[1:], (0,))


def fake_x0_model(z: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the paper's x0 UNet."""
    return 0.7 * torch.tanh(z) * math.cos(t / 130.0) + 0.1 * math.sin(t / 40.0)


def paper_sample(z: torch.Tensor, alphas: torch.Tensor, T: int) -> tuple[torch.Tensor, list[int]]:
    """LatentDiffusionSR.sample after its 0.5 * randn start, with the timesteps the model received."""
    seen = []
    for i in range(T - 1):
        seen.append(i)
        x0 = fake_x0_model(z, i)
        eps = (z - alphas[i].sqrt() * x0) / ((1 - alphas[i]).sqrt() + 1e-4)
        z = (
            z
            + (alphas[i + 1].sqrt() - alphas[i].sqrt()) * x0
            + ((1 - alphas[i + 1]).sqrt() - (1 - alphas[i]).sqrt()) * eps
        )
    seen.append(T - 1)
    return fake_x0_model(z, T - 1), seen


def run_ours(config: SchedulerConfig, z: np.ndarray, steps: int, model) -> tuple[np.ndarray, np.ndarray]:
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        z = scheduler.step(model(torch.from_numpy(z), t).numpy(), t, z).prev_sample
    return z, scheduler.timesteps


def test_table_is_the_papers_reversed_cosine():
    ours = alphas_cumprod(PAPER)[::-1]
    np.testing.assert_allclose(ours, paper_cosine_schedule(1000).numpy(), rtol=1e-12, atol=1e-30)
    # the paper's float32 table agrees to float32 rounding
    np.testing.assert_allclose(ours, paper_cosine_schedule(1000, dtype=torch.float32).numpy(), rtol=0, atol=2e-6)
    assert ours[0] < 1e-30 and ours[-1] > 0.9999  # index 0 is the noisiest
    assert abs(ours[99] - 0.024) < 5e-4  # docs/sources.md, "The method": T = 100 ends at alpha_bar 0.024


@pytest.mark.parametrize("steps", [1, 2, 50, 1000])
def test_sampler_matches_the_papers_loop(steps):
    z = 0.5 * np.random.default_rng(steps).standard_normal(SHAPE)  # the paper's 0.5 * randn start
    theirs, seen = paper_sample(torch.from_numpy(z), paper_cosine_schedule(1000), steps)
    ours, timesteps = run_ours(PAPER, z, steps, fake_x0_model)
    np.testing.assert_array_equal(timesteps, seen)  # the model receives i = 0..n-1 (0 = noisiest)
    assert timesteps.dtype == np.int64
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)


def test_sampler_feeds_diffusers_order_timesteps_without_reversed_table():
    """The same loop for a model trained with diffusers' timesteps (T - 1 = noisiest) gives the same result."""
    z = 0.5 * np.random.default_rng(0).standard_normal(SHAPE)
    forward = SchedulerConfig(algorithm="latentsr", beta_schedule="cosine", prediction_type="sample")
    ours_rev, t_rev = run_ours(PAPER, z, 20, fake_x0_model)
    ours_fwd, t_fwd = run_ours(forward, z, 20, lambda z, t: fake_x0_model(z, 999 - int(t)))
    np.testing.assert_array_equal(t_fwd, 999 - t_rev)
    np.testing.assert_allclose(ours_fwd, ours_rev, rtol=1e-14)


def test_float32_in_float32_out():
    scheduler = make_scheduler(PAPER)
    scheduler.set_timesteps(3)
    z = np.ones(SHAPE, np.float32)
    for t in scheduler.timesteps:
        z = scheduler.step(np.full(SHAPE, 0.25, np.float32), t, z).prev_sample
        assert z.dtype == np.float32
    np.testing.assert_array_equal(z, 0.25)  # the last step returns the model's x0


def test_training_pair_matches_the_papers_diffusion_step():
    """add_noise / training_target at paper timesteps t = the forward diffusion of _diffusion_step."""
    rng = np.random.default_rng(1)
    hr, noise = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    t = np.array([0, 731])
    a = paper_cosine_schedule(1000).numpy()[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(add_noise(hr, noise, t, PAPER), np.sqrt(a) * hr + np.sqrt(1 - a) * noise, rtol=1e-12)
    np.testing.assert_array_equal(training_target(hr, noise, t, PAPER), hr)  # x0 prediction


# ---------------------------------------------------------------- flow-matching ablation


def fake_velocity_model(z: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the ablation's velocity UNet."""
    return 0.5 * torch.sin(z) - 0.3 * z * math.cos(t / 200.0)


def paper_flow_sample(z: torch.Tensor, steps: int, T: int = 1000) -> tuple[torch.Tensor, list[int]]:
    """LatentFlowMatchingSR.sample after its randn start, with the timesteps the model received."""
    seen = []
    dt = 1.0 / steps
    for i in range(steps):
        t_frac = i / steps
        t_int = int(t_frac * (T - 1))
        seen.append(t_int)
        z = z + fake_velocity_model(z, t_int) * dt
    return z, seen


@pytest.mark.parametrize("steps", [16, 7])
def test_flow_ablation_matches_the_papers_euler_loop(steps):
    z = np.random.default_rng(steps).standard_normal(SHAPE)
    theirs, seen = paper_flow_sample(torch.from_numpy(z), steps)
    ours, timesteps = run_ours(PAPER_FLOW, z, steps, fake_velocity_model)
    np.testing.assert_array_equal(timesteps, seen)
    assert timesteps.dtype == np.int64
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-12)


def test_flow_ablation_training_pair_matches_the_papers_flow_step():
    """z_t = (1 - t) noise + t z_HR and v = z_HR - noise, t the data fraction (_flow_step)."""
    rng = np.random.default_rng(2)
    hr, noise = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    t = np.array([0.1, 0.85])
    tv = t.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(add_noise(hr, noise, t, PAPER_FLOW), (1 - tv) * noise + tv * hr, rtol=1e-12)
    np.testing.assert_allclose(training_target(hr, noise, t, PAPER_FLOW), hr - noise, rtol=1e-12)


def test_diffusers_flow_training_pair_is_the_opposite_convention():
    """diffusers' flow: x = (1 - sigma) x0 + sigma eps with sigma = t / T, target eps - x0."""
    config = SchedulerConfig(algorithm="flow_euler", prediction_type="flow")
    rng = np.random.default_rng(3)
    x0, eps = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    np.testing.assert_allclose(add_noise(x0, eps, 250.0, config), 0.75 * x0 + 0.25 * eps, rtol=1e-12)
    np.testing.assert_allclose(training_target(x0, eps, 250.0, config), eps - x0, rtol=1e-12)
