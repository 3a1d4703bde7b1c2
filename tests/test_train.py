"""Tests of medsr.export.train and medsr-train on the ``tiny`` preset: the loss goes down, resuming after an
interruption repeats the uninterrupted run bit for bit, checkpoints refuse mismatches, the weights file loads
into medsr-export, and the CLI runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner
from safetensors.torch import load_file

from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.cli.export import export
from medsr.cli.train import cli
from medsr.data.pairs import Slice
from medsr.engine.schedulers import SchedulerConfig
from medsr.errors import CheckpointError, InputError, OutputError
from medsr.export.builder import build_models
from medsr.export.models import build_vae
from medsr.export.objective import SCHEDULER_KEY, objective_fields
from medsr.export.presets import get_preset
from medsr.export.train import denoiser as denoiser_module
from medsr.export.train.denoiser import DenoiserConfig, sample_timesteps, train_denoiser
from medsr.export.train.loop import LoopConfig
from medsr.export.train.vae import VaeConfig, train_vae
from medsr.export.train.weights import save_prefixed

TINY = get_preset("tiny")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and far faster than on two when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_slices(size: int, count: int = 8) -> list[Slice]:
    """``count`` smooth ``size`` x ``size`` images in [-1, 1] (cumulative sums of noise): structure a model can learn
    quickly."""
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        image = np.cumsum(np.cumsum(rng.standard_normal((size, size)), axis=0), axis=1)
        image = 2 * (image - image.min()) / (image.max() - image.min()) - 1
        out.append(Slice("synthetic", "mri", 2, index, image.astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def slices() -> list[Slice]:
    """Eight smooth 48 x 48 images."""
    return smooth_slices(48)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_prefixed(path, {"vae.": build_vae(TINY.vae).state_dict()})
    return path


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vae_training_lowers_the_loss(tmp_path, slices):
    loop = LoopConfig(steps=30, batch_size=4, lr=3e-3, ema_decay=0.0, log_every=1, checkpoint_every=30)
    out = train_vae(tmp_path, TINY, slices, loop, VaeConfig(crop=32), torch.device("cpu"), progress=False)
    losses = _losses(tmp_path)
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert set(load_file(str(out))) == {f"vae.{k}" for k in build_vae(TINY.vae).state_dict()}


def test_denoiser_training_lowers_the_loss_and_exports(tmp_path, slices, vae_file):
    loop = LoopConfig(steps=30, batch_size=8, lr=3e-3, ema_decay=0.9, log_every=1, checkpoint_every=30)
    objective = DenoiserConfig(pairs=32, crop=32, terminal_fraction=0.25)
    out = train_denoiser(tmp_path, TINY, vae_file, slices, loop, objective, torch.device("cpu"), progress=False)
    losses = _losses(tmp_path)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    _, _, provenance = build_models(TINY, str(out))  # the file medsr-export --weights takes
    assert provenance["weights"]["source"] == "file"
    assert provenance["objective"] == {"source": "weights", "scheduler": objective_fields(objective.scheduler(TINY))}


def test_denoiser_trains_on_whole_slice_zero_fills_under_the_upsampled_conditioning(tmp_path, slices, vae_file):
    preset = dataclasses.replace(TINY, conditioning=Conditioning(UPSAMPLED, "zerofill", residual=True))
    loop = LoopConfig(steps=20, batch_size=8, lr=3e-3, ema_decay=0.9, log_every=1, checkpoint_every=20)
    objective = DenoiserConfig(pairs=16, crop=32, loss="l2", terminal_fraction=0.5)
    out = train_denoiser(tmp_path, preset, vae_file, slices, loop, objective, torch.device("cpu"), progress=False)
    cache = load_file(str(tmp_path / denoiser_module.LATENT_CACHE))
    assert cache["lr"].shape == cache["hr"].shape == (16, 4, 8, 8)  # HR-size conditioning latents
    losses = _losses(tmp_path)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    _, unet, _ = build_models(preset, str(out))
    assert unet.config.in_channels == 8


def _denoiser_run(run_dir, slices, vae_file, resume=False):
    loop = LoopConfig(steps=6, batch_size=4, lr=1e-3, ema_decay=0.9, log_every=1, checkpoint_every=2)
    objective = DenoiserConfig(pairs=16, crop=32, loss="l2", prediction_type="v_prediction")
    return train_denoiser(run_dir, TINY, vae_file, slices, loop, objective, torch.device("cpu"), resume, False)


def test_resume_after_interruption_is_exact(tmp_path, slices, vae_file, monkeypatch):
    straight = load_file(str(_denoiser_run(tmp_path / "straight", slices, vae_file)))
    real_loss, calls = denoiser_module.denoiser_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C during step 4: steps 1-3 are done, the last checkpoint is at step 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(denoiser_module, "denoiser_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _denoiser_run(tmp_path / "resumed", slices, vae_file)
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3  # saved on interrupt: nothing lost
    monkeypatch.setattr(denoiser_module, "denoiser_loss", real_loss)
    resumed = load_file(str(_denoiser_run(tmp_path / "resumed", slices, vae_file, resume=True)))
    assert set(resumed) == set(straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)


def test_checkpoint_refusals(tmp_path, slices, vae_file):
    _denoiser_run(tmp_path, slices, vae_file)
    with pytest.raises(CheckpointError, match="--resume"):
        _denoiser_run(tmp_path, slices, vae_file)
    loop = LoopConfig(steps=6, batch_size=4, lr=2e-3, log_every=1, checkpoint_every=2)
    with pytest.raises(CheckpointError, match="different 'config'"):
        train_denoiser(
            tmp_path,
            TINY,
            vae_file,
            slices,
            loop,
            DenoiserConfig(pairs=16, crop=32, loss="l2", prediction_type="v_prediction"),
            torch.device("cpu"),
            True,
            False,
        )
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _denoiser_run(tmp_path / "empty", slices, vae_file, resume=True)


def test_negative_contrast_copies_are_refused():
    with pytest.raises(InputError, match="contrast_copies must be >= 0"):
        DenoiserConfig(contrast_copies=-1)


def test_learning_rate_schedule():
    loop = LoopConfig(steps=110, batch_size=1, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert loop.learning_rate(0) == pytest.approx(1e-4)
    assert loop.learning_rate(9) == pytest.approx(1e-3)
    assert loop.learning_rate(60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert loop.learning_rate(110) == pytest.approx(1e-5)
    with pytest.raises(InputError, match="ema_decay"):
        LoopConfig(steps=1, batch_size=1, ema_decay=1.0)
    with pytest.raises(InputError, match="steps"):
        LoopConfig(steps=0, batch_size=1)


@pytest.mark.parametrize(
    "config, noisiest",
    [
        (SchedulerConfig(prediction_type="sample"), 999),  # diffusers orientation: T - 1 is pure noise
        (SchedulerConfig(algorithm="latentsr", prediction_type="sample", reversed_table=True), 0),  # the paper's
        (SchedulerConfig(algorithm="flow_euler", prediction_type="flow"), 1000.0),  # sigma = 1
    ],
)
def test_terminal_fraction_trains_at_the_noisiest_time(config, noisiest):
    t, model_t = sample_timesteps(config, 8, np.random.default_rng(0), terminal_fraction=0.5)
    assert np.all(t[:4] == noisiest) and model_t.dtype == np.float32
    assert len(set(t[4:].tolist())) == 4


def test_cli_help():
    runner = CliRunner()
    for args in ([], ["vae"], ["denoiser"], ["recipe"]):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_cli_tiny_runs(tmp_path):
    data = np.random.default_rng(0).random((40, 40, 6)).astype(np.float32)
    volume = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), volume)
    common = [
        "--preset",
        "tiny",
        "--source",
        str(volume),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--crop",
        "32",
        "--no-progress",
        "--threads",
        "1",
    ]
    runner = CliRunner()
    result = runner.invoke(cli, ["vae", *common, "-o", str(tmp_path / "vae")])
    assert result.exit_code == 0, result.output
    vae = tmp_path / "vae" / "vae.safetensors"
    options = ["--pairs", "4", "--terminal-fraction", "0.5", "--contrast-copies", "1"]
    result = runner.invoke(cli, ["denoiser", *common, "--vae", str(vae), *options, "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "weights.safetensors").is_file()
    objective = json.loads((tmp_path / "d" / "checkpoint" / "state.json").read_text())["objective"]
    assert objective["terminal_fraction"] == 0.5 and objective["contrast_copies"] == 1
    result = runner.invoke(cli, ["vae", *common, "-o", str(tmp_path / "vae")])  # exists, no --resume
    assert result.exit_code == 1 and "--resume" in result.output
    result = runner.invoke(cli, ["vae", *common[:2], "--source", "nope", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "not a source name" in result.output


@pytest.fixture(scope="module")
def epsilon_weights(tmp_path_factory, slices, vae_file) -> Path:
    """A tiny denoiser trained two steps for epsilon on a linear table (the tiny preset samples x0, cosine)."""
    run_dir = tmp_path_factory.mktemp("epsilon")
    loop = LoopConfig(steps=2, batch_size=2, ema_decay=0.0, log_every=1, checkpoint_every=2)
    objective = DenoiserConfig(pairs=4, crop=32, prediction_type="epsilon", beta_schedule="linear")
    return train_denoiser(run_dir, TINY, vae_file, slices, loop, objective, torch.device("cpu"), progress=False)


def test_weights_record_the_scheduler_they_were_trained_with(epsilon_weights):
    from safetensors import safe_open

    with safe_open(str(epsilon_weights), framework="numpy") as file:
        recorded = json.loads(file.metadata()[SCHEDULER_KEY])
    expected = {**TINY.scheduler, "prediction_type": "epsilon", "beta_schedule": "linear"}
    assert recorded == SchedulerConfig(**expected).to_dict()


def test_export_refuses_weights_trained_for_another_objective(epsilon_weights, tmp_path):
    with pytest.raises(CheckpointError) as refused:
        build_models(TINY, str(epsilon_weights))
    message = str(refused.value)
    assert "\n" not in message and str(epsilon_weights) in message and "preset tiny" in message
    assert "trained for beta_schedule='linear', prediction_type='epsilon'" in message
    assert "samples beta_schedule='squaredcos_cap_v2', prediction_type='sample'" in message
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export, ["--preset", "tiny", "--weights", str(epsilon_weights), "-o", str(out)])
    assert result.exit_code == 1 and "--objective-from-weights" in result.output and not out.exists()


def test_export_with_the_trained_objective(epsilon_weights, tmp_path):
    out = tmp_path / "bundle"
    args = ["--preset", "tiny", "--weights", str(epsilon_weights), "--objective-from-weights", "-o", str(out)]
    result = CliRunner().invoke(export, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "medsr.json").read_text())
    assert manifest["scheduler"]["prediction_type"] == manifest["denoiser"]["prediction_type"] == "epsilon"
    assert manifest["scheduler"]["beta_schedule"] == "linear"
    assert manifest["scheduler"]["default_steps"] == TINY.scheduler["default_steps"]  # the sampler as trained
    objective = manifest["provenance"]["objective"]
    assert objective["source"] == "weights" and objective["scheduler"]["prediction_type"] == "epsilon"


def test_weights_without_a_recorded_objective_keep_the_preset_scheduler_with_a_note(tmp_path):
    vae, unet, _ = build_models(TINY, seed=1)
    old = tmp_path / "old.safetensors"
    save_prefixed(old, {"vae.": vae.state_dict(), "unet.": unet.state_dict()})  # no header entry, as before
    with pytest.warns(UserWarning, match="record no training objective"):
        _, _, provenance = build_models(TINY, str(old))
    assert provenance["objective"]["source"] == "preset"
    assert provenance["objective"]["scheduler"]["prediction_type"] == "sample"
    assert "preset tiny" in provenance["objective"]["note"]
    result = CliRunner().invoke(
        export, ["--preset", "tiny", "--weights", str(old), "--objective-from-weights", "-o", str(tmp_path / "b")]
    )
    assert result.exit_code == 1 and "records no training objective" in result.output


def _failing_save_file(tensors, filename, metadata=None):
    """safetensors.torch.save_file that dies half-way: some bytes are on disk when the error comes."""
    Path(filename).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


def test_a_failed_weights_write_leaves_no_temporary_and_the_old_file_intact(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "weights.safetensors"
    save_prefixed(path, {"unet.": {"w": torch.ones(2)}})
    before = path.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    with pytest.raises(OutputError, match="No space left"):
        save_prefixed(path, {"unet.": {"w": torch.zeros(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"] and path.read_bytes() == before
    with pytest.raises(OutputError):
        save_prefixed(tmp_path / "new.safetensors", {"unet.": {"w": torch.zeros(2)}})
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_a_failed_latent_cache_write_leaves_nothing_behind(tmp_path, slices, vae_file, monkeypatch):
    import safetensors.torch

    vae = build_vae(TINY.vae).eval()
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    objective = DenoiserConfig(pairs=2, crop=32)
    with pytest.raises(OutputError, match="No space left"):
        denoiser_module.build_latent_cache(tmp_path, vae, TINY, slices, objective, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from medsr.export.train.checkpoint import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, None, optimizer, {"step": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    def failing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.raises(OutputError, match="No space left"):
        save_checkpoint(tmp_path, model, None, optimizer, {"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()} == before
