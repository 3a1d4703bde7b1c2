"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler runs it with variance "fixed_small"."""

from __future__ import annotations

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig
from medsr.errors import InputError

from .common import (
    StepCoefficients,
    StepOutput,
    TableScheduler,
    check_noise,
    check_step_index,
    check_steps,
    not_ready,
    predict_x0_eps,
    spaced_timesteps,
    table_index,
    x0_eps_coefficients,
)


class DDPMScheduler(TableScheduler):
    """Ancestral sampling from the posterior q(x_prev | x_t, x0) over a subsequence of the training timesteps.

    From table index k to the next entry k_prev of the subsequence (alpha_bar_prev = 1 after the last), with
    a = alpha_bar[k], a_prev = alpha_bar[k_prev], alpha = a / a_prev, beta = 1 - alpha:

        mu = sqrt(a_prev) beta / (1 - a) x0 + sqrt(alpha) (1 - a_prev) / (1 - a) x_t       (DDPM eq. 7)
        x_prev = mu + sqrt(beta_tilde) z,  beta_tilde = (1 - a_prev) / (1 - a) beta       (DDPM eq. 7, "fixed_small")

    z is the caller's noise; it is required at every step and unused at the last (k = 0), as in diffusers.

    Attributes:
        config: the `SchedulerConfig`.
        alphas_cumprod ((T,) float64): the training table alpha_bar.
        timesteps ((n,) int64): after `set_timesteps`, the model's timestep at each step, noisiest first.
        init_noise_sigma (float): scale of the initial Gaussian.
        stochastic (bool): always True.
    """

    stochastic = True

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._k: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the n timesteps (``config.timestep_spacing``); resets the scheduler."""
        check_steps(num_inference_steps, self.config)
        self._k = spaced_timesteps(self.config, int(num_inference_steps))
        self.timesteps = table_index(self._k, self.config)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, noise: np.ndarray | None = None) -> StepOutput:
        """One ancestral step from the model's timestep ``t`` (an entry of `timesteps`).

        Args:
            model_output : (B, C, h, w) array, the denoiser's output at (sample, t).
            t : int, the timestep the denoiser received.
            sample : (B, C, h, w) array, x_t.
            noise : (B, C, h, w) standard normal array (required).

        Returns:
            `StepOutput` in the dtype of ``sample``.
        """
        if self._k is None:
            raise not_ready("DDPMScheduler")
        z = check_noise(noise, sample, "DDPMScheduler")
        position = np.flatnonzero(self.timesteps == t)
        if position.size == 0:
            raise InputError(f"DDPMScheduler.step: timestep {t} is not one of the scheduler's timesteps")
        k, a, a_prev = self._alphas(int(position[0]))
        alpha = a / a_prev
        beta = 1.0 - alpha

        cfg = self.config
        x_t = np.asarray(sample, np.float64)
        x0, _ = predict_x0_eps(
            np.asarray(model_output, np.float64), x_t, np.sqrt(a), np.sqrt(1 - a), cfg.prediction_type
        )
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        x_prev = np.sqrt(a_prev) * beta / (1 - a) * x0 + np.sqrt(alpha) * (1 - a_prev) / (1 - a) * x_t
        if k > 0:
            beta_tilde = max((1 - a_prev) / (1 - a) * beta, 1e-20)
            x_prev = x_prev + np.sqrt(beta_tilde) * z
        dtype = np.asarray(sample).dtype
        return StepOutput(prev_sample=x_prev.astype(dtype), pred_original_sample=x0.astype(dtype))

    def step_coefficients(self, t: int, step_index: int | None = None) -> StepCoefficients:
        """`step` at the model's timestep ``t`` as a `StepCoefficients` (apply with `apply_coefficients`).

        With x0 = x0_s x + x0_m m from `x0_eps_coefficients`, the posterior mean of DDPM eq. 7 is
        mu = w_x0 x0 + w_x x with w_x0 = sqrt(a_prev) beta / (1 - a) and w_x = sqrt(alpha) (1 - a_prev) / (1 - a):

            c_sample = w_x0 x0_s + w_x,  c_output = w_x0 x0_m,  c_noise = sqrt(beta_tilde) (0 at the last step).

        With ``clip_sample``: c_sample = w_x, c_output = 0 and c_x0 = w_x0 on the clipped x0.

        Args:
            t: int, the timestep the denoiser receives, an entry of `timesteps`.
            step_index: optional position in `timesteps`, checked against t.
        """
        if self._k is None:
            raise not_ready("DDPMScheduler", "step_coefficients")
        cfg = self.config
        i = check_step_index("DDPMScheduler.step_coefficients", self.timesteps, t, step_index)
        k, a, a_prev = self._alphas(i)
        alpha = a / a_prev
        beta = 1.0 - alpha
        (x0_s, x0_m), _ = x0_eps_coefficients(np.sqrt(a), np.sqrt(1 - a), cfg.prediction_type)
        w_x0 = np.sqrt(a_prev) * beta / (1 - a)
        w_x = np.sqrt(alpha) * (1 - a_prev) / (1 - a)
        c_noise = np.sqrt(max((1 - a_prev) / (1 - a) * beta, 1e-20)) if k > 0 else 0.0
        if cfg.clip_sample:
            return StepCoefficients(
                c_sample=w_x,
                c_output=0.0,
                x0_sample=x0_s,
                x0_output=x0_m,
                c_noise=c_noise,
                c_x0=w_x0,
                clip_range=cfg.clip_sample_range,
            )
        return StepCoefficients(
            c_sample=w_x0 * x0_s + w_x, c_output=w_x0 * x0_m, x0_sample=x0_s, x0_output=x0_m, c_noise=c_noise
        )

    def _alphas(self, i: int) -> tuple[int, float, float]:
        """(table index, alpha_bar, alpha_bar of the next step, 1 after the last) at step i."""
        k = int(self._k[i])
        a = self.alphas_cumprod[k]
        a_prev = self.alphas_cumprod[self._k[i + 1]] if i + 1 < len(self._k) else 1.0
        return k, a, a_prev
