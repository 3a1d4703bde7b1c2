"""The coefficient form of every sampler step (`step_coefficients` + `apply_coefficients`) against `step` itself.

Each case runs two whole trajectories from the same start with the same "model" (a fixed random function of the
sample and t) and the same per-step noise: one through ``scheduler.step``, one through the coefficients alone, each
feeding its own sample to the model. At every step both prev_sample and pred_original_sample must agree to float64
rounding.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from medsr.engine.schedulers import (
    SchedulerConfig,
    StepCoefficients,
    apply_coefficients,
    make_scheduler,
    trajectory_coefficients,
)
from medsr.engine.schedulers.common import predict_x0_eps, x0_eps_coefficients
from medsr.errors import InputError

SHAPE = (2, 3, 4, 4)
TOLERANCE = 1e-12
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

#: the paper's own sampler as its preset configures it (medsr.export.presets.paper, written out here so that this
#: file needs no torch)
PAPER = SchedulerConfig(
    algorithm="latentsr",
    num_train_timesteps=1000,
    beta_schedule="cosine",
    prediction_type="sample",
    reversed_table=True,
    init_noise_sigma=0.5,
    default_steps=1000,
)


def _cases() -> list[tuple[str, SchedulerConfig, int]]:
    """(id, config, steps): every prediction type each algorithm accepts, every spacing, the stochastic settings,
    clipping, both flow conventions and the paper's preset."""
    cases = []
    for prediction in VP_PREDICTIONS:
        for spacing in SPACINGS:
            for eta in (0.0, 0.7):
                config = SchedulerConfig(
                    algorithm="ddim", prediction_type=prediction, timestep_spacing=spacing, eta=eta
                )
                cases.append((f"ddim-{prediction}-{spacing}-eta{eta}", config, 12))
            config = SchedulerConfig(algorithm="ddpm", prediction_type=prediction, timestep_spacing=spacing)
            cases.append((f"ddpm-{prediction}-{spacing}", config, 15))
            config = SchedulerConfig(
                algorithm="dpmsolver++",
                prediction_type=prediction,
                timestep_spacing=spacing,
                beta_schedule="scaled_linear",
            )
            cases.append((f"dpmsolver++-{prediction}-{spacing}", config, 10))
    cases += [
        (
            "ddim-eta1-cosine-offset",
            SchedulerConfig(
                algorithm="ddim", eta=1.0, beta_schedule="squaredcos_cap_v2", steps_offset=1, set_alpha_to_one=False
            ),
            20,
        ),
        (
            "ddim-clip-eta",
            SchedulerConfig(
                algorithm="ddim", prediction_type="sample", clip_sample=True, clip_sample_range=0.8, eta=0.3
            ),
            12,
        ),
        ("ddim-clip-epsilon", SchedulerConfig(algorithm="ddim", clip_sample=True, timestep_spacing="trailing"), 12),
        (
            "ddim-reversed-table",
            SchedulerConfig(
                algorithm="ddim", beta_schedule="cosine", reversed_table=True, prediction_type="v_prediction"
            ),
            10,
        ),
        ("ddim-1-step", SchedulerConfig(algorithm="ddim", timestep_spacing="trailing", eta=0.5), 1),
        ("ddpm-clip", SchedulerConfig(algorithm="ddpm", beta_schedule="squaredcos_cap_v2", clip_sample=True), 20),
        (
            "ddpm-whole-table",
            SchedulerConfig(algorithm="ddpm", num_train_timesteps=100, timestep_spacing="trailing"),
            100,
        ),
        ("dpmsolver++-1-step", SchedulerConfig(algorithm="dpmsolver++", timestep_spacing="trailing"), 1),
        ("dpmsolver++-2-steps", SchedulerConfig(algorithm="dpmsolver++", prediction_type="v_prediction"), 2),
        (
            "dpmsolver++-whole-table",
            SchedulerConfig(
                algorithm="dpmsolver++", num_train_timesteps=100, beta_schedule="cosine", reversed_table=True
            ),
            100,
        ),
        ("dpmsolver++-30", SchedulerConfig(algorithm="dpmsolver++", timestep_spacing="trailing"), 30),
        ("latentsr-paper-preset", PAPER, PAPER.default_steps),
        ("latentsr-paper-100", PAPER, 100),
        (
            "latentsr-forward-table",
            SchedulerConfig(
                algorithm="latentsr",
                beta_schedule="cosine",
                prediction_type="sample",
                num_train_timesteps=50,
                default_steps=50,
            ),
            50,
        ),
        ("latentsr-1-step", PAPER, 1),
    ]
    for convention in ("diffusers", "latentsr"):
        for prediction in ("flow", "sample"):
            for shift in (1.0, 3.0) if convention == "diffusers" else (1.0,):
                config = SchedulerConfig(
                    algorithm="flow_euler", prediction_type=prediction, flow_convention=convention, flow_shift=shift
                )
                cases.append((f"flow-{convention}-{prediction}-shift{shift}", config, 16))
    # the paper's flow convention with n = T repeats timestep 0 (trajectory_coefficients passes the step index)
    config = SchedulerConfig(
        algorithm="flow_euler",
        prediction_type="flow",
        flow_convention="latentsr",
        num_train_timesteps=40,
        default_steps=40,
    )
    cases.append(("flow-latentsr-whole-table", config, 40))
    return cases


