"""Batch mode: directories, glob patterns and several inputs into one output directory, one job per DICOM series, a
summary JSON, existing outputs skipped on a rerun and replaced with --overwrite."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from io_fixtures import copy_series, hash_tree, radiograph_crop, smooth_image, write_nifti
from PIL import Image

from medsr.cli.infer import infer


@pytest.fixture
def folder(tmp_path):
    """A clinic's mixed folder: a NIfTI volume, a PNG, a CT series, and a subfolder of two radiographs."""
    root = tmp_path / "in"
    root.mkdir()
    write_nifti(root / "head.nii.gz", smooth_image((12, 12, 3)), np.eye(4))
    Image.fromarray(np.round(smooth_image((16, 20))).astype(np.uint16)).save(root / "hand.png")
    copy_series(root / "ct")
    (root / "xrays").mkdir()
    radiograph_crop(root / "xrays" / "chest.dcm")
    radiograph_crop(root / "xrays" / "knee.dcm", origin=(600, 700))
    (root / "notes.txt").write_text("not an image: ignored")
    return root


def invoke(tiny_bundle, *args):
    return CliRunner().invoke(infer, [*map(str, args), "--model", str(tiny_bundle), "--steps", "1"])


EXPECTED = ["chest_sr4x.nii.gz", "ct_sr4x.nii.gz", "hand_sr4x.png", "head_sr4x.nii.gz", "knee_sr4x.nii.gz"]


def test_batch_runs_every_image_and_skips_them_on_a_rerun(tiny_bundle, folder, tmp_path):
    out = tmp_path / "out"
    inputs = hash_tree(folder)
    first = invoke(tiny_bundle, folder, "-o", out)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPECTED, "medsr_summary.json"])
    summary = json.loads((out / "medsr_summary.json").read_text())
    assert summary["counts"] == {"done": 5, "skipped": 0, "failed": 0} and summary["model"] == "tiny"
    chest = next(item for item in summary["items"] if item["output"].endswith("chest_sr4x.nii.gz"))
    assert chest["output_shape"] == [192, 160, 1] and "assuming 1 mm" in chest["notes"][0]
    results = hash_tree(*(out / name for name in EXPECTED))
    second = invoke(tiny_bundle, folder, "-o", out)
    assert second.exit_code == 0 and second.output.count("skipped ") == 5
    assert json.loads((out / "medsr_summary.json").read_text())["counts"]["skipped"] == 5
    assert hash_tree(*(out / name for name in EXPECTED)) == results
    third = invoke(tiny_bundle, folder, "-o", out, "--overwrite")
    assert third.exit_code == 0 and json.loads((out / "medsr_summary.json").read_text())["counts"]["done"] == 5
    assert hash_tree(folder) == inputs


def test_patterns_and_several_inputs_make_a_batch(tiny_bundle, folder, tmp_path):
    out = tmp_path / "out"
    result = invoke(tiny_bundle, str(folder / "xrays" / "*.dcm"), folder / "hand.png", "-o", out, "--format", "tiff")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "chest_sr4x.tif",
        "hand_sr4x.tif",
        "knee_sr4x.tif",
        "medsr_summary.json",
    ]


def test_a_series_interrupted_rerun_resumes(tiny_bundle, folder, tmp_path):
    """A rerun after a removed (e.g. never finished) output redoes only that one."""
    out = tmp_path / "out"
    assert invoke(tiny_bundle, folder, "-o", out).exit_code == 0
    (out / "ct_sr4x.nii.gz").unlink()
    result = invoke(tiny_bundle, folder, "-o", out)
    counts = json.loads((out / "medsr_summary.json").read_text())["counts"]
    assert result.exit_code == 0 and counts == {"done": 1, "skipped": 4, "failed": 0}


def test_directory_of_several_series_is_a_batch_with_an_output_directory(tiny_bundle, folder, tmp_path):
    series = folder / "xrays"
    as_one = invoke(tiny_bundle, series, "-o", tmp_path / "x.nii.gz")
    assert as_one.exit_code == 1 and "holds 2 DICOM series; choose one with --series" in as_one.output
    chosen = invoke(
        tiny_bundle,
        series,
        "-o",
        tmp_path / "x.nii.gz",
        "--series",
        __import__("pydicom").dcmread(series / "knee.dcm").SeriesInstanceUID,
    )
    assert chosen.exit_code == 0, chosen.output
    batch = invoke(tiny_bundle, series, "-o", tmp_path / "both")
    assert batch.exit_code == 0 and sorted(p.name for p in (tmp_path / "both").iterdir())[:2] == EXPECTED[:1] + [
        "knee_sr4x.nii.gz"
    ]


def test_batch_output_must_be_a_directory(tiny_bundle, folder, tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke(tiny_bundle, folder, "-o", tmp_path / "file")
    assert result.exit_code == 1 and "must be a directory" in result.output
    result = invoke(tiny_bundle, folder)
    assert result.exit_code == 1 and "needs -o OUTPUT_DIRECTORY" in result.output
    shutil.rmtree(folder)
