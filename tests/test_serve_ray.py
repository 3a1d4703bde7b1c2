"""``medsr-infer --ray``: a batch over a real local Ray cluster (docs/scale-out.md) gives a local batch's outputs bit
for bit (only the run's date in the provenance differs) and its records; a worker killed in the middle of a volume is
restarted and the volume retried, leaving no partial file; a rerun resumes; --overwrite replaces; without Ray a
one-line error says what to install."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from io_fixtures import listing, smooth_image, write_nifti

from medsr.cli.infer import infer
from medsr.serve.ray_batch import FAULT_ENV

try:
    import ray
except ImportError:  # the error test below still runs
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="needs the ray extra (pip install 'medsr[ray]')")

NAMES = [f"v{i}_sr4x.nii.gz" for i in range(4)]
#: The default bundle, one step, one thread per engine: about half a second per 32 x 32 x 4 volume here.
FAST = ["--steps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    for i in range(4):
        write_nifti(root / f"v{i}.nii.gz", smooth_image((32, 32, 4), seed=i), np.diag([0.8, 0.8, 3.0, 1.0]))
    return root


@pytest.fixture(scope="module")
def local_run(archive, tmp_path_factory):
    """The same batch run by one local process: the reference."""
    out = tmp_path_factory.mktemp("local") / "out"
    result = CliRunner().invoke(infer, [str(archive), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local cluster of 2 CPUs for the in-process runs (run_ray_batch uses a cluster the caller holds); its
    workers inherit the fault-injection variable, whose directory the tests fill (medsr.serve.ray_batch.FAULT_ENV)."""
    faults = tmp_path_factory.mktemp("faults")
    os.environ[FAULT_ENV] = str(faults)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield faults
    ray.shutdown()
    del os.environ[FAULT_ENV]


def content(path) -> bytes:
    """A NIfTI output's bytes, uncompressed, with the run's date blanked (the one field that may differ)."""
    return re.sub(rb'"date": "[^"]*"', b'"date": ""', gzip.decompress(path.read_bytes()))


def items(out) -> list[dict]:
    """The summary's records, without the timing and with the output's file name only."""
    summary = json.loads((out / "medsr_summary.json").read_text())
    return [{**r, "seconds": None, "output": os.path.basename(r["output"])} for r in summary["items"]]


def assert_same_outputs(out, reference, names=NAMES):
    for name in names:
        assert content(out / name) == content(reference / name), name


def ray_batch(archive, out, *args):
    return CliRunner().invoke(infer, [str(archive), "-o", str(out), *FAST, "--ray", "local", "--workers", "2", *args])


