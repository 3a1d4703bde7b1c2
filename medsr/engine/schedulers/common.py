"""What every sampler shares: the training table, the forward process, the model-output adapter, timestep spacing.

Notation (variance preserving): x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t) and
sigma_t = sqrt(1 - alpha_bar_t). Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, i.e. alpha = 1 - sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig
from medsr.errors import InputError


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """The training table alpha_bar (float64, shape ``(T,)``), index k = 0 the least noisy.

    This is the table in diffusers' orientation even when ``config.reversed_table`` (then the model's timestep
    t reads entry ``T - 1 - t``; see `table_index`). diffusers builds the same values in float32.

    Raises:
        InputError: for ``flow_euler``, which has no such table.
    """
    T = config.num_train_timesteps
    if config.algorithm == "flow_euler":
        raise InputError("algorithm 'flow_euler' has no alpha_bar table; use add_noise / training_target")
    if config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=np.float64) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        f = _cosine_alpha_bar(np.arange(T + 1) / T)
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    else:  # "cosine": alpha_bar itself, uncapped, as the paper's code builds it (before reversing)
        f = _cosine_alpha_bar(np.arange(T + 1) / T)
        return f[1:] / f[0]
    return np.cumprod(1.0 - betas)


def _cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """f(t) = cos^2((t + s) / (1 + s) * pi / 2), Nichol & Dhariwal 2021 eq. 17."""
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def table_index(t: int | np.ndarray, config: SchedulerConfig) -> int | np.ndarray:
    """Model timestep <-> table index (its own inverse), elementwise: ``T - 1 - t`` when ``config.reversed_table``,
    else t."""
    return config.num_train_timesteps - 1 - t if config.reversed_table else t


def predict_x0_eps(
    model_output: np.ndarray, sample: np.ndarray, alpha_t: float, sigma_t: float, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """The one adapter from a model output of any prediction type to (x0, eps), for x_t = alpha_t x0 + sigma_t eps.

    - ``"epsilon"``: x0 = (x_t - sigma_t eps) / alpha_t (DDIM eq. 12, "predicted x0").
    - ``"sample"``: eps = (x_t - alpha_t x0) / sigma_t.
    - ``"v_prediction"``: v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022), so x0 = alpha_t x_t - sigma_t v and
      eps = sigma_t x_t + alpha_t v (needs alpha_t^2 + sigma_t^2 = 1).
    - ``"flow"``: v = eps - x0 on the straight path alpha_t = 1 - sigma_t, so x0 = x_t - sigma_t v and
      eps = x_t + alpha_t v.

    Args:
        model_output, sample: arrays of one shape (float64 recommended).
        alpha_t, sigma_t: the signal and noise scales at the current time.
        prediction_type: see `SchedulerConfig.prediction_type`.
    """
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output, alpha_t * model_output + sigma_t * sample
    if prediction_type == "flow":
        return sample - sigma_t * model_output, sample + alpha_t * model_output
    raise InputError(f"unknown prediction_type {prediction_type!r}")


def _per_sample(values: np.ndarray, ndim: int) -> np.ndarray:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against a (B, ...) array of ``ndim`` dimensions."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _scales(t: np.ndarray | float, config: SchedulerConfig, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t) at the training time(s) t, broadcastable against a (B, ...) batch."""
    t = np.asarray(t)
    if config.algorithm == "flow_euler":
        if config.flow_convention == "latentsr":
            sigma = 1.0 - t.astype(np.float64)  # t is the data fraction in [0, 1]
        else:
            sigma = t.astype(np.float64) / config.num_train_timesteps
        return _per_sample(1.0 - sigma, ndim), _per_sample(sigma, ndim)
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"timesteps of algorithm {config.algorithm!r} must be integers, got dtype {t.dtype}")
    T = config.num_train_timesteps
    if np.any(t < 0) or np.any(t >= T):
        raise InputError(f"timesteps must be in [0, {T - 1}], got {t.min()}..{t.max()}")
    abar = alphas_cumprod(config)[table_index(t, config)]
    return _per_sample(np.sqrt(abar), ndim), _per_sample(np.sqrt(1.0 - abar), ndim)


def add_noise(x0: np.ndarray, noise: np.ndarray, t: np.ndarray | float, config: SchedulerConfig) -> np.ndarray:
    """The forward process q(x_t | x0): x_t = alpha_t x0 + sigma_t noise (DDPM eq. 4).

    Args:
        x0 : (B, ...) array, the clean latents.
        noise : same shape, standard normal.
        t : scalar or (B,): the value the model receives as timestep. Discrete schedules: an integer in [0, T)
            (read backwards when ``config.reversed_table``). ``flow_euler`` with the diffusers convention: sigma * T
            (float in [0, T]); with the paper's convention: the data fraction t in [0, 1], the model then receives
            ``int(t * (T - 1))`` (03_train_flow_matching.py).

    Returns:
        x_t, in the dtype of ``x0``.
    """
    alpha_t, sigma_t = _scales(t, config, np.ndim(x0))
    return (alpha_t * np.asarray(x0, np.float64) + sigma_t * np.asarray(noise, np.float64)).astype(x0.dtype)


def training_target(x0: np.ndarray, noise: np.ndarray, t: np.ndarray | float, config: SchedulerConfig) -> np.ndarray:
    """What the model should output at ``add_noise(x0, noise, t, config)`` for ``config.prediction_type``.

    eps for ``"epsilon"``; x0 for ``"sample"``; v = alpha_t eps - sigma_t x0 for ``"v_prediction"`` (diffusers
    ``get_velocity``); for ``"flow"``: eps - x0 (diffusers convention) or z_HR - eps (the paper's convention).
    Arguments as in `add_noise`; returns the dtype of ``x0``.
    """
    x0_64, eps = np.asarray(x0, np.float64), np.asarray(noise, np.float64)
    if config.prediction_type == "epsilon":
        target = eps
    elif config.prediction_type == "sample":
        target = x0_64
    elif config.prediction_type == "v_prediction":
        alpha_t, sigma_t = _scales(t, config, np.ndim(x0))
        target = alpha_t * eps - sigma_t * x0_64
    else:
        target = x0_64 - eps if config.flow_convention == "latentsr" else eps - x0_64
    return target.astype(x0.dtype)


