"""The paper's own sampler (arXiv 2604.12152; github.com/sebasmos/latent-sr,
medvae_diffusion_pipeline/scripts/03_train_diffusion.py, ``LatentDiffusionSR.sample``)."""

from __future__ import annotations

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig
from medsr.errors import InputError

from .common import (
    StepCoefficients,
    StepOutput,
    TableScheduler,
    check_step_index,
    check_steps,
    not_ready,
    predict_x0_eps,
    table_index,
    x0_eps_coefficients,
)

#: the paper's code recovers eps as (z - sqrt(a) x0) / (sqrt(1 - a) + 1e-4)
SIGMA_OFFSET = 1e-4


class LatentSRScheduler(TableScheduler):
    """A deterministic DDIM-like x0 loop over the n noisiest consecutive entries of the table.

    The paper stores its cosine table reversed, a_i = alpha_bar[T - 1 - i] (i = 0 noisiest), and runs n model
    calls at i = 0, 1, ..., n - 1, the model receiving i itself (with ``reversed_table``; otherwise T - 1 - i).
    For i < n - 1, with x0 the model output:

        eps = (z - sqrt(a_i) x0) / (sqrt(1 - a_i) + 1e-4)
        z <- z + (sqrt(a_{i+1}) - sqrt(a_i)) x0 + (sqrt(1 - a_{i+1}) - sqrt(1 - a_i)) eps

    and the last call returns its x0 as the result. Respacing is not part of it: with n < T it stops at
    a_{n-1} (n = 100: alpha_bar 0.024 for the paper's table), so the result is almost the first x0 estimate.
    The loop starts from ``init_noise_sigma * N(0, I)``; the paper uses 0.5.

    Attributes:
        config: the `SchedulerConfig`.
        alphas_cumprod ((T,) float64): the training table alpha_bar in diffusers' orientation.
        timesteps ((n,) int64): after `set_timesteps`, the model's timestep at each step.
        init_noise_sigma (float): scale of the initial Gaussian.
        stochastic (bool): always False.
    """

    stochastic = False

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Use the n noisiest table entries, i = 0..n-1 of the reversed table."""
        check_steps(num_inference_steps, self.config)
        self.num_inference_steps = n = int(num_inference_steps)
        T = self.config.num_train_timesteps
        self.timesteps = table_index(T - 1 - np.arange(n, dtype=np.int64), self.config)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, noise: np.ndarray | None = None) -> StepOutput:
        """One step of the paper's loop from the model's timestep ``t`` (an entry of `timesteps`).

        Args:
            model_output : (B, C, h, w) array, the predicted x0.
            t : int, the timestep the denoiser received.
            sample : (B, C, h, w) array, z.
            noise : ignored (deterministic).

        Returns:
            `StepOutput` in the dtype of ``sample``; at the last timestep ``prev_sample`` is the x0 prediction.
        """
        T = self.config.num_train_timesteps
        i = self._index(t, "step")
        dtype = np.asarray(sample).dtype
        x0 = np.asarray(model_output, np.float64)
        if i == self.num_inference_steps - 1:
            return StepOutput(prev_sample=x0.astype(dtype), pred_original_sample=x0.astype(dtype))
        a, a_next = self.alphas_cumprod[T - 1 - i], self.alphas_cumprod[T - 2 - i]
        z = np.asarray(sample, np.float64)
        x0, eps = predict_x0_eps(x0, z, np.sqrt(a), np.sqrt(1 - a) + SIGMA_OFFSET, "sample")
        z = z + (np.sqrt(a_next) - np.sqrt(a)) * x0 + (np.sqrt(1 - a_next) - np.sqrt(1 - a)) * eps
        return StepOutput(prev_sample=z.astype(dtype), pred_original_sample=x0.astype(dtype))

    def step_coefficients(self, t: int, step_index: int | None = None) -> StepCoefficients:
        """`step` at the model's timestep ``t`` as a `StepCoefficients` (apply with `apply_coefficients`).

        With s_i = sqrt(1 - a_i) + 1e-4 the paper's eps = (z - sqrt(a_i) x0) / s_i, its update
        z + (sqrt(a_{i+1}) - sqrt(a_i)) x0 + (sqrt(1 - a_{i+1}) - sqrt(1 - a_i)) eps is, with d = sqrt(1 - a_{i+1})
        - sqrt(1 - a_i) and the model output m = x0:

            c_sample = 1 + d / s_i,  c_output = sqrt(a_{i+1}) - sqrt(a_i) - d sqrt(a_i) / s_i

        and the last step returns x0 (c_sample = 0, c_output = 1). pred_original_sample is m itself.

        Args:
            t: int, the timestep the denoiser receives, an entry of `timesteps`.
            step_index: optional position in `timesteps`, checked against t.
        """
        i = self._index(t, "step_coefficients")
        if step_index is not None:
            check_step_index("LatentSRScheduler.step_coefficients", self.timesteps, int(t), step_index)
        if i == self.num_inference_steps - 1:
            return StepCoefficients(c_sample=0.0, c_output=1.0, x0_sample=0.0, x0_output=1.0)
        T = self.config.num_train_timesteps
        a, a_next = self.alphas_cumprod[T - 1 - i], self.alphas_cumprod[T - 2 - i]
        _, (eps_s, eps_m) = x0_eps_coefficients(np.sqrt(a), np.sqrt(1 - a) + SIGMA_OFFSET, "sample")
        d = np.sqrt(1 - a_next) - np.sqrt(1 - a)
        return StepCoefficients(
            c_sample=1.0 + d * eps_s, c_output=np.sqrt(a_next) - np.sqrt(a) + d * eps_m, x0_sample=0.0, x0_output=1.0
        )

    def _index(self, t: int, method: str) -> int:
        """The step i of the model's timestep t (the paper's loop counter)."""
        if self.num_inference_steps is None:
            raise not_ready("LatentSRScheduler", method)
        i = self.config.num_train_timesteps - 1 - table_index(int(t), self.config)
        if not 0 <= i < self.num_inference_steps:
            raise InputError(f"LatentSRScheduler.{method}: timestep {t} is not one of the scheduler's timesteps")
        return i
