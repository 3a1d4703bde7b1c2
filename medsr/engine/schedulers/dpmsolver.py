"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095), as diffusers' DPMSolverMultistepScheduler runs it with
algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final and final sigma 0."""

from __future__ import annotations

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig

from .common import (
    StepCoefficients,
    StepOutput,
    TableScheduler,
    check_step_index,
    check_step_order,
    check_steps,
    not_ready,
    predict_x0_eps,
    spaced_timesteps,
    table_index,
    x0_eps_coefficients,
)


class DPMSolverPlusPlus2MScheduler(TableScheduler):
    """Multistep second-order solver of the diffusion ODE in the data-prediction (x0) form.

    With alpha_s = sqrt(alpha_bar), sigma_s = sqrt(1 - alpha_bar), lambda = log(alpha / sigma) and
    h = lambda_t - lambda_s0 from the current time s0 to the next time t (Lu et al. 2022, Algorithm 2):

        first order (step 0 and the last step, DDIM-equivalent):
            x_t = (sigma_t / sigma_s0) x - alpha_t (exp(-h) - 1) D0
        second order (midpoint), r0 = h_0 / h with h_0 = lambda_s0 - lambda_s1 of the previous step:
            x_t = (sigma_t / sigma_s0) x - alpha_t (exp(-h) - 1) (D0 + D1 / 2),  D1 = (D0 - D_prev) / r0

    D0 is this step's x0 (from `predict_x0_eps`). After the last step sigma = 0, so x_t = x0.

    Attributes:
        config: the `SchedulerConfig`.
        alphas_cumprod ((T,) float64): the training table alpha_bar.
        timesteps ((n,) int64): after `set_timesteps`, the model's timestep at each step, noisiest first.
        init_noise_sigma (float): scale of the initial Gaussian.
        stochastic (bool): always False.
    """

    stochastic = False

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._alpha: np.ndarray | None = None
        self._sigma: np.ndarray | None = None
        self._step_index = 0
        self._x0_prev: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the n timesteps (``config.timestep_spacing`` on DPMSolverMultistepScheduler's grid of n + 1
        points, see `spaced_timesteps`) and forget the solver's history."""
        check_steps(num_inference_steps, self.config)
        cfg = self.config
        k = spaced_timesteps(cfg, int(num_inference_steps), solver_grid=True)
        a = self.alphas_cumprod[k]
        self._alpha = np.append(np.sqrt(a), 1.0)
        self._sigma = np.append(np.sqrt(1 - a), 0.0)
        self.timesteps = table_index(k, cfg)
        self._step_index = 0
        self._x0_prev = None

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, noise: np.ndarray | None = None) -> StepOutput:
        """One solver step; call it with the entries of `timesteps` in order (the solver keeps the previous x0).

        Args:
            model_output : (B, C, h, w) array, the denoiser's output at (sample, t).
            t : int, the timestep the denoiser received: must be ``timesteps[i]`` at the i-th call.
            sample : (B, C, h, w) array, x_t.
            noise : ignored (the solver is deterministic).

        Returns:
            `StepOutput` in the dtype of ``sample``.
        """
        if self._alpha is None:
            raise not_ready("DPMSolverPlusPlus2MScheduler")
        i = self._step_index
        check_step_order("DPMSolverPlusPlus2MScheduler is multistep", i, self.timesteps, t)
        alpha_s0, sigma_s0, alpha_t, sigma_t = self._alpha[i], self._sigma[i], self._alpha[i + 1], self._sigma[i + 1]
        x = np.asarray(sample, np.float64)
        D0, _ = predict_x0_eps(np.asarray(model_output, np.float64), x, alpha_s0, sigma_s0, self.config.prediction_type)
        if sigma_t == 0.0:
            x_t = D0
        else:
            lambda_s0, lambda_t = np.log(alpha_s0 / sigma_s0), np.log(alpha_t / sigma_t)
            h = lambda_t - lambda_s0
            if self._x0_prev is None or i == len(self.timesteps) - 1:
                x_t = (sigma_t / sigma_s0) * x - alpha_t * np.expm1(-h) * D0
            else:
                h_0 = lambda_s0 - np.log(self._alpha[i - 1] / self._sigma[i - 1])
                D1 = (D0 - self._x0_prev) / (h_0 / h)
                x_t = (sigma_t / sigma_s0) * x - alpha_t * np.expm1(-h) * D0 - 0.5 * alpha_t * np.expm1(-h) * D1
        self._x0_prev = D0
        self._step_index += 1
        dtype = np.asarray(sample).dtype
        return StepOutput(prev_sample=x_t.astype(dtype), pred_original_sample=D0.astype(dtype))

    def step_coefficients(self, t: int, step_index: int | None = None) -> StepCoefficients:
        """The i-th `step` (t = ``timesteps[i]``) as a `StepCoefficients` (apply with `apply_coefficients`), without
        touching the solver's state: the history it combines is the previous step's ``pred_original_sample``.

        With D0 = x0_s x + x0_m m (`x0_eps_coefficients`) and E = -alpha_t (exp(-h) - 1), Lu et al. 2022
        (Algorithm 2, DPM-Solver++ 2M with the midpoint update, as in `step`):

            first order (i = 0 and the last step): prev = (sigma_t / sigma_s0) x + E D0
            second order: prev = (sigma_t / sigma_s0) x + E (1 + 1 / (2 r0)) D0 - E / (2 r0) D_prev
            final sigma_t = 0: prev = D0

        so c_sample = sigma_t / sigma_s0 + w x0_s and c_output = w x0_m with w the weight of D0, and
        c_history = -E / (2 r0) on the history D_prev.

        Args:
            t: the timestep the denoiser receives at step i.
            step_index: i; needed only when t is ambiguous (never on this solver's grids), checked against t.
        """
        if self._alpha is None:
            raise not_ready("DPMSolverPlusPlus2MScheduler", "step_coefficients")
        i = check_step_index("DPMSolverPlusPlus2MScheduler.step_coefficients", self.timesteps, t, step_index)
        alpha_s0, sigma_s0, alpha_t, sigma_t = self._alpha[i], self._sigma[i], self._alpha[i + 1], self._sigma[i + 1]
        (x0_s, x0_m), _ = x0_eps_coefficients(alpha_s0, sigma_s0, self.config.prediction_type)
        if sigma_t == 0.0:
            return StepCoefficients(c_sample=x0_s, c_output=x0_m, x0_sample=x0_s, x0_output=x0_m)
        lambda_s0, lambda_t = np.log(alpha_s0 / sigma_s0), np.log(alpha_t / sigma_t)
        h = lambda_t - lambda_s0
        E = -alpha_t * np.expm1(-h)
        if i == 0 or i == len(self.timesteps) - 1:
            w_d0, w_prev = E, 0.0
        else:
            h_0 = lambda_s0 - np.log(self._alpha[i - 1] / self._sigma[i - 1])
            r0 = h_0 / h
            w_d0, w_prev = E * (1.0 + 0.5 / r0), -0.5 * E / r0
        return StepCoefficients(
            c_sample=sigma_t / sigma_s0 + w_d0 * x0_s,
            c_output=w_d0 * x0_m,
            x0_sample=x0_s,
            x0_output=x0_m,
            c_history=w_prev,
        )
