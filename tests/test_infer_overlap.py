"""A local batch overlaps its host stages with the engine (medsr.engine.jobs.run_batch_jobs): the same files byte for
byte as one stage after the other, every stage's error in its own job's record, at most one read ahead and one
write behind, and an interrupt that leaves no partial output."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from io_fixtures import hash_tree, listing, smooth_image, write_nifti

import medsr.engine.jobs as jobs_module
from medsr.bundle import load_bundle
from medsr.cli.jobs import run_batch
from medsr.engine.jobs import EngineOptions, InferSettings, plan_batch, run_batch_jobs
from medsr.engine.pipeline import SamplingOptions
from medsr.io.inputs import expand_inputs


@pytest.fixture
def inputs(tmp_path):
    """Four small NIfTI volumes of different sizes, the third not a NIfTI at all (a read error)."""
    root = tmp_path / "in"
    root.mkdir()
    for index, shape in enumerate([(12, 12, 3), (16, 12, 2), None, (12, 16, 4)]):
        path = root / f"v{index}.nii.gz"
        if shape is None:
            path.write_bytes(b"not a NIfTI file")
        else:
            write_nifti(path, smooth_image(shape) * (index + 1), np.eye(4))
    return root


@pytest.fixture
def pipeline(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    opened = EngineOptions("ort", threads=1).open(bundle)
    return bundle, lambda: opened


def run(inputs, out, pipeline, monkeypatch, overlap: bool, on_record=None):
    """The batch of ``inputs`` into ``out``; its records."""
    monkeypatch.setattr(jobs_module, "_now", lambda: "2026-12-01T00:00:00")  # the one clock the files record
    bundle, open_pipeline = pipeline
    out.mkdir()
    jobs, _ = expand_inputs([str(inputs)], output=out)
    settings = InferSettings(options=SamplingOptions(steps=1, batch_size=2), overlap=overlap)
    records = []
    run_batch_jobs(
        plan_batch(jobs, out, bundle, settings), bundle, open_pipeline, settings, on_record or records.append
    )
    return records


def _strip(records):
    """The records without what differs between two runs: timings and the output folder."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "output")} for r in records]


def _contents(out):
    return {name.rsplit("/", 1)[-1]: digest for name, digest in hash_tree(out).items()}


def test_outputs_are_byte_identical_with_and_without_overlap(inputs, tmp_path, pipeline, monkeypatch):
    overlapped = run(inputs, tmp_path / "overlap", pipeline, monkeypatch, overlap=True)
    serial = run(inputs, tmp_path / "serial", pipeline, monkeypatch, overlap=False)
    assert [r["status"] for r in overlapped] == ["done", "done", "failed", "done"]
    assert _strip(overlapped) == _strip(serial)
    assert _contents(tmp_path / "overlap") == _contents(tmp_path / "serial")
    assert sorted(_contents(tmp_path / "overlap")) == ["v0_sr4x.nii.gz", "v1_sr4x.nii.gz", "v3_sr4x.nii.gz"]


def test_a_read_error_of_the_next_file_is_reported_for_that_file(inputs, tmp_path, pipeline, monkeypatch):
    """v2 is read while the engine runs v1: its error is v2's record, in its place, and v1 and v3 are done."""
    records = run(inputs, tmp_path / "out", pipeline, monkeypatch, overlap=True)
    assert [r["input"].rsplit("/", 1)[-1] for r in records] == ["v0.nii.gz", "v1.nii.gz", "v2.nii.gz", "v3.nii.gz"]
    failed = records[2]
    assert failed["status"] == "failed" and str(inputs / "v2.nii.gz") in failed["error"]
    assert all(str(inputs / "v2.nii.gz") not in r.get("error", "") for r in records if r is not failed)


