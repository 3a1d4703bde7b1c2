"""DDPM ancestral sampling (Ho et al. 2020), as diffusers' DDPMScheduler runs it with variance "fixed_small"."""

from __future__ import annotations

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig
from medsr.errors import InputError

from .common import (
    StepOutput,
    TableScheduler,
    check_noise,
    check_steps,
    not_ready,
    predict_x0_eps,
    spaced_timesteps,
    table_index,
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
        i = int(position[0])
        k = int(self._k[i])
        a = self.alphas_cumprod[k]
        a_prev = self.alphas_cumprod[self._k[i + 1]] if i + 1 < len(self._k) else 1.0
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
