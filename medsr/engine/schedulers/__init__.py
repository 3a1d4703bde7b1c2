"""NumPy samplers shared by the engine, the PyTorch reference pipeline and training (never imports torch).

One small class per algorithm, built from a `SchedulerConfig` (the manifest's ``scheduler`` entry)::

    scheduler = make_scheduler(config)
    scheduler.set_timesteps(n)
    x = config.init_noise_sigma * rng.standard_normal(shape)
    for t in scheduler.timesteps:
        out = denoise(x, t)
        noise = rng.standard_normal(x.shape) if scheduler.stochastic else None
        x = scheduler.step(out, t, x, noise).prev_sample

The same loop with the arrays left where the model runs (NumPy here; CuPy arrays with ``xp=cupy``): the scheduler
gives each step's coefficients on the host (`StepCoefficients`) and `apply_coefficients` combines the arrays::

    history = None
    for coeffs, t in zip(trajectory_coefficients(scheduler), scheduler.timesteps):
        out = denoise(x, t)
        noise = rng.standard_normal(x.shape) if scheduler.stochastic else None
        step = apply_coefficients(coeffs, x, out, history, noise, xp=np)
        x, history = step.prev_sample, step.pred_original_sample
"""

from __future__ import annotations

from medsr.bundle.scheduler import SchedulerConfig

from .common import (
    StepCoefficients,
    StepOutput,
    add_noise,
    alphas_cumprod,
    apply_coefficients,
    predict_x0_eps,
    training_target,
    trajectory_coefficients,
    x0_eps_coefficients,
)
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmsolver import DPMSolverPlusPlus2MScheduler
from .flow_euler import FlowEulerScheduler
from .latentsr import LatentSRScheduler

_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmsolver++": DPMSolverPlusPlus2MScheduler,
    "flow_euler": FlowEulerScheduler,
    "latentsr": LatentSRScheduler,
}


def make_scheduler(config: SchedulerConfig):
    """The scheduler object for ``config.algorithm``."""
    return _SCHEDULERS[config.algorithm](config)


__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverPlusPlus2MScheduler",
    "FlowEulerScheduler",
    "LatentSRScheduler",
    "SchedulerConfig",
    "StepCoefficients",
    "StepOutput",
    "add_noise",
    "alphas_cumprod",
    "apply_coefficients",
    "make_scheduler",
    "predict_x0_eps",
    "training_target",
    "trajectory_coefficients",
    "x0_eps_coefficients",
]