CASES = _cases()


def random_model(seed: int = 0):
    """A fixed random "denoiser": smooth and nonlinear in the sample, different at every t."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((SHAPE[1], SHAPE[1])) / np.sqrt(SHAPE[1])
    field = rng.standard_normal(SHAPE)
    bias = rng.standard_normal(SHAPE[1:])

    def model(x: np.ndarray, t: float) -> np.ndarray:
        phase = float(t) / 97.0
        return (
            0.7 * np.tanh(np.einsum("ij,bjhw->bihw", mix, x))
            + 0.5 * np.cos(phase) * field
            + 0.2 * bias * np.sin(x + phase)
        )

    return model


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| (float64 rounding: ~1e-16 times the steps' growth)."""
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-300))


def run_both(config: SchedulerConfig, steps: int, seed: int = 1):
    """The two trajectories: yields (i, t, step() output, coefficient-form output, coefficients)."""
    model = random_model(seed)
    reference, scheduler = make_scheduler(config), make_scheduler(config)
    reference.set_timesteps(steps)
    scheduler.set_timesteps(steps)
    coefficients = trajectory_coefficients(scheduler)
    assert len(coefficients) == len(scheduler.timesteps) == steps
    rng = np.random.default_rng(seed + 100)
    x_ref = x = config.init_noise_sigma * rng.standard_normal(SHAPE)
    history = None
    for i, (t, coeffs) in enumerate(zip(scheduler.timesteps, coefficients)):
        noise = rng.standard_normal(SHAPE) if scheduler.stochastic else None
        ref = reference.step(model(x_ref, t), t, x_ref, noise)
        ours = apply_coefficients(coeffs, x, model(x, t), history, noise)
        yield i, t, ref, ours, coeffs
        x_ref, x, history = ref.prev_sample, ours.prev_sample, ours.pred_original_sample


@pytest.mark.parametrize(("config", "steps"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_coefficient_form_follows_step_along_the_trajectory(config, steps):
    """Same prev_sample and pred_original_sample at every step, stochastic steps included (same noise)."""
    worst = 0.0
    for i, t, ref, ours, coeffs in run_both(config, steps):
        assert ours.prev_sample.dtype == ours.pred_original_sample.dtype == np.float64
        for name in ("prev_sample", "pred_original_sample"):
            err = rel_err(getattr(ours, name), getattr(ref, name))
            assert err <= TOLERANCE, f"step {i} (t={t}) {name}: relative error {err:.3g} ({coeffs})"
            worst = max(worst, err)
        if i == 0:
            assert not coeffs.needs_history
    assert np.isfinite(worst)


@pytest.mark.parametrize(
    "config",
    [SchedulerConfig(algorithm="ddim"), SchedulerConfig(algorithm="ddim", eta=0.5), SchedulerConfig(algorithm="ddpm")],
)
def test_noise_terms_match_the_stochastic_settings(config):
    """DDIM adds noise only with eta > 0; DDPM at every step but the last (k = 0), as diffusers does."""
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(10)
    noisy = [c.needs_noise for c in trajectory_coefficients(scheduler)]
    if config.algorithm == "ddim":
        assert noisy[:-1] == [config.eta > 0] * 9 and not noisy[-1]  # a_prev = 1: sigma = 0 at the last step
    else:
        assert noisy == [True] * 9 + [False]


def test_dpmsolver_history_is_the_previous_x0():
    """The multistep term appears from step 1 to n - 2 (first order at both ends, lower_order_final)."""
    scheduler = make_scheduler(SchedulerConfig(algorithm="dpmsolver++", timestep_spacing="trailing"))
    scheduler.set_timesteps(6)
    uses = [c.needs_history for c in trajectory_coefficients(scheduler)]
    assert uses == [False, True, True, True, True, False]
    last = scheduler.step_coefficients(scheduler.timesteps[-1])
    assert (last.c_sample, last.c_output) == (last.x0_sample, last.x0_output)  # final sigma 0: prev = x0


def test_step_coefficients_leave_the_solver_state_alone():
    """Asking for coefficients (in any order) between steps changes nothing in `step`'s trajectory."""
    config = SchedulerConfig(algorithm="dpmsolver++", timestep_spacing="linspace")
    plain, probed = make_scheduler(config), make_scheduler(config)
    plain.set_timesteps(8)
    probed.set_timesteps(8)
    model = random_model()
    x = np.random.default_rng(5).standard_normal(SHAPE)
    y = x.copy()
    for t in plain.timesteps:
        for u in probed.timesteps[::-1]:
            probed.step_coefficients(u)
        x = plain.step(model(x, t), t, x).prev_sample
        y = probed.step(model(y, t), t, y).prev_sample
        np.testing.assert_array_equal(x, y)


def test_float32_stays_float32_and_agrees_to_float32_rounding():
    """Python-float coefficients keep float32 latents in float32 (what a device loop holds)."""
    config = SchedulerConfig(algorithm="ddim", eta=0.5, prediction_type="v_prediction", timestep_spacing="trailing")
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(8)
    model = random_model()
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    for t, coeffs in zip(scheduler.timesteps, trajectory_coefficients(scheduler)):
        for value in dataclasses.astuple(coeffs):
            assert value is None or type(value) is float
        out = model(x, t).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        ref = scheduler.step(out, t, x, noise)
        ours = apply_coefficients(coeffs, x, out, None, noise)
        assert ours.prev_sample.dtype == ours.pred_original_sample.dtype == np.float32
        assert rel_err(ours.prev_sample, ref.prev_sample) < 1e-5
        assert rel_err(ours.pred_original_sample, ref.pred_original_sample) < 1e-5
        x = ref.prev_sample


def test_apply_uses_only_arithmetic_and_xp_clip():
    """Any array module works as `xp`: the form needs its operators and `xp.clip` (clipping configs) only."""
    config = SchedulerConfig(algorithm="ddpm", clip_sample=True, prediction_type="sample")
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(4)
    calls = []
    xp = types.SimpleNamespace(clip=lambda a, lo, hi: calls.append((lo, hi)) or np.clip(a, lo, hi))
    coeffs = scheduler.step_coefficients(scheduler.timesteps[0])
    assert coeffs.clip_range == 1.0 and coeffs.c_x0 > 0 and coeffs.c_output == 0.0
    x, out, noise = (np.random.default_rng(s).standard_normal(SHAPE) * 2 for s in (0, 1, 2))
    ours = apply_coefficients(coeffs, x, out, None, noise, xp=xp)
    ref = scheduler.step(out, scheduler.timesteps[0], x, noise)
    assert calls == [(-1.0, 1.0)]
    assert np.abs(ours.pred_original_sample).max() == 1.0
    assert rel_err(ours.prev_sample, ref.prev_sample) <= TOLERANCE


@pytest.mark.parametrize("prediction", (*VP_PREDICTIONS, "flow"))
def test_x0_eps_coefficients_match_the_adapter(prediction):
    """x0_eps_coefficients is predict_x0_eps as weights (alpha, sigma of either process)."""
    rng = np.random.default_rng(4)
    x, m = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    alpha, sigma = (0.3, 0.7) if prediction == "flow" else (0.6, 0.8)
    (x0_s, x0_m), (eps_s, eps_m) = x0_eps_coefficients(alpha, sigma, prediction)
    x0, eps = predict_x0_eps(m, x, alpha, sigma, prediction)
    assert rel_err(x0_s * x + x0_m * m, x0) <= TOLERANCE
    assert rel_err(eps_s * x + eps_m * m, eps) <= TOLERANCE


def test_missing_history_or_noise_is_refused():
    dpm = make_scheduler(SchedulerConfig(algorithm="dpmsolver++"))
    dpm.set_timesteps(5)
    x = np.zeros(SHAPE)
    with pytest.raises(InputError, match="history"):
        apply_coefficients(dpm.step_coefficients(dpm.timesteps[1]), x, x)
    ddpm = make_scheduler(SchedulerConfig(algorithm="ddpm"))
    ddpm.set_timesteps(5)
    with pytest.raises(InputError, match="noise"):
        apply_coefficients(ddpm.step_coefficients(ddpm.timesteps[0]), x, x)
    apply_coefficients(ddpm.step_coefficients(ddpm.timesteps[-1]), x, x)  # the last DDPM step adds none


@pytest.mark.parametrize("algorithm", ["ddim", "ddpm", "dpmsolver++", "flow_euler", "latentsr"])
def test_step_coefficients_refuse_bad_calls(algorithm):
    prediction = {"flow_euler": "flow", "latentsr": "sample"}.get(algorithm, "epsilon")
    scheduler = make_scheduler(SchedulerConfig(algorithm=algorithm, prediction_type=prediction))
    with pytest.raises(RuntimeError, match="step_coefficients.*set_timesteps"):
        scheduler.step_coefficients(0)
    scheduler.set_timesteps(5)
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    with pytest.raises(InputError, match="step 1"):
        scheduler.step_coefficients(t0, step_index=1)
    with pytest.raises(InputError, match="step_index"):
        scheduler.step_coefficients(t0, step_index=5)
    assert scheduler.step_coefficients(t1, step_index=1) == scheduler.step_coefficients(t1)


def test_repeated_timestep_needs_the_step_index():
    scheduler = make_scheduler(
        SchedulerConfig(
            algorithm="flow_euler",
            prediction_type="flow",
            flow_convention="latentsr",
            num_train_timesteps=8,
            default_steps=8,
        )
    )
    scheduler.set_timesteps(8)
    assert scheduler.timesteps[0] == scheduler.timesteps[1] == 0
    with pytest.raises(InputError, match="pass step_index"):
        scheduler.step_coefficients(0)
    first, second = scheduler.step_coefficients(0, step_index=0), scheduler.step_coefficients(0, step_index=1)
    assert first.x0_output != second.x0_output  # sigma 1 then 7/8


def test_coefficients_are_frozen():
    coeffs = StepCoefficients(c_sample=1, c_output=0.5, x0_sample=0, x0_output=1)
    assert type(coeffs.c_sample) is float
    with pytest.raises(dataclasses.FrozenInstanceError):
        coeffs.c_sample = 2.0
