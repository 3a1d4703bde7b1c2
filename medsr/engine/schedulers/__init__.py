"""NumPy samplers shared by the engine, the PyTorch reference pipeline and training (never imports torch).

One small class per algorithm, built from a `SchedulerConfig` (the manifest's ``scheduler`` entry)::

    scheduler = make_scheduler(config)
    scheduler.set_timesteps(n)
    x = config.init_noise_sigma * rng.standard_normal(shape)
    for t in scheduler.timesteps:
        out = denoise(x, t)
        noise = rng.standard_normal(x.shape) if scheduler.stochastic else None
        x = scheduler.step(out, t, x, noise).prev_sample
"""

from __future__ import annotations

from .common import add_noise, alphas_cumprod, predict_x0_eps, training_target
from .config import SchedulerConfig, StepOutput
from .ddim import DDIMScheduler

_SCHEDULERS = {
    "ddim": DDIMScheduler,
}


def make_scheduler(config: SchedulerConfig):
    """The scheduler object for ``config.algorithm``."""
    return _SCHEDULERS[config.algorithm](config)


__all__ = [
    "DDIMScheduler",
    "SchedulerConfig",
    "StepOutput",
    "add_noise",
    "alphas_cumprod",
    "make_scheduler",
    "predict_x0_eps",
    "training_target",
]