def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int, solver_grid: bool = False) -> np.ndarray:
    """Table indices (int64, shape ``(n,)``, noisiest first) as diffusers spaces them (Lin et al. 2023, Table 2).

    DDIM and DDPM (``solver_grid=False``), with r = T // n:
    ``"linspace"``: round(j (T - 1) / (n - 1)) for j = n - 1..0; ``"leading"``: (n - 1) r, ..., r, 0 plus
    ``steps_offset``; ``"trailing"``: round(T (n - k) / n) - 1 for k = 0..n - 1.

    DPMSolverMultistepScheduler (``solver_grid=True``) lays n + 1 points and drops the last: ``"linspace"``:
    round(j (T - 1) / n) for j = n..1; ``"leading"``: n r, ..., r plus ``steps_offset`` with r = T // (n + 1);
    ``"trailing"`` as above. With n = T no n + 1 grid has n distinct entries in [0, T - 1], so the solver then
    uses the grid of DDIM: all of them, T - 1..0 (plus ``steps_offset`` for ``"leading"``, which leaves no room).

    Every value is computed in integers from the exact rational, rounded half to even (`np.round`'s rule): diffusers
    computes the same formulas in floating point, where ``np.arange(T, 0, -T / n)`` yields n + 1 values ending at
    -1 for 62 of the n in 1..1000 (61, 103, 121, ...), and an exact tie such as 1000 * 3 / 48 = 62.5 may land on
    either side. Elsewhere the values are diffusers' own.
    """
    T, n = config.num_train_timesteps, num_inference_steps
    grid = n + 1 if solver_grid and n < T else n  # points laid before the solver's last one is dropped
    if config.timestep_spacing == "linspace":
        k = _round_ratio((T - 1) * np.arange(grid), max(grid - 1, 1))[::-1][:n]
    elif config.timestep_spacing == "leading":
        k = (np.arange(grid) * (T // grid))[::-1][:n] + config.steps_offset
    else:
        k = _round_ratio(T * (n - np.arange(n)), n) - 1
    k = k.astype(np.int64)
    check_in_table(k, config)
    return k


def _round_ratio(p: np.ndarray, q: int) -> np.ndarray:
    """p / q rounded half to even, exactly, for integer arrays p >= 0 and an integer q > 0."""
    whole, rest = np.divmod(np.asarray(p, np.int64), q)
    return whole + ((2 * rest > q) | ((2 * rest == q) & (whole % 2 == 1)))


def check_in_table(k: np.ndarray, config: SchedulerConfig) -> None:
    """Refuse spaced timesteps that ``steps_offset`` pushed past the end of the table."""
    if k.max() >= config.num_train_timesteps:
        raise InputError(
            f"steps_offset {config.steps_offset} pushes timestep {k.max()} past the table "
            f"(num_train_timesteps {config.num_train_timesteps}); use fewer steps or a smaller offset"
        )


def check_steps(num_inference_steps: int, config: SchedulerConfig) -> None:
    """Refuse a step count outside [1, T]."""
    T = config.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise InputError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= T:
        raise InputError(f"num_inference_steps must be in [1, {T}] (num_train_timesteps), got {num_inference_steps}")


class TableScheduler:
    """The state every sampler on a discrete training table starts from: its config, the table alpha_bar
    ((T,) float64), the initial noise scale and no timesteps until ``set_timesteps``."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.init_noise_sigma = config.init_noise_sigma
        self.timesteps = np.empty(0, np.int64)


def check_step_order(name: str, step_index: int, timesteps: np.ndarray, t: float, tolerance: float = 0.0) -> None:
    """Refuse a multistep solver's call out of order: its i-th ``step`` must receive ``timesteps[i]`` (to within
    ``tolerance``, relative and absolute). ``name`` opens the error message."""
    if step_index >= len(timesteps) or not np.isclose(t, timesteps[step_index], rtol=tolerance, atol=tolerance):
        expected = timesteps[step_index] if step_index < len(timesteps) else "none (all steps done)"
        raise InputError(
            f"{name}: step {step_index} expects timestep {expected}, got {t}; call set_timesteps again to restart"
        )


def not_ready(name: str) -> RuntimeError:
    """The error of a step before set_timesteps (a caller bug, so not a MedsrError)."""
    return RuntimeError(f"{name}.step() called before set_timesteps(); call set_timesteps(num_inference_steps) first")


def check_noise(noise: np.ndarray | None, sample: np.ndarray, name: str) -> np.ndarray:
    """The standard-normal noise a stochastic step needs, as float64; refuse it missing or misshapen."""
    if noise is None:
        raise InputError(
            f"{name}.step() is stochastic and needs `noise`: pass a standard normal array shaped like the sample, "
            "drawn from the caller's np.random.Generator"
        )
    noise = np.asarray(noise)
    if noise.shape != np.shape(sample):
        raise InputError(f"{name}.step(): noise shape {noise.shape} differs from sample shape {np.shape(sample)}")
    return noise.astype(np.float64)


@dataclass
class StepOutput:
    """One sampler step.

    Attributes:
        prev_sample (`(B, C, h, w)` array, dtype of the input sample): the sample at the next (less noisy) time.
        pred_original_sample (`(B, C, h, w)` array, same dtype): the model's estimate of x0 at this step.
    """

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray
