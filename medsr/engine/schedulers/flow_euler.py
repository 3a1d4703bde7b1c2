"""Euler integration of a rectified-flow ODE (Liu et al. 2023; Esser et al. 2024), in diffusers' convention
(FlowMatchEulerDiscreteScheduler) or in the paper's flow-matching ablation (03_train_flow_matching.py)."""

from __future__ import annotations

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig

from .common import (
    StepCoefficients,
    StepOutput,
    check_step_index,
    check_step_order,
    check_steps,
    not_ready,
    predict_x0_eps,
    x0_eps_coefficients,
)


class FlowEulerScheduler:
    """Euler steps along sigma for x_sigma = (1 - sigma) x0 + sigma eps, whose velocity is dx/dsigma = eps - x0:

        x_next = x + (sigma_next - sigma) (eps - x0)

    with (x0, eps) from the model output by `predict_x0_eps` (alpha = 1 - sigma).

    ``flow_convention="diffusers"``: sigmas = shift(linspace(1, shift(1/T), n)) then 0, with
    shift(s) = flow_shift s / (1 + (flow_shift - 1) s) (so the smallest sigma is shifted twice, as in diffusers); the
    model receives sigma * T (float64) and a ``"flow"`` output means eps - x0.

    ``flow_convention="latentsr"`` (the paper's ablation, time t = 1 - sigma the data fraction): t_i = i / n for
    i = 0..n-1, so sigma_i = 1 - i / n, then sigma = 0 (every dt = 1 / n); the model receives
    ``int(t_i * (T - 1))`` (int64), computed exactly as i (T - 1) // n (the paper's float product falls one short
    where it is a whole number, 62 for i = 7, n = 111, and repeats a timestep at n = 999), and a ``"flow"`` output
    means z_HR - eps, so the step is z + v / n.

    Attributes:
        config: the `SchedulerConfig`.
        sigmas ((n + 1,) float64): after `set_timesteps`, the noise level at each step, then 0.
        timesteps ((n,) float64 or int64): after `set_timesteps`, the model's timestep at each step.
        init_noise_sigma (float): scale of the initial Gaussian.
        stochastic (bool): always False.
    """

    stochastic = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.init_noise_sigma = config.init_noise_sigma
        self.timesteps = np.empty(0, np.float64)
        self.sigmas: np.ndarray | None = None
        self._step_index = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the n noise levels of ``config.flow_convention``; resets the scheduler."""
        check_steps(num_inference_steps, self.config)
        T, n, shift = self.config.num_train_timesteps, int(num_inference_steps), self.config.flow_shift
        if self.config.flow_convention == "latentsr":
            i = np.arange(n, dtype=np.int64)
            sigmas = 1.0 - i / n
            self.timesteps = i * (T - 1) // n  # int(t_i (T - 1)), exactly
        else:
            sigma_min = shift * (1 / T) / (1 + (shift - 1) * (1 / T))
            s = np.linspace(1.0, sigma_min, n)
            sigmas = shift * s / (1 + (shift - 1) * s)
            self.timesteps = sigmas * T
        self.sigmas = np.append(sigmas, 0.0)
        self._step_index = 0

    def step(
        self, model_output: np.ndarray, t: float, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> StepOutput:
        """One Euler step; call it with the entries of `timesteps` in order.

        Args:
            model_output : (B, C, h, w) array, the denoiser's output at (sample, t).
            t : the timestep the denoiser received: ``timesteps[i]`` at the i-th call.
            sample : (B, C, h, w) array, x_sigma.
            noise : ignored (the ODE is deterministic).

        Returns:
            `StepOutput` in the dtype of ``sample``.
        """
        if self.sigmas is None:
            raise not_ready("FlowEulerScheduler")
        i = self._step_index
        check_step_order("FlowEulerScheduler", i, self.timesteps, t, tolerance=1e-6)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        output = np.asarray(model_output, np.float64)
        if self.config.flow_convention == "latentsr" and self.config.prediction_type == "flow":
            output = -output  # the paper's velocity z_HR - eps is -(eps - x0)
        x = np.asarray(sample, np.float64)
        x0, eps = predict_x0_eps(output, x, 1.0 - sigma, sigma, self.config.prediction_type)
        x_next = x + (sigma_next - sigma) * (eps - x0)
        self._step_index += 1
        dtype = np.asarray(sample).dtype
        return StepOutput(prev_sample=x_next.astype(dtype), pred_original_sample=x0.astype(dtype))

    def step_coefficients(self, t: float, step_index: int | None = None) -> StepCoefficients:
        """The i-th `step` (t = ``timesteps[i]``) as a `StepCoefficients` (apply with `apply_coefficients`), without
        touching the step counter.

        With (x0, eps) = (x0_s x + x0_m m, eps_s x + eps_m m) from `x0_eps_coefficients` at alpha = 1 - sigma
        (m negated first for the paper's velocity z_HR - eps), the Euler step x + (sigma_next - sigma)(eps - x0) is

            c_sample = 1 + dt (eps_s - x0_s),  c_output = dt (eps_m - x0_m),  dt = sigma_next - sigma

        (a ``"flow"`` output: c_sample = 1, c_output = dt, or -dt in the paper's convention, i.e. z + v / n).

        Args:
            t: the timestep the denoiser receives at step i (to within 1e-6, as `step` checks it).
            step_index: i; required where t repeats (the paper's convention with n = T gives timestep 0 twice).
        """
        if self.sigmas is None:
            raise not_ready("FlowEulerScheduler", "step_coefficients")
        i = check_step_index("FlowEulerScheduler.step_coefficients", self.timesteps, t, step_index, tolerance=1e-6)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sign = -1.0 if self.config.flow_convention == "latentsr" and self.config.prediction_type == "flow" else 1.0
        (x0_s, x0_m), (eps_s, eps_m) = x0_eps_coefficients(1.0 - sigma, sigma, self.config.prediction_type)
        x0_m, eps_m = sign * x0_m, sign * eps_m
        dt = sigma_next - sigma
        return StepCoefficients(
            c_sample=1.0 + dt * (eps_s - x0_s), c_output=dt * (eps_m - x0_m), x0_sample=x0_s, x0_output=x0_m
        )
