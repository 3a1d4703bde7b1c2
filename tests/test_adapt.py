"""``medsr-infer --through-plane --adapt`` (docs/through_plane.md, "Adapting to the volume at hand"): a
through-plane bundle fine-tuned on the input's own in-plane planes, exported and run by the torch-free engine."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner
from fresh_python import run_python
from test_through_plane import _save

from medsr.bundle import load_bundle
from medsr.cli.infer import infer
from medsr.degrade import ThickSlices
from medsr.engine.volume import plan_through_plane, prepare_input, window_percentiles
from medsr.io.affine import upsample_affine_along
from medsr.io.formats import load_image
from medsr.io.nifti import COMMENT_ECODE

SHAPE = (40, 36, 10)  # voxels of 1 x 1 x 4 mm: in-plane planes of 40 x 36, the tiny model's 32-pixel crops fit


def _volume(tmp_path, name="vol.nii.gz"):
    """A smooth structured volume with a little noise, thick slices every 4 mm along axis 2."""
    x, y, z = np.indices(SHAPE).astype(np.float64)
    data = 100 + 50 * np.sin(x / 3) + 40 * np.cos(y / 4) + 30 * np.sin(z) + np.random.default_rng(0).normal(0, 5, SHAPE)
    return _save(tmp_path, data, [1.0, 1.0, 4.0], name), data


def _args(source, out, bundle, *extra):
    return [str(source), "-o", str(out), "--through-plane", "--model", str(bundle), "--threads", "1", *extra]


def _provenance(path):
    (comment,) = [ext for ext in nib.load(path).header.extensions if ext.get_code() == COMMENT_ECODE]
    return json.loads(comment.get_content())["medsr"]


def _adapt(bundle_dir, source, tmp_path, steps, seed=0):
    from medsr.export.train.adapt import AdaptConfig, adapt_model

    bundle = load_bundle(bundle_dir)
    volume = load_image(source, None, None, False)
    plan = plan_through_plane(volume, bundle)
    prepared = prepare_input(volume, window_percentiles(bundle))
    config = AdaptConfig(steps=steps, seconds=None, seed=seed)
    return adapt_model(bundle, prepared, plan, config, tmp_path / f"cache-{steps}-{seed}", torch.device("cpu"), True)


def test_adapt_runs_end_to_end_and_keeps_the_measured_slices(tmp_path, through_bundle, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    source, data = _volume(tmp_path)
    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(infer, _args(source, out, through_bundle, "--adapt", "--adapt-steps", "3"))
    assert result.exit_code == 0, result.output
    assert "model adapted to vol.nii.gz: 3 steps in " in result.output
    sr = nib.load(out)
    assert sr.shape == (40, 36, 40)
    np.testing.assert_allclose(sr.affine, upsample_affine_along(nib.load(source).affine, 2, 4), atol=1e-9)
    measured = ThickSlices(4, 2, "gaussian", 4.0).forward(sr.get_fdata())
    assert np.linalg.norm(measured - data) / np.linalg.norm(data) <= 1e-5
    adapted = _provenance(out)["adapted"]
    assert (adapted["input"], adapted["steps"], adapted["bundle"]["path"]) == ("vol.nii.gz", 3, str(through_bundle))
    assert adapted["degradation"] == {"name": "thick_slices", "scale": 4, "profile": "gaussian", "fwhm": 4.0}
    assert list(scratch.iterdir()) == []  # the adapted bundle and the latent cache are removed


def test_the_loss_on_the_volumes_own_planes_goes_down(tmp_path, through_bundle):
    source, _ = _volume(tmp_path)
    record = _adapt(through_bundle, source, tmp_path, steps=30).record
    assert record["steps"] == 30 and record["planes"] == 10 and record["crop"] == 32
    assert record["loss_after"] < 0.9 * record["loss_before"], record


def test_the_same_seed_gives_identical_adapted_weights(tmp_path, through_bundle):
    source, _ = _volume(tmp_path)
    first, again, other = (_adapt(through_bundle, source, tmp_path, 4, seed).unet.state_dict() for seed in (3, 3, 4))
    assert all(first[key].numpy().tobytes() == again[key].numpy().tobytes() for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_a_saved_adapted_bundle_runs_again_with_the_same_output(tmp_path, through_bundle):
    source, _ = _volume(tmp_path)
    saved, first, second = tmp_path / "adapted", tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    args = _args(source, first, through_bundle, "--adapt", "--adapt-steps", "3", "--adapt-save", str(saved))
    result = CliRunner().invoke(infer, args)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(saved)
    assert bundle.manifest.provenance.recipe == "medsr-infer --adapt"
    assert bundle.manifest.provenance.recipe_config["adapted"]["input"] == "vol.nii.gz"
    result = CliRunner().invoke(infer, _args(source, second, saved))
    assert result.exit_code == 0, result.output
    assert "model adapted to vol.nii.gz: 3 steps in " in result.output  # said by every output of the model
    np.testing.assert_array_equal(nib.load(second).get_fdata(), nib.load(first).get_fdata())


def test_every_input_of_a_batch_gets_its_own_adapted_model(tmp_path, through_bundle):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        _volume(inputs, name)
    outdir = tmp_path / "out"
    args = [str(inputs), "-o", str(outdir), "--through-plane", "--model", str(through_bundle), "--threads", "1"]
    for extra, message in (
        (["--adapt-save", str(tmp_path / "saved")], "--adapt-save keeps the adapted model of one input"),
        (["--ray", "local"], "--adapt fine-tunes a model per input on this machine; it does not run on --ray"),
    ):
        result = CliRunner().invoke(infer, [*args, "--adapt", *extra])
        assert result.exit_code != 0 and message in result.output
        assert len(result.output.strip().splitlines()) == 1 and not outdir.exists()
    result = CliRunner().invoke(infer, [*args, "--adapt", "--adapt-steps", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((outdir / "medsr_summary.json").read_text())
    assert [item["adapted"]["input"] for item in summary["items"]] == ["a.nii.gz", "b.nii.gz"]
    assert [_provenance(item["output"])["adapted"]["input"] for item in summary["items"]] == ["a.nii.gz", "b.nii.gz"]


def test_without_torch_adapt_is_refused_in_one_line_and_the_plain_run_works(tmp_path, through_bundle):
    source, _ = _volume(tmp_path)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from click.testing import CliRunner\n"
        "from medsr.cli.infer import infer\n"
        "result = CliRunner().invoke(infer, sys.argv[1:])\n"
        "print(result.exit_code)\n"
        "print(result.output.strip())\n"
    )
    adapted, plain = tmp_path / "adapted.nii.gz", tmp_path / "plain.nii.gz"
    run = run_python(code, *_args(source, adapted, through_bundle, "--adapt"))
    assert run.returncode == 0, run.stderr
    exit_code, *lines = run.stdout.strip().splitlines()
    assert exit_code != "0" and len(lines) == 1, run.stdout
    assert "--adapt needs PyTorch: pip install 'medsr[torch]'" in lines[0]
    assert not adapted.exists()
    run = run_python(code, *_args(source, plain, through_bundle))
    assert run.stdout.startswith("0\n"), run.stdout + run.stderr
    assert plain.is_file()


REFUSALS = [
    (["--adapt"], "--adapt fine-tunes a through-plane model on the input; add --through-plane"),
    (["--through-plane", "--adapt-steps", "3"], "--adapt-time, --adapt-steps and --adapt-save apply to --adapt only"),
    (["--through-plane", "--adapt-save", "DIR"], "--adapt-time, --adapt-steps and --adapt-save apply to --adapt only"),
    (["--through-plane", "--adapt", "--adapt-save", "EXISTING"], "output exists; pass --overwrite to replace it"),
]


@pytest.mark.parametrize("extra, message", REFUSALS)
def test_refusals_are_one_line_and_write_nothing(tmp_path, through_bundle, extra, message):
    source, _ = _volume(tmp_path)
    (tmp_path / "EXISTING").mkdir()
    out = tmp_path / "out.nii.gz"
    extra = [str(tmp_path / arg) if arg in ("DIR", "EXISTING") else arg for arg in extra]
    args = [str(source), "-o", str(out), "--model", str(through_bundle), *extra]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code != 0
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not (tmp_path / "DIR").exists()
    assert list((tmp_path / "EXISTING").iterdir()) == []


def test_the_harness_measures_the_adapted_model_and_it_is_medsr_infer_adapt(tmp_path, through_bundle):
    """``medsr-eval through-plane --adapt``: each simulated volume gets its own adapted model, whose output is the
    volume ``medsr-infer --through-plane --adapt`` writes for the same thick slices and seed."""
    from medsr.cli.eval import cli
    from medsr.eval import thick_slices as ts
    from medsr.eval import thick_slices_report as report

    x, y, z = np.indices((40, 36, 40)).astype(np.float64)
    truth = 100 + 50 * np.sin(x / 3) + 40 * np.cos(y / 4) + 30 * np.sin(z / 2)
    path = _save(tmp_path, truth, [1.0, 1.0, 1.0], "iso.nii.gz")
    out = tmp_path / "eval"
    args = ["through-plane", "--model", str(through_bundle), "--data", str(path), "-o", str(out), "--no-eclare"]
    args += ["--engine", "ort", "--threads", "1", "--no-figures", "--adapt", "--adapt-steps", "3", "--seed", "5"]
    args += ["--baselines", "none"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / report.JSON_NAME).read_text())
    (run,) = doc["runs"]
    assert list(run["metrics"]) == ["tiny-through-plane+adapt"]
    assert doc["model"]["adapted"] == {"seconds": None, "steps": 3, "seed": 5}

    settings = ts.ThickSliceSettings(factors=(4,), profile="gaussian", fwhm=None, axis=2, baselines=())
    (volume,) = ts.load_truth_volumes([str(path)])
    lr = settings.acquisition(4).forward(np.asarray(volume.data, np.float32)).astype(np.float32)
    thick = _save(tmp_path, lr, [1.0, 1.0, 4.0], "thick.nii.gz")
    sr_path = tmp_path / "sr.nii.gz"
    result = CliRunner().invoke(
        infer,
        _args(
            thick,
            sr_path,
            through_bundle,
            "--engine",
            "ort",
            "--adapt",
            "--adapt-steps",
            "3",
            "--seed",
            "5",
            "--slice-thickness",
            "4",
        ),
    )
    assert result.exit_code == 0, result.output
    harness = ts.run_factor(
        volume,
        4,
        settings,
        ts.through_plane_runner(*_opened(through_bundle), pipeline_for=_adapting_for(through_bundle, seed=5, steps=3)),
    ).outputs["tiny-through-plane"]
    np.testing.assert_array_equal(np.asarray(nib.load(sr_path).dataobj, np.float32), harness)


def _opened(bundle_dir):
    from medsr.engine.jobs import EngineOptions
    from medsr.engine.pipeline import SamplingOptions

    pipeline = EngineOptions("ort", "fp32", "cpu", None, 1).open(load_bundle(bundle_dir))
    return pipeline, SamplingOptions(seed=5)


def _adapting_for(bundle_dir, seed, steps):
    from medsr.cli.eval import _adapting
    from medsr.engine.jobs import EngineOptions

    return _adapting(load_bundle(bundle_dir), EngineOptions("ort", "fp32", "cpu", None, 1), seed, None, steps)
