"""medsr-bench: engine names, stage accounting, and one small real run written as JSON and markdown."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from medsr.bench.engines import EngineSpec
from medsr.bench.stages import Timeline
from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.cli.bench import bench
from medsr.errors import BackendError
from medsr.export.presets import get_preset


def test_help_lists_engines_and_presets():
    result = CliRunner().invoke(bench, ["--help"])
    assert result.exit_code == 0 and "--engine" in result.output and "openvino:bf16" in result.output


@pytest.mark.parametrize(
    "text, label",
    [("torch", "torch"), ("torch:bf16", "torch:bf16"), ("openvino:fp32", "openvino"), ("trt:fp16", "trt:fp16")],
)
def test_engine_specs(text, label):
    assert EngineSpec.parse(text).label == label


def test_engine_spec_errors():
    with pytest.raises(BackendError, match="unknown engine 'tensorflow'"):
        EngineSpec.parse("tensorflow")
    with pytest.raises(BackendError, match="torch variants are fp32, bf16, fp16, compile"):
        EngineSpec.parse("torch:int8")


def test_sampler_time_is_the_gap_after_each_denoiser_call():
    timeline = Timeline(
        [
            ("vae_encoder", 0.0, 1.0),
            ("denoiser", 1.5, 3.0),
            ("denoiser", 3.25, 5.0),  # 0.25 s of scheduler step before this call
            ("vae_decoder", 5.5, 7.0),  # 0.5 s after the last step
            ("consistency", 7.0, 7.5),
        ]
    )
    assert timeline.sampler_seconds() == pytest.approx(0.75)
    assert timeline.total("denoiser") == pytest.approx(3.25) and timeline.durations("denoiser") == [1.5, 1.75]


def test_small_run_writes_json_and_markdown(tiny_bundle, tmp_path, monkeypatch):
    from medsr.bench import run

    monkeypatch.setattr(run, "gemm_ceilings", lambda threads, device: {"fp32": 100.0, "bf16": 400.0})
    work = tmp_path / "work"
    shutil.copytree(tiny_bundle, run.bundle_dir(get_preset("tiny"), work))  # reused, not exported again
    args = ["--preset", "tiny", "--engine", "torch", "--engine", "ort", "--batch-size", "1", "--batch-size", "2",
            "--slices", "2", "--lr-size", "16", "--steps", "1", "--repeats", "1", "--threads", "1",
            "--work-dir", str(work), "-o", str(tmp_path / "out"), "--tag", "t"]  # fmt: skip
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "t.json").read_text())
    rows = {(row["batch"], row["engine"]): row for row in report["summary"]}
    assert set(rows) == {(1, "torch"), (1, "ort"), (2, "torch"), (2, "ort")}
    ort_row = rows[(2, "ort")]
    assert ort_row["speedup_vs_torch"] > 0 and ort_row["parity_db"] > 60 and rows[(1, "torch")]["parity_db"] is None
    stages = ort_row["stages_s_per_slice"]
    assert stages["end_to_end"] >= stages["encode"] + stages["denoise"] + stages["decode"]
    # ONNX Runtime binds its denoiser (the device loop), so medsr-infer's run is timed on its own; torch's is the
    # staged run itself; both give the staged run's volume bit for bit
    runs = {(run["engine"], run["batch"]): run for run in report["models"][0]["runs"]}
    assert runs[("ort", 2)]["as_run"] != runs[("ort", 2)]["end_to_end"]
    assert runs[("torch", 2)]["as_run"] == runs[("torch", 2)]["end_to_end"]
    assert all(row["as_run_identical"] for row in rows.values())
    assert ort_row["denoiser_peak_fraction"]["bf16"] == pytest.approx(ort_row["gflops"]["denoiser"] / 400.0)
    markdown = (tmp_path / "out" / "t.md").read_text()
    assert "| 2 | ort |" in markdown and "fp32 100, bf16 400" in markdown and "load average" in markdown
    assert "| as run s/slice |" in markdown and "(differs!)" not in markdown


def test_an_edited_preset_gets_its_own_bundle_folder(tmp_path):
    """A benchmark must not reuse a bundle exported from an earlier definition of the preset."""
    from medsr.bench.run import bundle_dir

    tiny = get_preset("tiny")
    edited = dataclasses.replace(tiny, conditioning=Conditioning(UPSAMPLED, "zerofill", residual=True))
    assert bundle_dir(tiny, tmp_path) == bundle_dir(get_preset("tiny"), tmp_path)
    assert bundle_dir(edited, tmp_path) != bundle_dir(tiny, tmp_path)
    assert bundle_dir(edited, tmp_path).name.startswith("tiny-")
