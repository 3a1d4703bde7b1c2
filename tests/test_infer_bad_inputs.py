"""Every bad input of the generated corpus (tests/bad_inputs.py) through medsr-infer: one line naming the file and
the problem, exit code 1, no traceback, no output or temporary file, inputs and bundle untouched. The same corpus as
one batch: each failure reported and skipped, the good image done, the summary recording all of them."""

from __future__ import annotations

import json

import pytest
from bad_inputs import build_corpus
from click.testing import CliRunner
from io_fixtures import hash_tree, listing

from medsr.cli.infer import infer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root, tiny_bundle)


def _case_ids():
    """Case names for the parametrization, from a corpus built without a bundle directory of its own."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        for name in ("vae_encoder.onnx", "vae_decoder.onnx", "denoiser.onnx"):
            (bundle / name).write_bytes(b"")
        return [case.name for case in build_corpus(Path(tmp) / "c", bundle)]


CASE_NAMES = _case_ids()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gives_one_clear_line(corpus, tiny_bundle, name):
    root, cases = corpus
    case = next(c for c in cases if c.name == name)
    before = hash_tree(root / "in", root / "bundles", tiny_bundle)
    outputs_before = listing(root / "out")
    args = [*case.args, "--steps", "1"] + ([] if case.own_model else ["--model", str(tiny_bundle)])
    result = CliRunner().invoke(infer, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert case.expect in lines[0], lines[0]
    assert case.names is None or case.names in lines[0], lines[0]
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert listing(root / "out") == outputs_before
    assert hash_tree(root / "in", root / "bundles", tiny_bundle) == before


def test_corpus_as_a_batch_reports_each_failure_and_keeps_going(corpus, tiny_bundle, tmp_path):
    root, _ = corpus
    out = tmp_path / "batch"
    before = hash_tree(root / "in")
    result = CliRunner().invoke(infer, [str(root / "in"), "-o", str(out), "--model", str(tiny_bundle), "--steps", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    summary = json.loads((out / "medsr_summary.json").read_text())
    items = {item["input"]: item for item in summary["items"]}
    failed = [item for item in summary["items"] if item["status"] == "failed"]
    assert summary["counts"]["failed"] == len(failed) >= 25
    assert result.output.count("FAILED ") == len(failed)
    assert all(item["error"].startswith(item["input"]) or item["input"] in item["error"] for item in failed)
    done = {item["output"] for item in summary["items"] if item["status"] == "done"}
    assert str(out / "xray_sr4x.png") in done and str(out / "good_sr4x.nii.gz") in done
    assert items[str(root / "in" / "ct_ok")]["status"] == "done"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.split("/")[-1] for p in done), "medsr_summary.json"])
    assert hash_tree(root / "in") == before