def test_a_write_error_and_a_bug_are_reported_for_their_own_files(inputs, tmp_path, pipeline, monkeypatch):
    """A full disk while v0 is written (on the writer thread, while the engine runs v1) fails v0 only; a bug in
    the engine stage of v3 fails v3 only, named as a bug; neither is lost."""
    from medsr.errors import OutputError

    real_write, real_compute = jobs_module.write_computed, jobs_module.compute_prepared

    def write(computed, settings):
        if computed.prepared.output.name == "v0_sr4x.nii.gz":
            raise OutputError(f"{computed.prepared.output}: could not write output: No space left on device")
        return real_write(computed, settings)

    def compute(prepared, *args, **kwargs):
        if prepared.volume.path.name == "v3.nii.gz":
            raise ZeroDivisionError("division by zero")
        return real_compute(prepared, *args, **kwargs)

    monkeypatch.setattr(jobs_module, "write_computed", write)
    monkeypatch.setattr(jobs_module, "compute_prepared", compute)
    records = run(inputs, tmp_path / "out", pipeline, monkeypatch, overlap=True)
    assert [r["status"] for r in records] == ["failed", "done", "failed", "failed"]
    assert "v0_sr4x.nii.gz: could not write output: No space left on device" in records[0]["error"]
    assert "v3.nii.gz: unexpected error (a medsr bug): ZeroDivisionError" in records[3]["error"]
    assert listing(tmp_path / "out") == ["v1_sr4x.nii.gz"]


def test_at_most_one_read_ahead_and_one_write_behind(inputs, tmp_path, pipeline, monkeypatch):
    events, lock = [], threading.Lock()

    def logged(name, function, key):
        def wrapper(*args, **kwargs):
            with lock:
                events.append((name, "start", key(*args)))
            result = function(*args, **kwargs)
            with lock:
                events.append((name, "end", key(*args)))
            return result

        return wrapper

    monkeypatch.setattr(jobs_module, "prepare_job", logged("read", jobs_module.prepare_job, lambda j, *a: j.stem))
    compute = logged("run", jobs_module.compute_prepared, lambda p, *a, **k: p.job.stem)
    monkeypatch.setattr(jobs_module, "compute_prepared", compute)
    write = logged("write", jobs_module.write_computed, lambda c, *a: c.prepared.job.stem)
    monkeypatch.setattr(jobs_module, "write_computed", write)
    run(inputs, tmp_path / "out", pipeline, monkeypatch, overlap=True)
    order = ["v0", "v1", "v2", "v3"]
    for index, (name, what, stem) in enumerate(events):
        if (name, what) != ("run", "start"):
            continue
        before = events[:index]
        reads = {s for n, w, s in before if (n, w) == ("read", "start")}
        assert reads <= set(order[: order.index(stem) + 2]), (stem, reads)  # this job's and at most the next
        started = [s for n, w, s in before if (n, w) == ("write", "start")]
        ended = [s for n, w, s in before if (n, w) == ("write", "end")]
        assert len(started) - len(ended) <= 1
    assert [s for n, w, s in events if (n, w) == ("write", "end")] == ["v0", "v1", "v3"]


def test_an_interrupt_leaves_no_partial_output(inputs, tmp_path, pipeline, monkeypatch):
    """Ctrl-C in the engine stage of v1 while v0 is being written: the exception reaches the caller after the write
    under way is finished; nothing half-written, no temporary file, and a rerun completes the batch."""
    real_compute, real_write = jobs_module.compute_prepared, jobs_module.write_computed
    writing = threading.Event()

    def slow_write(computed, settings):
        writing.set()
        return real_write(computed, settings)

    def compute(prepared, *args, **kwargs):
        if prepared.volume.path.name == "v1.nii.gz":
            writing.wait(30)
            raise KeyboardInterrupt
        return real_compute(prepared, *args, **kwargs)

    monkeypatch.setattr(jobs_module, "compute_prepared", compute)
    monkeypatch.setattr(jobs_module, "write_computed", slow_write)
    with pytest.raises(KeyboardInterrupt):
        run(inputs, tmp_path / "out", pipeline, monkeypatch, overlap=True)
    assert listing(tmp_path / "out") in ([], ["v0_sr4x.nii.gz"])  # complete or absent, never partial or hidden
    monkeypatch.setattr(jobs_module, "compute_prepared", real_compute)
    monkeypatch.setattr(jobs_module, "write_computed", real_write)
    bundle, open_pipeline = pipeline
    jobs, _ = expand_inputs([str(inputs)], output=tmp_path / "out")
    settings = InferSettings(options=SamplingOptions(steps=1, batch_size=2))
    summary = run_batch(jobs, tmp_path / "out", bundle, open_pipeline, settings, lambda line: None)
    assert summary["counts"]["done"] + summary["counts"]["skipped"] == 3 and summary["counts"]["failed"] == 1
