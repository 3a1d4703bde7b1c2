"""The scheduler configuration: the manifest's ``scheduler`` section, which sampler the model was trained for."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from medsr.errors import BundleError, InputError

ALGORITHMS = ("ddim", "ddpm", "dpmsolver++", "flow_euler", "latentsr")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FLOW_CONVENTIONS = ("diffusers", "latentsr")

#: prediction types each algorithm accepts. The variance-preserving samplers cannot use a velocity of the
#: rectified-flow path; the flow sampler needs x0 recoverable at sigma = 1 (so no epsilon); the paper's sampler
#: is exact only for its own x0 models.
SUPPORTED_PREDICTIONS = {
    "ddim": ("epsilon", "v_prediction", "sample"),
    "ddpm": ("epsilon", "v_prediction", "sample"),
    "dpmsolver++": ("epsilon", "v_prediction", "sample"),
    "flow_euler": ("flow", "sample"),
    "latentsr": ("sample",),
}

#: the forward process each sampler assumes the model was trained on: a discrete variance-preserving table
#: (x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; the paper's loop walks its reversed x0 table) or a rectified
#: flow (x = (1 - sigma) x0 + sigma eps)
PROCESSES = {
    "ddim": "variance-preserving",
    "ddpm": "variance-preserving",
    "dpmsolver++": "variance-preserving",
    "flow_euler": "rectified-flow",
    "latentsr": "variance-preserving",
}

#: the fields the trained model fixes (its table, how it reads timesteps, what it outputs; its process is its
#: algorithm's `PROCESSES` entry); every other field but ``algorithm`` belongs to the sampler
MODEL_FIELDS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "reversed_table",
    "flow_convention",
)


@dataclass(frozen=True)
class SchedulerConfig:
    """Everything a sampler and the training loop need to agree on; lives in the manifest's ``scheduler`` entry.

    The `MODEL_FIELDS` describe the trained model; ``algorithm`` and the other fields its sampler, which
    `with_sampler` replaces.

    Attributes:
        algorithm (`str`, defaults to ``"ddim"``): the sampler, one of ``"ddim"``, ``"ddpm"``, ``"dpmsolver++"``,
            ``"flow_euler"``, ``"latentsr"`` (the paper's own x0 loop).
        num_train_timesteps (`int`, defaults to 1000): T, the length of the training table.
        beta_schedule (`str`, defaults to ``"linear"``): ``"linear"`` (betas evenly spaced in [beta_start,
            beta_end]), ``"scaled_linear"`` (square roots evenly spaced, Stable Diffusion), ``"squaredcos_cap_v2"``
            (Nichol & Dhariwal 2021 eq. 17 with s = 0.008 and betas capped at 0.999, as diffusers builds it),
            ``"cosine"`` (the same alpha_bar without the cap, alpha_bar[k] = f((k+1)/T) / f(0): the table of the
            paper's code before it is stored reversed). Ignored by ``flow_euler``.
        beta_start (`float`, defaults to 0.0001): first beta of the (scaled) linear schedules.
        beta_end (`float`, defaults to 0.02): last beta of the (scaled) linear schedules.
        prediction_type (`str`, defaults to ``"epsilon"``): what the denoiser outputs: ``"epsilon"`` (the noise),
            ``"v_prediction"`` (v = alpha eps - sigma x0), ``"sample"`` (x0), ``"flow"`` (the rectified-flow
            velocity, see ``flow_convention``). Each algorithm accepts those of ``SUPPORTED_PREDICTIONS``.
        timestep_spacing (`str`, defaults to ``"leading"``): how ``set_timesteps`` picks the discrete timesteps
            (Lin et al. 2023, Table 2): ``"leading"``, ``"trailing"`` or ``"linspace"``, each as the matching
            diffusers scheduler defines it. Ignored by ``flow_euler`` and ``latentsr``.
        steps_offset (`int`, defaults to 0): added to every ``"leading"`` timestep (Stable Diffusion uses 1).
        eta (`float`, defaults to 0.0): DDIM only: the weight of the noise of DDIM eq. 16 (0 = deterministic,
            1 = DDPM-like). Must be >= 0.
        clip_sample (`bool`, defaults to False): DDIM and DDPM: clip the predicted x0 to
            [-clip_sample_range, clip_sample_range].
        clip_sample_range (`float`, defaults to 1.0): the bound used when ``clip_sample``.
        set_alpha_to_one (`bool`, defaults to True): DDIM only: after the last step alpha_bar_prev = 1 (True) or
            alpha_bar[0] (False).
        init_noise_sigma (`float`, defaults to 1.0): standard deviation of the initial Gaussian; the caller draws
            ``init_noise_sigma * N(0, I)`` (the paper's sampler starts from 0.5 * N(0, I)).
        default_steps (`int`, defaults to 50): the number of steps when the user gives none.
        reversed_table (`bool`, defaults to False): the model's timestep input counts the table backwards
            (timestep 0 = noisiest), as the paper's code stores its cosine table reversed. The discrete samplers
            then feed ``T - 1 - k`` for table index k, and ``add_noise`` / ``training_target`` read ``t`` that way.
        flow_shift (`float`, defaults to 1.0): ``flow_euler`` with the diffusers convention: the time shift
            sigma' = shift sigma / (1 + (shift - 1) sigma) of Esser et al. 2024 (SD3 uses 3.0). Must be > 0.
        flow_convention (`str`, defaults to ``"diffusers"``): the meaning of time and velocity for ``flow_euler``:
            ``"diffusers"``: x_sigma = (1 - sigma) x0 + sigma eps, velocity eps - x0, model timestep sigma * T
            (float), sigmas from 1 to 1/T then 0 (FlowMatchEulerDiscreteScheduler).
            ``"latentsr"``: the paper's flow-matching ablation: z_t = (1 - t) eps + t z_HR with t the data
            fraction, velocity z_HR - eps, t_i = i / n for i = 0..n-1 (dt = 1 / n), model timestep
            int(t * (T - 1)) (int64).
    """

    algorithm: str = "ddim"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    eta: float = 0.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    init_noise_sigma: float = 1.0
    default_steps: int = 50
    reversed_table: bool = False
    flow_shift: float = 1.0
    flow_convention: str = "diffusers"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
            if f.type == "float":
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        for name, allowed in (
            ("algorithm", ALGORITHMS),
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
            ("flow_convention", FLOW_CONVENTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise InputError(f"scheduler `{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        for name, ok, rule in (
            ("num_train_timesteps", self.num_train_timesteps >= 2, ">= 2"),
            ("beta_start", 0.0 < self.beta_start < 1.0, "in (0, 1)"),
            ("beta_end", 0.0 < self.beta_end < 1.0, "in (0, 1)"),
            ("steps_offset", self.steps_offset >= 0, ">= 0"),
            ("eta", self.eta >= 0.0, ">= 0"),
            ("clip_sample_range", self.clip_sample_range > 0.0, "> 0"),
            ("init_noise_sigma", self.init_noise_sigma > 0.0, "> 0"),
            ("default_steps", 1 <= self.default_steps <= self.num_train_timesteps, "in [1, num_train_timesteps]"),
            ("flow_shift", self.flow_shift > 0.0, "> 0"),
        ):
            if not (ok and np.isfinite(getattr(self, name))):
                raise InputError(f"scheduler `{name}` must be {rule}, got {getattr(self, name)!r}")
        supported = SUPPORTED_PREDICTIONS[self.algorithm]
        if self.prediction_type not in supported:
            raise InputError(
                f"scheduler `prediction_type` {self.prediction_type!r} does not work with algorithm "
                f"{self.algorithm!r}; use one of {supported}"
            )
        if self.flow_convention == "latentsr" and self.flow_shift != 1.0:
            raise InputError(
                f"scheduler `flow_shift` must be 1.0 with flow_convention 'latentsr', got {self.flow_shift!r}"
            )

    @property
    def process(self) -> str:
        """The forward process the model was trained on, as its sampler assumes it (`PROCESSES`)."""
        return PROCESSES[self.algorithm]

    def with_sampler(self, algorithm: str) -> SchedulerConfig:
        """The same trained model sampled by ``algorithm`` (``--sampler``).

        The `MODEL_FIELDS` are kept; the sampler's fields start from `sampler_defaults`, not from the bundle's
        tuning of its own sampler (the paper's 0.5 initial noise and 1000 steps are its loop's, not DDIM's).
        Asking for the bundle's own algorithm returns the config unchanged.

        Raises:
            InputError: an unknown sampler, one that assumes another process than the model's, or one that
                cannot use the model's prediction type; one line naming both.
        """
        if algorithm == self.algorithm:
            return self
        if algorithm not in ALGORITHMS:
            raise InputError(f"unknown sampler {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if PROCESSES[algorithm] != self.process:
            trained = (
                f"flow_convention {self.flow_convention}"
                if self.process == "rectified-flow"
                else f"beta_schedule {self.beta_schedule}"
            )
            raise InputError(
                f"sampler {algorithm} assumes a {PROCESSES[algorithm]} model; this bundle was trained as "
                f"{self.process} (prediction_type {self.prediction_type}, {trained})"
            )
        if self.prediction_type not in SUPPORTED_PREDICTIONS[algorithm]:
            raise InputError(
                f"sampler {algorithm} needs a model that predicts {' or '.join(SUPPORTED_PREDICTIONS[algorithm])}; "
                f"this bundle's model predicts {self.prediction_type}"
            )
        model = {name: getattr(self, name) for name in MODEL_FIELDS}
        return SchedulerConfig(algorithm=algorithm, **model, **sampler_defaults(algorithm, self.num_train_timesteps))

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (every field, by name)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SchedulerConfig:
        """Build a config from a manifest's ``scheduler`` entry; missing keys take their defaults.

        Raises:
            BundleError: an unknown key or a value of the wrong type or out of range, naming the key and value.
        """
        if not isinstance(d, dict):
            raise BundleError(f"manifest `scheduler` must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"manifest `scheduler` has unknown key(s) {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**d)
        except InputError as exc:
            raise BundleError(f"manifest {exc}") from exc


def sampler_defaults(algorithm: str, num_train_timesteps: int) -> dict:
    """The sampler fields ``algorithm`` starts from when it replaces a bundle's own sampler (`with_sampler`).

    The `SchedulerConfig` defaults (no offset, eta 0, no clipping, alpha_bar_prev = 1 at the end, shift 1,
    1.0 N(0, I) start), except: the respaced samplers use trailing spacing, whose first timestep is T - 1, where
    the N(0, I) start belongs (Lin et al. 2023, Table 2; leading starts below it), and each its usual step count
    (diffusers' pipelines: DDIM 50, DDPM the whole table, DPM-Solver++ 20); the paper's loop starts from
    0.5 N(0, I) and runs its code's default of the whole table (docs/sources.md, "The method").
    """
    T = num_train_timesteps
    return {
        "ddim": {"timestep_spacing": "trailing", "default_steps": min(50, T)},
        "ddpm": {"timestep_spacing": "trailing", "default_steps": T},
        "dpmsolver++": {"timestep_spacing": "trailing", "default_steps": min(20, T)},
        "flow_euler": {"default_steps": min(50, T)},
        "latentsr": {"init_noise_sigma": 0.5, "default_steps": T},
    }[algorithm]


def _check_type(name: str, value: object, annotation: str) -> None:
    """Refuse a value whose JSON type does not fit the field (bool is not an int; an int is a float)."""
    expected = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}[annotation]
    if isinstance(value, bool) and annotation != "bool" or not isinstance(value, expected):
        raise InputError(f"scheduler `{name}` must be of type {annotation}, got {value!r}")
