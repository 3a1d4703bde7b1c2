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


def x0_eps_coefficients(
    alpha_t: float, sigma_t: float, prediction_type: str
) -> tuple[tuple[float, float], tuple[float, float]]:
    """`predict_x0_eps` as coefficients: ``((x0_sample, x0_output), (eps_sample, eps_output))`` such that
    x0 = x0_sample x_t + x0_output model_output and eps = eps_sample x_t + eps_output model_output.

    The same four formulas as `predict_x0_eps` (DDIM eq. 12; Salimans & Ho 2022 for v; the rectified-flow velocity
    eps - x0), each affine in (x_t, model_output).
    """
    a, s = float(alpha_t), float(sigma_t)
    if prediction_type == "epsilon":
        return (1.0 / a, -s / a), (0.0, 1.0)
    if prediction_type == "sample":
        return (0.0, 1.0), (1.0 / s, -a / s)
    if prediction_type == "v_prediction":
        return (a, -s), (s, a)
    if prediction_type == "flow":
        return (1.0, -s), (1.0, a)
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


def not_ready(name: str, method: str = "step") -> RuntimeError:
    """The error of a step before set_timesteps (a caller bug, so not a MedsrError)."""
    return RuntimeError(
        f"{name}.{method}() called before set_timesteps(); call set_timesteps(num_inference_steps) first"
    )


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


@dataclass(frozen=True)
class StepCoefficients:
    """One sampler step as coefficients, so that any array module (NumPy, CuPy, a graph) can apply it.

    With x the sample, m the model output at (x, t), h the history (the previous step's ``pred_original_sample``,
    which multistep solvers combine with this one's; Lu et al. 2022, DPM-Solver++ 2M) and z the step's standard
    normal noise (stochastic samplers)::

        pred_original_sample = x0 = clip(x0_sample x + x0_output m)
        prev_sample = c_sample x + c_output m + c_history h + c_noise z + c_x0 x0

    ``clip`` is elementwise clipping to [-clip_range, clip_range] when ``clip_range`` is not None (the config's
    ``clip_sample``) and the identity otherwise. Clipping is not affine, so a clipping step keeps the clipped x0 as
    a term of its own (``c_x0``); every other step folds x0 into ``c_sample`` and ``c_output`` and has c_x0 = 0.
    A history or noise term whose coefficient is 0 is skipped (its array may be None), as is a zero c_x0.
    `apply_coefficients` evaluates the form.

    Every coefficient is a Python float (so float32 arrays stay float32 under NumPy's promotion rules).

    Attributes:
        c_sample, c_output, c_history, c_noise, c_x0 (`float`): the weights of prev_sample.
        x0_sample, x0_output (`float`): the weights of pred_original_sample, before clipping.
        clip_range (`float` or None): the clipping bound of x0, None when the step does not clip.
    """

    c_sample: float
    c_output: float
    x0_sample: float
    x0_output: float
    c_history: float = 0.0
    c_noise: float = 0.0
    c_x0: float = 0.0
    clip_range: float | None = None

    def __post_init__(self) -> None:
        for name in ("c_sample", "c_output", "x0_sample", "x0_output", "c_history", "c_noise", "c_x0"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.clip_range is not None:
            object.__setattr__(self, "clip_range", float(self.clip_range))

    @property
    def needs_history(self) -> bool:
        """True when the step reads the previous step's pred_original_sample."""
        return self.c_history != 0.0

    @property
    def needs_noise(self) -> bool:
        """True when the step adds noise. The caller of a stochastic sampler still draws noise at every step
        (``scheduler.stochastic``) so that its random stream matches `step`'s."""
        return self.c_noise != 0.0


def apply_coefficients(
    coeffs: StepCoefficients,
    sample,
    model_output,
    history=None,
    noise=None,
    xp=np,
) -> StepOutput:
    """Evaluate a `StepCoefficients` on arrays of any array module ``xp`` (NumPy by default; CuPy's arrays and
    ``cupy`` as ``xp`` work unchanged, only ``xp.clip`` is called).

    The arithmetic runs in the arrays' own dtype (float32 latents stay float32; `step` computes in float64 and
    casts, so the two then agree to float32 rounding; in float64 they agree to float64 rounding).

    Args:
        coeffs: the step's coefficients (`step_coefficients` of the scheduler).
        sample: x, the current sample.
        model_output: the denoiser's output at (sample, t).
        history: the previous step's ``pred_original_sample``; needed when ``coeffs.c_history != 0``.
        noise: standard normal, shaped like the sample; needed when ``coeffs.c_noise != 0``.
        xp: the array module of the arrays.

    Returns:
        `StepOutput` (prev_sample, pred_original_sample), arrays of ``xp``.

    Raises:
        InputError: history or noise missing where the coefficients need them.
    """
    c = coeffs
    x0 = c.x0_sample * sample + c.x0_output * model_output
    if c.clip_range is not None:
        x0 = xp.clip(x0, -c.clip_range, c.clip_range)
    prev = c.c_sample * sample + c.c_output * model_output
    if c.c_x0:
        prev = prev + c.c_x0 * x0
    if c.c_history:
        if history is None:
            raise InputError("apply_coefficients: this step combines the previous x0 and needs `history`")
        prev = prev + c.c_history * history
    if c.c_noise:
        if noise is None:
            raise InputError("apply_coefficients: this step is stochastic and needs `noise`")
        prev = prev + c.c_noise * noise
    return StepOutput(prev_sample=prev, pred_original_sample=x0)


def check_step_index(name: str, timesteps: np.ndarray, t: float, step_index: int | None, tolerance: float = 0.0) -> int:
    """The position of ``t`` in ``timesteps`` for `step_coefficients`: ``step_index`` when given (checked against
    ``timesteps[step_index]`` to within ``tolerance``), else the unique position of t. ``name`` opens the error.

    Raises:
        InputError: t not among the timesteps, at another position than ``step_index``, or repeated there (then
            the caller must say which step it means).
    """
    if step_index is not None:
        n = len(timesteps)
        if isinstance(step_index, bool) or not isinstance(step_index, (int, np.integer)) or not 0 <= step_index < n:
            raise InputError(f"{name}: step_index must be an int in [0, {n - 1}], got {step_index!r}")
        if not np.isclose(t, timesteps[step_index], rtol=tolerance, atol=tolerance):
            raise InputError(f"{name}: step {step_index} has timestep {timesteps[step_index]}, got {t}")
        return int(step_index)
    positions = np.flatnonzero(np.isclose(timesteps, t, rtol=tolerance, atol=tolerance))
    if positions.size == 0:
        raise InputError(f"{name}: timestep {t} is not one of the scheduler's timesteps")
    if positions.size > 1:
        raise InputError(f"{name}: timestep {t} occurs at steps {positions.tolist()}; pass step_index")
    return int(positions[0])


def trajectory_coefficients(scheduler) -> list[StepCoefficients]:
    """Every step's `StepCoefficients` after ``scheduler.set_timesteps``, in order (entry i for ``timesteps[i]``),
    for a loop that applies them on the device; the scheduler's own state is left as it is."""
    return [scheduler.step_coefficients(t, step_index=i) for i, t in enumerate(scheduler.timesteps)]
