"""The scheduler config, the training table, the forward process and the errors every sampler shares."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from medsr.engine.schedulers import (
    SchedulerConfig,
    add_noise,
    alphas_cumprod,
    make_scheduler,
    predict_x0_eps,
    training_target,
)
from medsr.errors import BundleError, InputError

SHAPE = (2, 3, 4, 4)

#: one config per algorithm, each with a non-default field so that a lost field shows
CONFIGS = [
    SchedulerConfig(algorithm="ddim", eta=0.5, timestep_spacing="trailing", prediction_type="v_prediction"),
    SchedulerConfig(algorithm="ddpm", beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="sample"),
    SchedulerConfig(algorithm="dpmsolver++", timestep_spacing="linspace", beta_schedule="scaled_linear"),
    SchedulerConfig(algorithm="flow_euler", prediction_type="flow", flow_shift=3.0),
    SchedulerConfig(algorithm="flow_euler", prediction_type="flow", flow_convention="latentsr"),
    SchedulerConfig(
        algorithm="latentsr",
        beta_schedule="cosine",
        prediction_type="sample",
        reversed_table=True,
        init_noise_sigma=0.5,
    ),
]


def _trajectory(config: SchedulerConfig, steps: int = 6) -> list[np.ndarray]:
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(3)
    x = config.init_noise_sigma * rng.standard_normal(SHAPE)
    outs = []
    for t in scheduler.timesteps:
        noise = rng.standard_normal(SHAPE) if scheduler.stochastic else None
        step = scheduler.step(np.tanh(x) * 0.5 + 1e-3 * float(t), t, x, noise)
        x = step.prev_sample
        outs += [step.prev_sample, step.pred_original_sample]
    return outs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.algorithm)
def test_config_roundtrip_gives_same_steps(config):
    """save -> JSON -> load gives an equal config and bit-identical steps (diffusers' check_over_configs), and
    the steps depend on every field the config moves off its default, so that a field lost or retyped on the
    way would show in them."""
    loaded = SchedulerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert loaded == config
    reference = _trajectory(config)
    reloaded = _trajectory(loaded)
    assert len(reloaded) == len(reference) > 0
    for a, b in zip(reloaded, reference):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    checked = []
    for field in dataclasses.fields(SchedulerConfig):
        if getattr(config, field.name) == field.default:
            continue
        try:
            changed = dataclasses.replace(config, **{field.name: field.default})
        except InputError:  # the default does not fit the rest (the paper's loop needs x0 prediction)
            continue
        other = _trajectory(changed)
        assert len(other) != len(reference) or any(not np.array_equal(a, b) for a, b in zip(other, reference)), (
            f"resetting {field.name} does not change the steps"
        )
        checked.append(field.name)
    assert checked


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.algorithm)
def test_set_timesteps_resets_the_scheduler(config):
    """A second run on the same object repeats the first exactly (multistep history and step counters reset)."""
    scheduler = make_scheduler(config)
    first = _run(scheduler)
    np.testing.assert_array_equal(_run(scheduler), first)


def _run(scheduler, steps: int = 5) -> np.ndarray:
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE)
    for t in scheduler.timesteps:
        noise = rng.standard_normal(SHAPE) if scheduler.stochastic else None
        x = scheduler.step(np.sin(x), t, x, noise).prev_sample
    return x


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.algorithm)
def test_every_scheduler_keeps_float32(config):
    scheduler = make_scheduler(config)
    scheduler.set_timesteps(3)
    assert scheduler.init_noise_sigma == config.init_noise_sigma
    x = np.full(SHAPE, 0.3, np.float32)
    for t in scheduler.timesteps:
        noise = np.zeros(SHAPE, np.float32) if scheduler.stochastic else None
        out = scheduler.step(np.full(SHAPE, 0.1, np.float32), t, x, noise)
        assert out.prev_sample.dtype == np.float32 and out.pred_original_sample.dtype == np.float32
        x = out.prev_sample


def test_engine_schedulers_import_without_torch():
    """medsr.engine.schedulers runs with torch and diffusers made unimportable."""
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers'): sys.modules[name] = None\n"
        "from medsr.engine.schedulers import SchedulerConfig, make_scheduler\n"
        "s = make_scheduler(SchedulerConfig(algorithm='dpmsolver++')); s.set_timesteps(3)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "entry, named",
    [
        ({"algorithm": "euler_a"}, "euler_a"),  # unknown algorithm
        ({"beta_schedule": "sigmoid"}, "sigmoid"),  # unknown schedule
        ({"num_train_timesteps": "1000"}, "num_train_timesteps"),  # a string where an int belongs
        ({"clip_sample": 1}, "clip_sample"),  # an int where a bool belongs
        ({"eta": -0.1}, "eta"),  # negative eta
        ({"default_steps": 2000}, "default_steps"),  # more steps than training timesteps
        ({"num_train_timesteps": True}, "num_train_timesteps"),  # bool is not an int
        ({"betas": [0.1]}, "betas"),  # unknown key
        ({"algorithm": "latentsr", "prediction_type": "epsilon"}, "epsilon"),  # the paper's loop is x0 only
        ({"algorithm": "ddim", "prediction_type": "flow"}, "flow"),  # velocity of another path
        ({"init_noise_sigma": float("nan")}, "init_noise_sigma"),  # not finite
    ],
)
def test_from_dict_refuses_bad_entries_by_name(entry, named):
    with pytest.raises(BundleError, match=named):
        SchedulerConfig.from_dict(entry)


def test_from_dict_refuses_a_non_object():
    with pytest.raises(BundleError, match="list"):
        SchedulerConfig.from_dict(["ddim"])


def test_from_dict_fills_defaults_and_stores_floats():
    config = SchedulerConfig.from_dict({"eta": 1})
    assert config.algorithm == "ddim" and isinstance(config.eta, float) and config.eta == 1.0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.algorithm)
def test_step_before_set_timesteps_says_what_to_do(config):
    scheduler = make_scheduler(config)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, 0, x, np.zeros_like(x))


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_set_timesteps_refuses_bad_counts(steps):
    with pytest.raises(InputError, match="num_inference_steps"):
        make_scheduler(SchedulerConfig()).set_timesteps(steps)


def test_stochastic_step_needs_noise_of_the_sample_shape():
    scheduler = make_scheduler(SchedulerConfig(algorithm="ddim", eta=1.0))
    scheduler.set_timesteps(4)
    assert scheduler.stochastic
    x = np.ones(SHAPE, np.float32)
    t = scheduler.timesteps[0]
    with pytest.raises(InputError, match="noise"):
        scheduler.step(x, t, x)
    with pytest.raises(InputError, match="shape"):
        scheduler.step(x, t, x, np.ones((1, 3, 4, 4)))


def test_step_refuses_a_timestep_outside_the_table():
    scheduler = make_scheduler(SchedulerConfig())
    scheduler.set_timesteps(4)
    x = np.ones(SHAPE)
    with pytest.raises(InputError, match="1000"):
        scheduler.step(x, 1000, x)


@pytest.mark.parametrize(
    "config, stochastic",
    [
        (SchedulerConfig(algorithm="ddim"), False),
        (SchedulerConfig(algorithm="ddim", eta=0.1), True),
        (SchedulerConfig(algorithm="ddpm"), True),
        (SchedulerConfig(algorithm="dpmsolver++"), False),
    ],
)
def test_stochastic_flag(config, stochastic):
    assert make_scheduler(config).stochastic is stochastic


def test_ddim_float32_close_to_diffusers_float32():
    """float32 in, float32 out, within float32 table rounding of diffusers' own float32 run."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ours = make_scheduler(SchedulerConfig(algorithm="ddim", timestep_spacing="trailing"))
    theirs = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    y = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        x = ours.step(np.tanh(x), t, x).prev_sample
        y = theirs.step(torch.tanh(y), int(t), y).prev_sample
    assert x.dtype == np.float32
    assert np.max(np.abs(x - y.numpy())) / np.max(np.abs(y.numpy())) < 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_adapter_inverts_the_forward_process(prediction_type):
    """For x_t built from known (x0, eps), the adapter recovers both from the matching model output."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    if prediction_type == "flow":
        sigma = 0.3
        alpha = 1 - sigma
    else:
        alpha = 0.6
        sigma = np.sqrt(1 - alpha**2)
    output = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}
    got_x0, got_eps = predict_x0_eps(output[prediction_type], alpha * x0 + sigma * eps, alpha, sigma, prediction_type)
    np.testing.assert_allclose(got_x0, x0, atol=1e-12)
    np.testing.assert_allclose(got_eps, eps, atol=1e-12)


# ---------------------------------------------------------------- against diffusers' tables and forward process

TABLE_CASES = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
]


@pytest.mark.parametrize("kw", TABLE_CASES, ids=lambda kw: kw["beta_schedule"])
def test_alphas_cumprod_matches_diffusers(kw):
    """float64 here vs diffusers' float32 table: equal up to float32 cumprod rounding (measured max 1.3e-5)."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(**kw).alphas_cumprod.double().numpy()
    ours = alphas_cumprod(SchedulerConfig(**kw))
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    np.testing.assert_allclose(ours, theirs, rtol=3e-5)


def test_cosine_table_is_the_uncapped_squaredcos():
    """ "cosine" equals diffusers' capped table wherever the 0.999 cap does not bite (all but the last entry)."""
    capped = alphas_cumprod(SchedulerConfig(beta_schedule="squaredcos_cap_v2"))
    cosine = alphas_cumprod(SchedulerConfig(beta_schedule="cosine"))
    np.testing.assert_allclose(cosine[:-1], capped[:-1], rtol=1e-12)
    assert cosine[-1] < 1e-30 < capped[-1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kw", TABLE_CASES, ids=lambda kw: kw["beta_schedule"])
def test_add_noise_and_target_match_diffusers(kw, prediction_type):
    """add_noise vs DDPMScheduler.add_noise, and the v target vs get_velocity, in float64."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = SchedulerConfig(prediction_type=prediction_type, **kw)
    theirs = diffusers.DDPMScheduler(**kw)
    theirs.alphas_cumprod = torch.from_numpy(alphas_cumprod(config))  # the table is checked above
    rng = np.random.default_rng(5)
    x0, eps = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    t = np.array([0, 999], np.int64)
    args = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
    np.testing.assert_allclose(add_noise(x0, eps, t, config), theirs.add_noise(*args).numpy(), rtol=1e-12)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": theirs.get_velocity(*args).numpy()}[prediction_type]
    np.testing.assert_allclose(training_target(x0, eps, t, config), expected, rtol=1e-12)


def test_add_noise_keeps_dtype_and_reads_reversed_tables_backwards():
    x0 = np.ones(SHAPE, np.float32)
    eps = np.zeros(SHAPE, np.float32)
    forward = SchedulerConfig(beta_schedule="cosine")
    backward = SchedulerConfig(beta_schedule="cosine", reversed_table=True)
    out = add_noise(x0, eps, 0, backward)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, add_noise(x0, eps, 999, forward))
    assert np.all(out < 1e-6)  # timestep 0 of the paper's table is pure noise


def test_add_noise_refuses_timesteps_outside_the_table():
    x = np.zeros(SHAPE)
    with pytest.raises(InputError, match="999"):
        add_noise(x, x, np.array([3, 1000]), SchedulerConfig())
    with pytest.raises(InputError, match="integers"):
        add_noise(x, x, 0.5, SchedulerConfig())


@pytest.mark.parametrize("algorithm", ["ddim", "ddpm", "dpmsolver++"])
def test_reversed_table_feeds_reversed_timesteps_and_samples_the_same(algorithm):
    """A model trained on the paper's reversed indexing sampled by a respaced sampler: timesteps T - 1 - k, and
    the same trajectory as the forward-indexed model."""
    forward = SchedulerConfig(algorithm=algorithm, beta_schedule="cosine", prediction_type="sample")
    backward = SchedulerConfig(
        algorithm=algorithm, beta_schedule="cosine", prediction_type="sample", reversed_table=True
    )
    results = []
    for config, to_forward in ((forward, lambda t: t), (backward, lambda t: 999 - t)):
        scheduler = make_scheduler(config)
        scheduler.set_timesteps(6)
        results.append(scheduler.timesteps)
        rng = np.random.default_rng(0)
        x = rng.standard_normal(SHAPE)
        for t in scheduler.timesteps:
            noise = rng.standard_normal(SHAPE) if scheduler.stochastic else None
            x = scheduler.step(np.tanh(x) * np.cos(to_forward(int(t)) / 300), t, x, noise).prev_sample
        results.append(x)
    np.testing.assert_array_equal(results[2], 999 - results[0])
    np.testing.assert_array_equal(results[3], results[1])


@pytest.mark.parametrize("algorithm", ["ddim", "ddpm", "dpmsolver++"])
def test_steps_offset_past_the_table_is_refused(algorithm):
    scheduler = make_scheduler(SchedulerConfig(algorithm=algorithm, steps_offset=5))
    with pytest.raises(InputError, match="steps_offset"):
        scheduler.set_timesteps(1000)


# ---------------------------------------------------------------- timestep spacing, every step count


def _spaced(algorithm: str, spacing: str) -> SchedulerConfig:
    """A config of ``algorithm`` on the default 1000-entry table with ``spacing`` (ignored by flow and latentsr)."""
    if algorithm.startswith("flow_euler"):
        convention = "latentsr" if algorithm.endswith("latentsr") else "diffusers"
        return SchedulerConfig(algorithm="flow_euler", prediction_type="flow", flow_convention=convention)
    reversed_table = algorithm == "latentsr"  # the paper's own indexing
    return SchedulerConfig(
        algorithm=algorithm, prediction_type="sample", timestep_spacing=spacing, reversed_table=reversed_table
    )


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(
    "algorithm", ["ddim", "ddpm", "dpmsolver++", "latentsr", "flow_euler/diffusers", "flow_euler/latentsr"]
)
def test_every_step_count_gives_that_many_timesteps(algorithm, spacing):
    """For every n in 1..T: exactly n model calls, noisiest first, none outside the table (or the flow's range).

    Before the integer spacing, trailing gave n + 1 timesteps ending at -1 for 62 of these n (61, 103, 121, ...).
    """
    config = _spaced(algorithm, spacing)
    scheduler = make_scheduler(config)
    T = config.num_train_timesteps
    for n in range(1, T + 1):
        scheduler.set_timesteps(n)
        t = scheduler.timesteps
        assert t.shape == (n,), (n, t.shape)
        if algorithm == "latentsr":  # the paper's reversed index i = 0..n-1: table entries T-1, T-2, ... T-n
            np.testing.assert_array_equal(t, np.arange(n))
        elif algorithm.startswith("flow_euler"):
            sigmas = scheduler.sigmas  # noise level at each call, then 0
            assert sigmas.shape == (n + 1,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0, n
            assert np.all(np.diff(sigmas) < 0), n
            if config.flow_convention == "diffusers":  # the model receives sigma * T, in (0, T]
                np.testing.assert_array_equal(t, sigmas[:-1] * T)
            else:  # the model receives int((1 - sigma) (T - 1)): in [0, T - 1], repeating 0 only at n = T
                assert t.dtype == np.int64 and t[0] == 0 and t[-1] <= T - 1, n
                assert np.all(np.diff(t) > 0) if n < T else np.all(np.diff(t) >= 0), n
        else:
            assert t.dtype == np.int64 and t[-1] >= 0 and t[0] <= T - 1, n
            assert np.all(np.diff(t) < 0), (n, t)


# ---------------------------------------------------------------- --sampler: another sampler for the same model


def _paper_config() -> SchedulerConfig:
    from medsr.export.presets import get_preset

    return SchedulerConfig.from_dict(get_preset("latentsr-medvae-4x3").scheduler)


def _default_bundle_config() -> SchedulerConfig:
    from medsr.models import DEFAULT_BUNDLE

    return SchedulerConfig.from_dict(json.loads((DEFAULT_BUNDLE / "medsr.json").read_text())["scheduler"])


def test_ddim_on_the_paper_model_keeps_its_table_and_drops_its_loops_settings():
    """The paper's 0.5 start and 1000 consecutive steps belong to its loop; DDIM starts from N(0, I) at the
    noisiest entry of the same reversed cosine table (the model's timestep 0)."""
    paper = _paper_config()
    assert (paper.algorithm, paper.init_noise_sigma, paper.default_steps) == ("latentsr", 0.5, 1000)
    ddim = paper.with_sampler("ddim")
    assert ddim == SchedulerConfig(
        algorithm="ddim",
        beta_schedule="cosine",
        prediction_type="sample",
        reversed_table=True,
        timestep_spacing="trailing",
        default_steps=50,
    )
    scheduler = make_scheduler(ddim)
    scheduler.set_timesteps(ddim.default_steps)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.timesteps[0] == 0 and len(scheduler.timesteps) == 50
    assert paper.with_sampler("latentsr") is paper


def test_flow_sampler_on_a_variance_preserving_model_is_refused_in_one_line():
    with pytest.raises(InputError) as caught:
        _paper_config().with_sampler("flow_euler")
    assert str(caught.value) == (
        "sampler flow_euler assumes a rectified-flow model; this bundle was trained as variance-preserving "
        "(prediction_type sample, beta_schedule cosine)"
    )


def test_discrete_sampler_on_a_flow_model_is_refused():
    flow = SchedulerConfig(algorithm="flow_euler", prediction_type="sample", flow_convention="latentsr")
    with pytest.raises(InputError, match=r"^sampler ddim assumes a variance-preserving model; .* rectified-flow "):
        flow.with_sampler("ddim")


@pytest.mark.parametrize(
    "sampler, changes",
    [
        ("latentsr", {"init_noise_sigma": 0.5, "default_steps": 1000, "timestep_spacing": "leading"}),
        ("dpmsolver++", {"default_steps": 20}),
        ("ddpm", {"default_steps": 1000}),
    ],
)
def test_samplers_on_the_default_bundle_keep_its_model(sampler, changes):
    """The default bundle (x0 on the capped cosine table, DDIM in 1 step) under each other discrete sampler."""
    default = _default_bundle_config()
    switched = default.with_sampler(sampler)
    expected = {"algorithm": sampler, "timestep_spacing": "trailing", "init_noise_sigma": 1.0, **changes}
    assert switched == dataclasses.replace(default, **expected)
    assert switched.beta_schedule == "squaredcos_cap_v2" and switched.prediction_type == "sample"


def test_switching_resets_every_sampler_field_and_keeps_every_model_field():
    """A bundle tuned its DDIM (eta, clipping, offset, final alpha, leading spacing, 7 steps, 0.8 start): DDPM
    gets none of it, and the model's table (a 500-entry scaled-linear, v prediction) stays."""
    model = {
        "num_train_timesteps": 500,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "reversed_table": True,
    }
    tuned = SchedulerConfig(
        algorithm="ddim",
        eta=0.7,
        clip_sample=True,
        clip_sample_range=2.0,
        steps_offset=1,
        set_alpha_to_one=False,
        init_noise_sigma=0.8,
        default_steps=7,
        **model,
    )
    assert tuned.with_sampler("ddpm") == SchedulerConfig(
        algorithm="ddpm", timestep_spacing="trailing", default_steps=500, **model
    )


def test_the_papers_loop_needs_an_x0_model():
    with pytest.raises(InputError, match="sampler latentsr needs a model that predicts sample; .* predicts epsilon"):
        SchedulerConfig().with_sampler("latentsr")


def test_unknown_sampler_is_refused():
    with pytest.raises(InputError, match="euler_a"):
        SchedulerConfig().with_sampler("euler_a")
