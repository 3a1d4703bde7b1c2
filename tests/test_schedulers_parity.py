"""Whole trajectories of the NumPy samplers against diffusers' schedulers, fed the same model and the same noise.

diffusers builds its tables in float32, which alone moves alpha_bar by up to 1.3e-5 relative (measured, cosine
schedule); so its step logic runs here on the float64 table that its own construction gives in float64
(`diffusers_table_float64`, a three-line transcription), on float64 samples. The tables themselves are compared
with diffusers' float32 ones in test_schedulers.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from medsr.engine.schedulers import SchedulerConfig, make_scheduler

SHAPE = (2, 3, 5, 4)
RTOL = 1e-6


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the denoiser: smooth in x, different at every t (float64)."""
    return 0.6 * x * math.cos(float(t) / 170.0) + 0.4 * np.sin(1.3 * x + float(t) / 90.0)


def diffusers_table_float64(config: SchedulerConfig) -> torch.Tensor:
    """alpha_bar as diffusers' __init__ builds it, in float64 instead of float32."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
    else:  # squaredcos_cap_v2: diffusers' betas_for_alpha_bar without the final float32 cast
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def run_pair(config: SchedulerConfig, theirs, steps: int, seed: int = 0, noise_kw=None) -> float:
    """Run both samplers over a whole trajectory; return the largest relative error of x_prev and x0 over it.

    ``noise_kw(noise_tensor)`` gives the keyword arguments that pass the same noise to diffusers' step.
    """
    ours = make_scheduler(config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * config.init_noise_sigma
    y = torch.from_numpy(x.copy())
    worst = 0.0
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        noise = rng.standard_normal(SHAPE) if ours.stochastic else None
        kw = noise_kw(torch.from_numpy(noise)) if noise_kw and noise is not None else {}
        a = ours.step(fake_model(x, t_ours), t_ours, x, noise)
        b = theirs.step(torch.from_numpy(fake_model(y.numpy(), t_theirs)), t_theirs, y, **kw)
        worst = max(worst, rel_err(a.prev_sample, b.prev_sample.numpy()))
        if b.pred_original_sample is not None:
            worst = max(worst, rel_err(a.pred_original_sample, b.pred_original_sample.numpy()))
        x, y = a.prev_sample, b.prev_sample
    assert np.all(np.isfinite(x))
    return worst


# ---------------------------------------------------------------- DDIM


def diffusers_ddim(config: SchedulerConfig):
    s = diffusers.DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        clip_sample=config.clip_sample,
        set_alpha_to_one=config.set_alpha_to_one,
        steps_offset=config.steps_offset,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        clip_sample_range=config.clip_sample_range,
    )
    s.alphas_cumprod = diffusers_table_float64(config)
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if config.set_alpha_to_one else s.alphas_cumprod[0]
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_matches_diffusers(prediction_type, spacing, eta):
    config = SchedulerConfig(algorithm="ddim", prediction_type=prediction_type, timestep_spacing=spacing, eta=eta)
    theirs = diffusers_ddim(config)
    err = run_pair(config, theirs, 10, noise_kw=lambda n: {"eta": eta, "variance_noise": n})
    assert err <= RTOL, err


@pytest.mark.parametrize(
    "overrides",
    [
        # Stable Diffusion's schedule: scaled_linear, steps_offset 1, no final alpha of one
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
            "set_alpha_to_one": False,
        },
        # cosine (capped) betas, clipping of x0 to [-0.5, 0.5], a step count that does not divide T
        {
            "beta_schedule": "squaredcos_cap_v2",
            "clip_sample": True,
            "clip_sample_range": 0.5,
            "prediction_type": "sample",
        },
        # trailing spacing with a step count that does not divide T, v prediction (zero-SNR style sampling)
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "num_train_timesteps": 500},
    ],
)
def test_ddim_matches_diffusers_other_configs(overrides):
    config = SchedulerConfig(algorithm="ddim", **overrides)
    err = run_pair(config, diffusers_ddim(config), 7)
    assert err <= RTOL, err


def test_ddim_float32_in_float32_out_close_to_diffusers_float32():
    """float32 in gives float32 out, within float32 table rounding of diffusers' own float32 run."""
    config = SchedulerConfig(algorithm="ddim", timestep_spacing="trailing")
    ours, theirs = make_scheduler(config), diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    y = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        x = ours.step(fake_model(x, t).astype(np.float32), t, x).prev_sample
        y = theirs.step(torch.from_numpy(fake_model(y.numpy(), t).astype(np.float32)), int(t), y).prev_sample
        assert x.dtype == np.float32
    assert rel_err(x, y.numpy()) < 1e-4
