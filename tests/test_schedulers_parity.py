"""Whole trajectories of the NumPy samplers against diffusers' schedulers, fed the same model and the same noise.

diffusers builds its tables in float32 (alone a 1.3e-5 relative change of alpha_bar, cosine schedule) and casts
the sample to float32 inside some steps. To compare the algorithms rather than float32 rounding, the fixture
`diffusers_in_float64` makes each diffusers scheduler module see float64 wherever it names float32, so that
diffusers' own code builds its tables and runs its steps in float64. The float32 tables themselves are compared
with ours in test_schedulers.py.
"""

from __future__ import annotations

import math
import types
from fractions import Fraction

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_flow_match_euler_discrete,
)

from medsr.engine.schedulers import SchedulerConfig, make_scheduler
from medsr.errors import InputError

# diffusers' DPM-Solver calls np.array on a tensor the NumPy 2 way it warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 3, 5, 4)
RTOL = 1e-6


@pytest.fixture(autouse=True)
def diffusers_in_float64(monkeypatch):
    """Within diffusers' scheduler modules, torch.float32 and np.float32 mean float64."""
    for module in (
        scheduling_ddim,
        scheduling_ddpm,
        scheduling_dpmsolver_multistep,
        scheduling_flow_match_euler_discrete,
    ):
        for name, lib, wide in (("torch", torch, torch.float64), ("np", np, np.float64)):
            proxy = types.SimpleNamespace(**{k: getattr(lib, k) for k in dir(lib) if not k.startswith("__")})
            proxy.float32 = wide
            monkeypatch.setattr(module, name, proxy)


def fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the denoiser: smooth in x, different at every t (float64)."""
    return 0.6 * x * math.cos(float(t) / 170.0) + 0.4 * np.sin(1.3 * x + float(t) / 90.0)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def run_pair(config, theirs, steps, seed=0, noise_kw=None, their_x0=None) -> float:
    """Run both samplers over a whole trajectory; return the largest relative error of x_prev and x0 over it.

    ``noise_kw(noise)`` gives the keyword arguments that pass the same noise to diffusers' step;
    ``their_x0(theirs, output)`` gives diffusers' x0 where its step output lacks one.
    """
    ours = make_scheduler(config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-12)
    assert ours.timesteps.dtype == (np.float64 if theirs.timesteps.is_floating_point() else np.int64)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * config.init_noise_sigma
    y = torch.from_numpy(x.copy())
    worst = 0.0
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        noise = rng.standard_normal(SHAPE) if ours.stochastic else None
        kw = noise_kw(torch.from_numpy(noise)) if noise is not None else {}
        a = ours.step(fake_model(x, t_ours), t_ours, x, noise)
        b = theirs.step(torch.from_numpy(fake_model(y.numpy(), t_theirs)), t_theirs, y, **kw)
        assert b.prev_sample.dtype == torch.float64
        worst = max(worst, rel_err(a.prev_sample, b.prev_sample.numpy()))
        x0 = their_x0(theirs, b) if their_x0 else getattr(b, "pred_original_sample", None)
        if x0 is not None:
            worst = max(worst, rel_err(a.pred_original_sample, x0.numpy()))
        x, y = a.prev_sample, b.prev_sample
    assert np.all(np.isfinite(x)) and not np.allclose(x, 0)
    return worst


def vp_kwargs(config: SchedulerConfig) -> dict:
    """The diffusers arguments every variance-preserving scheduler shares with our config."""
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
        "timestep_spacing": config.timestep_spacing,
        "steps_offset": config.steps_offset,
    }


# ---------------------------------------------------------------- timesteps of every step count


def exact_timesteps(config: SchedulerConfig, n: int, solver_grid: bool) -> tuple[list[int], list[bool]]:
    """diffusers' spacing formulas in exact rationals (Python's round: half to even), noisiest first, n of them,
    and which of them were a tie (x.5) before rounding."""
    T, grid = config.num_train_timesteps, n + solver_grid
    if config.timestep_spacing == "trailing":
        values, shift = [Fraction(T * (n - k), n) for k in range(n)], -1
    elif config.timestep_spacing == "leading":
        values, shift = [Fraction(j * (T // grid)) for j in range(grid)][::-1][:n], 0
    else:
        values, shift = [Fraction((T - 1) * j, max(grid - 1, 1)) for j in range(grid)][::-1][:n], 0
    return [round(x) + shift for x in values], [x.denominator == 2 for x in values]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("algorithm", ["ddim", "ddpm", "dpmsolver++"])
def test_timesteps_match_diffusers_for_every_step_count(algorithm, spacing):
    """For every n in 1..T: ours are diffusers' formula in exact arithmetic, and equal diffusers' own timesteps
    wherever diffusers is right.

    diffusers is wrong, and excluded, where it does not return n distinct timesteps: trailing spacing gives n + 1
    ending at -1 for 62 of the n (np.arange(T, 0, -T / n) in floating point: n = 61, 103, 121, ...; its first n
    are compared), and DPMSolverMultistepScheduler's leading and linspace grids repeat a timestep at n = T (ours then
    use every table entry). At an exact tie (x.5) diffusers' float value lands on either side, so there ours,
    rounded half to even, may differ from it by one; everywhere else they are equal.
    """
    config = SchedulerConfig(algorithm=algorithm, timestep_spacing=spacing)
    theirs = {"ddim": diffusers_ddim, "ddpm": diffusers_ddpm, "dpmsolver++": diffusers_dpm}[algorithm](config)
    ours = make_scheduler(config)
    T, excluded = config.num_train_timesteps, []
    for n in range(1, T + 1):
        theirs.set_timesteps(n)
        ours.set_timesteps(n)
        t_theirs, t_ours = theirs.timesteps.numpy(), ours.timesteps
        if len(t_theirs) != n or len(np.unique(t_theirs)) != n:
            excluded.append(n)
            if algorithm == "dpmsolver++" and n == T:
                np.testing.assert_array_equal(t_ours, np.arange(T)[::-1])
                continue
            assert spacing == "trailing" and len(t_theirs) == n + 1 and t_theirs[-1] == -1, n
            t_theirs = t_theirs[:n]
        exact, tie = exact_timesteps(config, n, solver_grid=algorithm == "dpmsolver++")
        np.testing.assert_array_equal(t_ours, exact, err_msg=f"n = {n}")
        tie = np.array(tie)
        np.testing.assert_array_equal(t_ours[~tie], t_theirs[~tie], err_msg=f"n = {n}")
        assert np.all(np.abs(t_ours[tie] - t_theirs[tie]) <= 1), n
    assert len(excluded) <= (62 if spacing == "trailing" else int(algorithm == "dpmsolver++")), excluded


# ---------------------------------------------------------------- DDIM


def diffusers_ddim(config: SchedulerConfig):
    return diffusers.DDIMScheduler(
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
        set_alpha_to_one=config.set_alpha_to_one,
        **vp_kwargs(config),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_matches_diffusers(prediction_type, spacing, eta):
    """Where diffusers' next timestep k - T // n is the schedule's next entry (10 divides T; linspace never is, see
    test_ddim_lands_on_every_timestep_of_its_schedule)."""
    config = SchedulerConfig(algorithm="ddim", prediction_type=prediction_type, timestep_spacing=spacing, eta=eta)
    err = run_pair(config, diffusers_ddim(config), 10, noise_kw=lambda n: {"eta": eta, "variance_noise": n})
    assert err <= RTOL, err


def exact_model(x0: np.ndarray, eps: np.ndarray, config: SchedulerConfig, alphas_cumprod: np.ndarray):
    """A denoiser that knows x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps: its output at timestep t in
    ``config.prediction_type``."""

    def output(t) -> np.ndarray:
        a = alphas_cumprod[int(t)]
        if config.prediction_type == "sample":
            return x0
        if config.prediction_type == "epsilon":
            return eps
        return np.sqrt(a) * eps - np.sqrt(1 - a) * x0  # v

    return output


def ddim_chain(scheduler, config, n: int, step) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(x0, final sample, worst relative distance of each step's sample from the chain's point at the next
    timestep) of deterministic DDIM with an exact model; ``step(model_output, t, x)`` steps ``scheduler``."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    table = np.asarray(scheduler.alphas_cumprod, np.float64)
    model = exact_model(x0, eps, config, table)
    timesteps = [int(t) for t in scheduler.timesteps][:n]
    x = np.sqrt(table[timesteps[0]]) * x0 + np.sqrt(1 - table[timesteps[0]]) * eps
    misses = []
    for i, t in enumerate(timesteps):
        x = step(model(t), t, x)
        a_next = table[timesteps[i + 1]] if i + 1 < n else 1.0
        misses.append(rel_err(x, np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps))
    return x0, x, misses


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 10, 61])
def test_ddim_lands_on_every_timestep_of_its_schedule(prediction_type, spacing, n):
    """The property diffusers' DDIMScheduler breaks for trailing and linspace spacing when n does not divide T:
    with a model that predicts exactly, each deterministic step lands on the chain's point at the schedule's next
    timestep, and the last one on x0."""
    config = SchedulerConfig(algorithm="ddim", prediction_type=prediction_type, timestep_spacing=spacing)
    ours = make_scheduler(config)
    ours.set_timesteps(n)
    x0, final, misses = ddim_chain(ours, config, n, lambda out, t, x: ours.step(out, t, x).prev_sample)
    assert max(misses) <= 1e-9, misses
    assert rel_err(final, x0) <= 1e-9


def test_diffusers_ddim_misses_the_end_of_a_trailing_chain_that_ours_reaches():
    """Trailing, n = 7 (T // n = 142, the schedule's steps 143 and 142): diffusers' last step from t = 142 goes to
    alpha_bar[0], not to the end of the chain, so even an exact model ends with noise left; ours ends on x0. At
    n = 61 diffusers also lays a 62nd timestep, -1, which ours does not: the first 61 are the same."""
    config = SchedulerConfig(algorithm="ddim", prediction_type="sample", timestep_spacing="trailing")
    theirs = diffusers_ddim(config)
    theirs.set_timesteps(7)

    def their_step(out, t, x):
        return theirs.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()

    x0, final, misses = ddim_chain(theirs, config, 7, their_step)
    assert rel_err(final, x0) > 1e-3 and max(misses) > 1e-3
    ours = make_scheduler(config)
    ours.set_timesteps(7)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and theirs.timesteps[-1] == -1
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps[:61].numpy())


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
        # capped cosine betas, x0 clipped to [-0.5, 0.5]
        {
            "beta_schedule": "squaredcos_cap_v2",
            "clip_sample": True,
            "clip_sample_range": 0.5,
            "prediction_type": "sample",
        },
        # a shorter training table, trailing spacing (at 5 steps, which divide T), v prediction
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "num_train_timesteps": 500},
    ],
)
def test_ddim_matches_diffusers_other_configs(overrides):
    config = SchedulerConfig(algorithm="ddim", **overrides)
    steps = 5 if config.timestep_spacing == "trailing" else 7  # leading: 7 does not divide T
    err = run_pair(config, diffusers_ddim(config), steps)
    assert err <= RTOL, err


# ---------------------------------------------------------------- DDPM


@pytest.fixture
def ddpm_noise(monkeypatch):
    """Makes diffusers' DDPMScheduler.step draw the noise given to `noise_kw` (its step takes no noise)."""
    queue = []
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: queue.pop())

    def noise_kw(noise):
        queue.append(noise)
        return {}

    return noise_kw


