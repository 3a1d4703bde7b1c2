"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), as diffusers' DDIMScheduler runs it."""

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


class DDIMScheduler(TableScheduler):
    """DDIM with eta >= 0 over a subsequence of the training timesteps.

    One step from table index k to k_prev, the table index of the next entry of `timesteps` (after the last, -1:
    alpha_bar = 1 when ``set_alpha_to_one``, else alpha_bar[0]):

        x_{prev} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z              (DDIM eq. 12)
        sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)                     (DDIM eq. 16)

    with a = alpha_bar[k], (x0, eps) from the model output by `predict_x0_eps` and z the caller's noise.

    diffusers' DDIMScheduler steps to k - T // n instead, whatever the spacing. That is the next entry for leading
    spacing and whenever n divides T, but not for trailing or linspace spacing otherwise: with trailing spacing and
    n = 7, its last step goes from t = 142 to alpha_bar[0] instead of to the end of the chain, so even a model
    predicting x0 exactly ends with noise left in its sample. medsr follows the schedule (as diffusers' own
    DDPMScheduler does); tests/test_schedulers_parity.py checks the property where the two differ. A timestep off
    the schedule keeps the k - T // n rule.

    Attributes:
        config: the `SchedulerConfig`.
        alphas_cumprod ((T,) float64): the training table alpha_bar.
        timesteps ((n,) int64): after `set_timesteps`, the model's timestep at each step, noisiest first.
        init_noise_sigma (float): scale of the initial Gaussian.
        stochastic (bool): True when eta > 0 (then `step` needs ``noise``).
    """

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.stochastic = config.eta > 0
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the n timesteps (``config.timestep_spacing``); resets the scheduler."""
        check_steps(num_inference_steps, self.config)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = table_index(spaced_timesteps(self.config, self.num_inference_steps), self.config)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, noise: np.ndarray | None = None) -> StepOutput:
        """One DDIM step from the model's timestep ``t`` (an entry of `timesteps`).

        Args:
            model_output : (B, C, h, w) array, the denoiser's output at (sample, t).
            t : int, the timestep the denoiser received.
            sample : (B, C, h, w) array, x_t.
            noise : (B, C, h, w) standard normal array; required when `stochastic`, ignored otherwise.

        Returns:
            `StepOutput` in the dtype of ``sample``.
        """
        cfg = self.config
        a, a_prev = self._alphas(t, "step")
        x_t = np.asarray(sample, np.float64)
        x0, eps = predict_x0_eps(
            np.asarray(model_output, np.float64), x_t, np.sqrt(a), np.sqrt(1 - a), cfg.prediction_type
        )
        if cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        sigma = cfg.eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x_prev = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps
        if self.stochastic:
            x_prev = x_prev + sigma * check_noise(noise, sample, "DDIMScheduler")
        dtype = np.asarray(sample).dtype
        return StepOutput(prev_sample=x_prev.astype(dtype), pred_original_sample=x0.astype(dtype))

    def step_coefficients(self, t: int, step_index: int | None = None) -> StepCoefficients:
        """`step` at the model's timestep ``t`` as a `StepCoefficients` (apply with `apply_coefficients`).

        With (x0, eps) = (x0_s x + x0_m m, eps_s x + eps_m m) from `x0_eps_coefficients` (DDIM eq. 12's
        "predicted x0"), DDIM eq. 12 is prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, so

            c_sample = sqrt(a_prev) x0_s + sqrt(1 - a_prev - sigma^2) eps_s,   likewise c_output with x0_m, eps_m,
            c_noise = sigma (DDIM eq. 16; 0 when eta = 0).

        With ``clip_sample`` the clipped x0 keeps its own weight: c_x0 = sqrt(a_prev), and only the eps part is
        folded (eps is the unclipped one, as in diffusers without ``use_clipped_model_output``).

        Args:
            t: int, the timestep the denoiser receives (any in the table, as for `step`).
            step_index: optional position in `timesteps`, checked against t.
        """
        cfg = self.config
        a, a_prev = self._alphas(t, "step_coefficients")
        if step_index is not None:
            check_step_index("DDIMScheduler.step_coefficients", self.timesteps, int(t), step_index)
        (x0_s, x0_m), (eps_s, eps_m) = x0_eps_coefficients(np.sqrt(a), np.sqrt(1 - a), cfg.prediction_type)
        sigma = cfg.eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        w_x0, w_eps = np.sqrt(a_prev), np.sqrt(1 - a_prev - sigma**2)
        c_noise = sigma if self.stochastic else 0.0
        if cfg.clip_sample:
            return StepCoefficients(
                c_sample=w_eps * eps_s,
                c_output=w_eps * eps_m,
                x0_sample=x0_s,
                x0_output=x0_m,
                c_noise=c_noise,
                c_x0=w_x0,
                clip_range=cfg.clip_sample_range,
            )
        return StepCoefficients(
            c_sample=w_x0 * x0_s + w_eps * eps_s,
            c_output=w_x0 * x0_m + w_eps * eps_m,
            x0_sample=x0_s,
            x0_output=x0_m,
            c_noise=c_noise,
        )

    def _next_index(self, t: int, k: int) -> int:
        """The table index the step from model timestep ``t`` (table index ``k``) goes to: that of the next entry of
        `timesteps`, -1 after the last; for a ``t`` off the schedule, k - T // n."""
        position = np.flatnonzero(self.timesteps == t)
        if position.size == 0:
            return k - self.config.num_train_timesteps // self.num_inference_steps
        following = int(position[0]) + 1
        return int(table_index(int(self.timesteps[following]), self.config)) if following < len(self.timesteps) else -1

    def _alphas(self, t: int, method: str) -> tuple[float, float]:
        """(alpha_bar at t, alpha_bar at the next step, :meth:`_next_index`) for `step` and `step_coefficients`."""
        if self.num_inference_steps is None:
            raise not_ready("DDIMScheduler", method)
        cfg, T = self.config, self.config.num_train_timesteps
        k = table_index(int(t), cfg)
        if not 0 <= k < T:
            raise InputError(f"DDIMScheduler.{method}: timestep {t} is outside [0, {T - 1}]")
        k_prev = self._next_index(int(t), k)
        a = self.alphas_cumprod[k]
        a_prev = self.alphas_cumprod[k_prev] if k_prev >= 0 else self.final_alpha_cumprod
        return a, a_prev
