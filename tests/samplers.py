"""Scheduler configurations that cover every sampler of medsr.engine.schedulers, for the device-loop tests."""

from medsr.engine.schedulers import SchedulerConfig

#: every sampler of medsr.engine.schedulers, deterministic and stochastic (ddim with eta > 0, ddpm), with clipping
SAMPLERS = {
    "ddim": SchedulerConfig(algorithm="ddim", prediction_type="sample"),
    "ddim-eta-stochastic": SchedulerConfig(algorithm="ddim", prediction_type="epsilon", eta=0.7),
    "ddim-clip-stochastic": SchedulerConfig(algorithm="ddim", prediction_type="sample", clip_sample=True, eta=0.3),
    "ddpm-stochastic": SchedulerConfig(algorithm="ddpm", prediction_type="v_prediction"),
    "dpmsolver++": SchedulerConfig(algorithm="dpmsolver++", prediction_type="epsilon"),
    "flow_euler": SchedulerConfig(algorithm="flow_euler", prediction_type="flow"),
    "latentsr": SchedulerConfig(
        algorithm="latentsr",
        prediction_type="sample",
        beta_schedule="cosine",
        reversed_table=True,
        init_noise_sigma=0.5,
    ),
}
