"""The paper's own sampler (arXiv 2604.12152; github.com/sebasmos/latent-sr,
medvae_diffusion_pipeline/scripts/03_train_diffusion.py, ``LatentDiffusionSR.sample``)."""

from __future__ import annotations

import numpy as np

from medsr.bundle.scheduler import SchedulerConfig
from medsr.errors import InputError

from .common import StepOutput, TableScheduler, check_steps, not_ready, predict_x0_eps, table_index

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
        if self.num_inference_steps is None:
            raise not_ready("LatentSRScheduler")
        T = self.config.num_train_timesteps
        i = T - 1 - table_index(int(t), self.config)
        if not 0 <= i < self.num_inference_steps:
            raise InputError(f"LatentSRScheduler.step: timestep {t} is not one of the scheduler's timesteps")
        dtype = np.asarray(sample).dtype
        x0 = np.asarray(model_output, np.float64)
        if i == self.num_inference_steps - 1:
            return StepOutput(prev_sample=x0.astype(dtype), pred_original_sample=x0.astype(dtype))
        a, a_next = self.alphas_cumprod[T - 1 - i], self.alphas_cumprod[T - 2 - i]
        z = np.asarray(sample, np.float64)
        x0, eps = predict_x0_eps(x0, z, np.sqrt(a), np.sqrt(1 - a) + SIGMA_OFFSET, "sample")
        z = z + (np.sqrt(a_next) - np.sqrt(a)) * x0 + (np.sqrt(1 - a_next) - np.sqrt(1 - a)) * eps
        return StepOutput(prev_sample=z.astype(dtype), pred_original_sample=x0.astype(dtype))