def diffusers_ddpm(config: SchedulerConfig):
    return diffusers.DDPMScheduler(
        variance_type="fixed_small",
        clip_sample=config.clip_sample,
        clip_sample_range=config.clip_sample_range,
        **vp_kwargs(config),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_matches_diffusers(prediction_type, spacing, ddpm_noise):
    config = SchedulerConfig(algorithm="ddpm", prediction_type=prediction_type, timestep_spacing=spacing)
    err = run_pair(config, diffusers_ddpm(config), 10, noise_kw=ddpm_noise)
    assert err <= RTOL, err


def test_ddpm_matches_diffusers_cosine_clipped_offset(ddpm_noise):
    config = SchedulerConfig(
        algorithm="ddpm", beta_schedule="squaredcos_cap_v2", clip_sample=True, steps_offset=1, prediction_type="sample"
    )
    err = run_pair(config, diffusers_ddpm(config), 13, noise_kw=ddpm_noise)
    assert err <= RTOL, err


# ---------------------------------------------------------------- DPM-Solver++ 2M


def diffusers_dpm(config: SchedulerConfig):
    return diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        **vp_kwargs(config),
    )


def dpm_x0(theirs, out):
    """diffusers keeps the converted model output (x0) of the last step in model_outputs."""
    return theirs.model_outputs[-1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmsolver_matches_diffusers(prediction_type, spacing, steps):
    config = SchedulerConfig(algorithm="dpmsolver++", prediction_type=prediction_type, timestep_spacing=spacing)
    err = run_pair(config, diffusers_dpm(config), steps, their_x0=dpm_x0)
    assert err <= RTOL, err


def test_dpmsolver_matches_diffusers_scaled_linear_offset():
    config = SchedulerConfig(
        algorithm="dpmsolver++", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    err = run_pair(config, diffusers_dpm(config), 25, their_x0=dpm_x0)
    assert err <= RTOL, err


def test_dpmsolver_refuses_out_of_order_timesteps():
    scheduler = make_scheduler(SchedulerConfig(algorithm="dpmsolver++"))
    scheduler.set_timesteps(5)
    x = np.ones(SHAPE)
    with pytest.raises(InputError, match="multistep"):
        scheduler.step(x, scheduler.timesteps[1], x)


# ---------------------------------------------------------------- flow-matching Euler


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 16])
def test_flow_euler_matches_diffusers(shift, steps):
    config = SchedulerConfig(algorithm="flow_euler", prediction_type="flow", flow_shift=shift)
    err = run_pair(config, diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), steps)
    assert err <= RTOL, err


def test_flow_euler_refuses_a_skipped_timestep():
    scheduler = make_scheduler(SchedulerConfig(algorithm="flow_euler", prediction_type="flow"))
    scheduler.set_timesteps(4)
    x = np.ones(SHAPE)
    with pytest.raises(InputError, match="expects timestep"):
        scheduler.step(x, scheduler.timesteps[2], x)