@needs_ray
def test_ray_local_gives_a_local_runs_outputs_and_records(archive, local_run, tmp_path):
    """The real command: `--ray local` starts its own cluster, 2 single-thread workers read and write the files."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    medsr_infer = [sys.executable, "-c", "from medsr.cli.infer import main; main()"]
    command = [*medsr_infer, str(archive), "-o", str(out), *FAST, "--ray", "local", "--workers", "2"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 4 and "batch: 4 done, 0 skipped, 0 failed" in result.stdout
    assert listing(out) == sorted([*NAMES, "medsr_summary.json"])
    assert_same_outputs(out, local_run)
    assert items(out) == items(local_run)


@needs_ray
def test_a_worker_killed_mid_volume_is_retried_and_leaves_nothing_partial(archive, local_run, cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".{NAMES[1]}.k1ll3d.tmp.nii.gz"  # what a writer killed by an earlier run leaves behind
    stale.write_bytes(b"partial")
    (cluster / "once").write_text("")  # the first worker to open its engine exits abruptly, once
    result = ray_batch(archive, out)
    assert result.exit_code == 0, result.output
    assert not (cluster / "once").exists(), "no worker died: the fault was not injected"
    assert listing(out) == sorted([*NAMES, "medsr_summary.json"])
    assert_same_outputs(out, local_run)
    summary = json.loads((out / "medsr_summary.json").read_text())
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 0} and "finished" in summary
    assert items(out) == items(local_run)


@needs_ray
def test_a_rerun_skips_done_files_and_overwrite_replaces_them(archive, local_run, cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in NAMES[:2]:  # an interrupted earlier run finished two volumes
        shutil.copy2(local_run / name, out / name)
    done = {name: (out / name).read_bytes() for name in NAMES[:2]}
    result = ray_batch(archive, out)
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("skipped ") for line in result.output.splitlines()) == 2
    summary = json.loads((out / "medsr_summary.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 2, "failed": 0}
    assert [r["status"] for r in summary["items"]] == ["skipped", "skipped", "done", "done"]
    assert {name: (out / name).read_bytes() for name in NAMES[:2]} == done
    assert_same_outputs(out, local_run)
    again = ray_batch(archive, out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "medsr_summary.json").read_text())["counts"] == {"done": 4, "skipped": 0, "failed": 0}
    assert listing(out) == sorted([*NAMES, "medsr_summary.json"])
    assert_same_outputs(out, local_run)


def test_without_ray_the_error_says_what_to_install(archive, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as in an installation without the extra
    result = CliRunner().invoke(infer, [str(archive), "-o", str(tmp_path / "out"), *FAST, "--ray", "local"])
    assert result.exit_code == 1
    message = result.output.strip()
    assert "\n" not in message and "pip install 'medsr[ray]'" in message


def test_ray_and_workers_need_a_batch(archive, tmp_path):
    one = CliRunner().invoke(infer, [str(archive / "v0.nii.gz"), "-o", str(tmp_path / "x.nii.gz"), "--ray", "local"])
    assert one.exit_code == 1 and "--ray runs a batch" in one.output
    pool = CliRunner().invoke(infer, [str(archive), "-o", str(tmp_path / "out"), "--workers", "2"])
    assert pool.exit_code == 1 and "add --ray ADDRESS" in pool.output


@needs_ray
def test_a_volume_that_kills_every_worker_fails_alone(archive, local_run, cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (cluster / "v2.nii.gz").write_text("")  # every worker that runs v2 exits abruptly
    try:
        result = ray_batch(archive, out)
    finally:
        (cluster / "v2.nii.gz").unlink()
    assert result.exit_code == 1 and "1 of 4 input(s) failed" in result.output
    summary = json.loads((out / "medsr_summary.json").read_text())
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    assert "v2.nii.gz: the Ray worker died running it 3 times" in summary["items"][2]["error"]
    assert listing(out) == sorted([*NAMES[:2], NAMES[3], "medsr_summary.json"])
    assert_same_outputs(out, local_run, [*NAMES[:2], NAMES[3]])


@needs_ray
def test_more_workers_than_the_local_cluster_holds_is_refused(archive, cluster, tmp_path):
    result = ray_batch(archive, tmp_path / "out", "--workers", "3")  # the last --workers wins: 3 on 2 CPUs
    assert result.exit_code == 1 and "has room for 2 1-thread worker(s)" in result.output


def _worker_run(archive, out, monkeypatch, probes=None):
    """v0 of the archive through one BatchWorker (no Ray needed: the actor is a plain class) asked for
    ``--engine auto``, with medsr.engine.select's probes replaced by ``probes`` when given."""
    from medsr.bundle import load_bundle
    from medsr.engine import select
    from medsr.engine.jobs import EngineOptions, InferSettings, plan_batch
    from medsr.engine.pipeline import SamplingOptions
    from medsr.io.inputs import expand_inputs
    from medsr.models import DEFAULT_BUNDLE
    from medsr.serve.ray_batch import BatchWorker

    if probes is not None:
        real = select.choose_engine
        monkeypatch.setattr(select, "choose_engine", lambda device, precision=None: real(device, precision, probes))
    out.mkdir()
    jobs, _ = expand_inputs([str(archive / "v0.nii.gz")], output=out)
    settings = InferSettings(options=SamplingOptions(steps=1), engine="driver's", engine_reason="driver's")
    ((job, output, record),) = plan_batch(jobs, out, load_bundle(DEFAULT_BUNDLE), settings)
    worker = BatchWorker(str(DEFAULT_BUNDLE), EngineOptions("auto", "auto", "cpu", None, 1), settings, os.getcwd())
    return worker.run(job, str(output), record), output


def test_a_ray_worker_chooses_the_auto_engine_on_its_own_node(archive, tmp_path, monkeypatch):
    import nibabel as nib

    record, output = _worker_run(archive, tmp_path / "out", monkeypatch)
    assert record["status"] == "done", record
    provenance = json.loads(nib.load(output).header.extensions[0].get_content())["medsr"]
    assert provenance["engine"].startswith("ort fp32 [CPUExecutionProvider")
    assert "driver's" not in provenance["engine_reason"] and "ONNX Runtime" in provenance["engine_reason"]


def test_a_ray_worker_without_an_engine_fails_its_jobs_in_one_line(archive, tmp_path, monkeypatch):
    missing = {
        "openvino": lambda device, wanted: (None, "openvino is not installed"),
        "ort": lambda device, wanted: (None, "onnxruntime is not installed"),
    }
    record, output = _worker_run(archive, tmp_path / "out", monkeypatch, probes=missing)
    assert record["status"] == "failed" and not output.exists()
    assert record["error"].startswith(f"{archive / 'v0.nii.gz'}: ") and "\n" not in record["error"]
    assert "onnxruntime is not installed" in record["error"]
