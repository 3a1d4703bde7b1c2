"""medsr-eval parity / fidelity / compare and medsr-export --validate on real volumes with the tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fresh_python import run_python

pytest.importorskip("torch")
pytest.importorskip("skimage")

from medsr.cli.eval import cli
from medsr.cli.export import export
from medsr.data.sources import COLIN27_PATH
from medsr.engine.sessions import OrtSession
from medsr.export.reference import TorchSession

STAGES = ["lr_latent", "denoiser_output[0]", "denoiser_output[1]", "final_latent", "decoded_image", "sr_image"]


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def perturbed_reference(monkeypatch):
    """The PyTorch reference denoiser scaled by 1.01: what a wrong export would look like to the harness."""
    run = TorchSession.run

    def perturbed(self, feeds):
        out = run(self, feeds)
        return {k: v * 1.01 for k, v in out.items()} if "model_output" in out else out

    monkeypatch.setattr(TorchSession, "run", perturbed)


def test_help_of_every_subcommand_loads_no_heavy_module():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from medsr.cli.eval import cli\n"
        "for args in ([], ['parity'], ['fidelity'], ['compare']):\n"
        "    result = CliRunner().invoke(cli, args + ['--help'])\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'nibabel', 'scipy', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_parity_on_a_real_volume_passes_and_reports_every_stage(tiny_bundle, tmp_path):
    out = tmp_path / "parity.json"
    result = _invoke(["parity", "--model", tiny_bundle, "--slices", "2", "--size", "32", "--steps", "2", "-o", out])
    assert result.exit_code == 0, result.output
    assert "example4d_ax2_006" in result.output and "parity passed" in result.output
    report = json.loads(out.read_text())
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert report["passed"] and report["threshold_db"] == 60.0 and report["lr_shape"] == [2, 32, 32]
    assert all(s["psnr_db"] >= 60 for s in report["stages"])
    assert report["options"]["steps"] == 2 and report["providers"] == ["CPUExecutionProvider"]


def test_parity_failure_names_the_first_drifting_stage(tiny_bundle, tmp_path, perturbed_reference):
    out = tmp_path / "parity.json"
    result = _invoke(["parity", "--model", tiny_bundle, "--slices", "1", "--size", "32", "--steps", "2", "-o", out])
    assert result.exit_code == 1
    assert "parity failed: first stage below 60 dB: denoiser_output[0]" in result.output
    report = json.loads(out.read_text())
    assert not report["passed"] and report["first_drift"] == "denoiser_output[0]"


def test_parity_names_the_stage_that_gave_nan(tiny_bundle, monkeypatch):
    run = OrtSession.run

    def nan_decoder(self, feeds):
        out = run(self, feeds)
        return {"image": np.full_like(out["image"], np.nan)} if "image" in out else out

    monkeypatch.setattr(OrtSession, "run", nan_decoder)
    result = _invoke(["parity", "--model", tiny_bundle, "--slices", "1", "--size", "16", "--steps", "1"])
    assert result.exit_code == 1
    assert "NaN/Inf in the engine pipeline" in result.output and "vae_decoder" in result.output


def test_parity_threshold_and_precision_are_options(tiny_bundle):
    result = _invoke(["parity", "--model", tiny_bundle, "--slices", "1", "--size", "16", "--steps", "1",
                      "--threshold-db", "500"])  # fmt: skip
    assert result.exit_code == 1 and "below 500 dB: lr_latent" in result.output
    result = _invoke(["parity", "--model", tiny_bundle, "--precision", "fp16"])
    assert result.exit_code == 1 and "fp16" in result.output  # ONNX Runtime runs the bundle's fp32 graphs only


@pytest.fixture(scope="module")
def fidelity_dir(tiny_bundle, example4d_path, tmp_path_factory):
    """medsr-eval fidelity on 2 slices of Colin27 (when installed) and 2 of example4d, with and without k-space."""
    data = [COLIN27_PATH, example4d_path] if COLIN27_PATH.is_file() else [example4d_path]
    out = tmp_path_factory.mktemp("fidelity") / "out"
    args = ["fidelity", "--model", tiny_bundle, "--max-slices", "2", "--steps", "2", "--consistency", "none,kspace",
            "--panels", "2", "--scale", "4", "-o", out]  # fmt: skip
    for path in data:
        args += ["--data", path]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    return out, [Path(p) for p in data], result.output


def test_fidelity_writes_per_image_rows_summaries_and_figures(fidelity_dir):
    out, data, log = fidelity_dir
    configs = ["tiny+none", "tiny+kspace", "zerofill", "bicubic", "lanczos", "ae_ceiling"]
    lines = (out / "per_image.csv").read_text().splitlines()
    assert len(lines) == 1 + len(configs) * 2 * len(data)
    for config in configs:
        summary = json.loads((out / f"fidelity_{config}.json").read_text())
        assert summary["config"] == config and len(summary["images"]) == 2 * len(data)
        assert summary["summary"]["degradation"] == {"name": "kspace", "scale": 4}
    assert len(list((out / "panels").glob("*.png"))) == 2 and (out / "bands.png").is_file()
    assert "| zerofill |" in (out / "summary.md").read_text() and "| tiny+kspace |" in log


def test_fidelity_baselines_are_fair_on_real_slices(fidelity_dir):
    """Grid-aligned baselines on real MRI slices reach 20+ dB; zero-filling reproduces the measured LR exactly
    (residual ~ 0), bicubic does not; k-space consistency reproduces the clipped LR the engine saw (residual ~ the
    clipped overshoot)."""
    out, _, _ = fidelity_dir
    rows = {}
    for config in ("zerofill", "bicubic", "lanczos", "tiny+kspace", "tiny+none"):
        rows[config] = json.loads((out / f"fidelity_{config}.json").read_text())["images"]
    for image_id in rows["zerofill"]:
        assert rows["zerofill"][image_id]["psnr"] > 20 and rows["bicubic"][image_id]["psnr"] > 20
        assert rows["zerofill"][image_id]["consistency_residual"] < 1e-5
        residual = rows["tiny+kspace"][image_id]["consistency_residual"]
        assert residual < 0.05 and residual < rows["tiny+none"][image_id]["consistency_residual"] / 5
        assert rows["bicubic"][image_id]["consistency_residual"] > 1e-3


def test_fidelity_refuses_existing_outputs_and_a_wrong_scale(tiny_bundle, fidelity_dir, example4d_path):
    out, _, _ = fidelity_dir
    result = _invoke(["fidelity", "--model", tiny_bundle, "--data", example4d_path, "--max-slices", "1", "-o", out])
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = _invoke(["fidelity", "--model", tiny_bundle, "--data", example4d_path, "--scale", "2", "-o", out])
    assert result.exit_code == 1 and "x4" in result.output


def test_compare_pairs_configurations_of_the_fidelity_run(fidelity_dir, tmp_path):
    out, _, _ = fidelity_dir
    files = [out / "fidelity_tiny+kspace.json", out / "fidelity_zerofill.json", out / "fidelity_tiny+none.json"]
    report, full = tmp_path / "report.md", tmp_path / "report.json"
    result = _invoke(["compare", *files, "-o", report, "--json", full, "--n-boot", "200"])
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "tiny+kspace vs zerofill" in text and "tiny+kspace vs tiny+none" in text
    pairs = json.loads(full.read_text())["pairs"]
    assert len(pairs) == 3 and pairs[0]["metrics"]["psnr"]["n"] == pairs[0]["n_paired"]
    assert json.loads(full.read_text())["screening"]["fit"] is None  # two model points only
    result = _invoke(["compare", *files, "--plot", tmp_path / "s.png"])
    assert result.exit_code == 1 and "needs >= 3" in result.output


def test_compare_refuses_summaries_of_different_images(fidelity_dir, tmp_path):
    out, _, _ = fidelity_dir
    summary = json.loads((out / "fidelity_bicubic.json").read_text())
    dropped = min(summary["images"])
    del summary["images"][dropped]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(summary | {"config": "bicubic-subset"}))
    result = _invoke(["compare", out / "fidelity_zerofill.json", fewer])
    assert result.exit_code == 1 and dropped in result.output
    result = _invoke(["compare", out / "fidelity_zerofill.json", fewer, "--intersect", "--n-boot", "200"])
    assert result.exit_code == 0 and "1 unpaired ids dropped" in result.output


def test_export_validate_records_parity_in_the_manifest(tmp_path):
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export, ["--preset", "tiny", "--random-init", "-o", str(out), "--validate"])
    assert result.exit_code == 0, result.output
    parity = json.loads((out / "medsr.json").read_text())["validation"]["parity"]
    assert parity["passed"] and parity["stages"][0]["stage"] == "lr_latent"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging left behind


def test_export_validate_refuses_to_keep_a_bundle_that_fails(tiny_bundle, tmp_path, monkeypatch, perturbed_reference):
    def export_bundle(vae, unet, preset, out_dir, provenance, overwrite=False):  # the session's bundle, copied
        shutil.copytree(tiny_bundle, out_dir, dirs_exist_ok=overwrite)
        return out_dir

    monkeypatch.setattr("medsr.export.onnx.export_bundle", export_bundle)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export, ["--preset", "tiny", "--random-init", "-o", str(out), "--validate"])
    assert result.exit_code == 1
    assert "not written" in result.output and "denoiser_output[0]" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["parity", "fidelity", "compare"])
def test_negative_seed_is_a_usage_error(command, tiny_bundle, tmp_path):
    args = {
        "parity": ["parity", "--model", tiny_bundle, "--size", "16", "--slices", "1"],
        "fidelity": ["fidelity", "--model", tiny_bundle, "--data", "epi", "-o", tmp_path / "f"],
        "compare": ["compare", tmp_path / "a.json", tmp_path / "b.json"],
    }[command]
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("{}")
    result = _invoke([*args, "--seed", "-1"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--seed': -1 is not in the range x>=0" in result.output
    assert not (tmp_path / "f").exists()


def test_parity_on_tiled_slices_reports_only_what_it_compared(tiny_bundle, tmp_path):
    """Slices longer than the tile size (128 LR pixels) run in tiles, whose intermediates are not traced: the report
    lists the final image alone and says so, instead of claiming that every stage passed."""
    out = tmp_path / "parity.json"
    result = _invoke(
        ["parity", "--model", tiny_bundle, "--data", "colin27-slab", "--slices", "1", "--size", "136", "--steps", "1"]
        + ["-o", out]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [s["stage"] for s in report["stages"]] == ["sr_image"]
    assert "in tiles" in report["note"] and "only the final image" in report["note"]
    assert "every stage" not in result.output
    assert "parity passed: the final image (sr_image) >= 60 dB" in result.output
    assert "only the final image" in result.output


def test_parity_without_model_uses_the_bundled_default(tmp_path):
    from medsr.models import DEFAULT_BUNDLE

    out = tmp_path / "parity.json"
    result = _invoke(["parity", "--slices", "1", "--size", "16", "-o", out])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"] == "default" and Path(report["bundle"]) == DEFAULT_BUNDLE
    assert [s["stage"] for s in report["stages"]][-1] == "sr_image" and report["passed"]
