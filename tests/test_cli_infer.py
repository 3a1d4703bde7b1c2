"""medsr-infer end to end on a real volume: shape, dtype, finite values, geometry, engines agree, no torch needed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from fresh_python import run_python

from medsr.cli.infer import infer
from medsr.io.affine import grid_corners_world

# Blocks torch and diffusers before anything is imported, then runs medsr-infer's console entry point.
NO_TORCH_MAIN = (
    "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; "
    "from medsr.cli.infer import main; sys.argv[0] = 'medsr-infer'; main(); "
)


@pytest.fixture(scope="module")
def ort_output(tiny_bundle, example4d_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "out.nii.gz"
    args = [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--frame", "0", "--steps", "2"]
    result = CliRunner().invoke(infer, [*args, "--engine", "ort"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_output_volume_shape_dtype_and_values(ort_output, example4d_path):
    out, log = ort_output
    image = nib.load(out)
    source = nib.load(example4d_path)
    assert image.shape == (512, 384, 24)  # slices along the 2.2 mm axis, in-plane x4
    assert image.get_data_dtype() == np.float32
    data = image.get_fdata()
    assert np.isfinite(data).all() and data.std() > 0
    assert "24 slices along axis 2" in log and "CPUExecutionProvider" in log
    assert int(image.header["qform_code"]) == int(source.header["qform_code"])
    assert int(image.header["sform_code"]) == int(source.header["sform_code"])


def test_output_grid_keeps_the_field_of_view(ort_output, example4d_path):
    """The 8 outer corners of the voxel grid keep their world coordinates (oblique affine, x4 in-plane)."""
    out, _ = ort_output
    source, image = nib.load(example4d_path), nib.load(out)
    before = grid_corners_world(source.affine, source.shape[:3])
    after = grid_corners_world(image.affine, image.shape)
    np.testing.assert_allclose(after, before, atol=1e-4)
    np.testing.assert_allclose(image.header.get_zooms()[:3], [0.5, 0.5, 2.2], rtol=1e-5)


def test_torch_engine_gives_the_same_image(ort_output, tiny_bundle, example4d_path, tmp_path):
    pytest.importorskip("torch")
    out, _ = ort_output
    torch_out = tmp_path / "torch.nii.gz"
    args = [str(example4d_path), "-o", str(torch_out), "--model", str(tiny_bundle), "--frame", "0", "--steps", "2"]
    result = CliRunner().invoke(infer, [*args, "--engine", "torch"])
    assert result.exit_code == 0, result.output
    a, b = nib.load(out).get_fdata(), nib.load(torch_out).get_fdata()
    psnr = 10 * np.log10(np.ptp(b) ** 2 / np.mean((a - b) ** 2))
    assert psnr >= 60.0


def test_infer_runs_as_a_subprocess_without_torch(tiny_bundle, example4d_path, tmp_path):
    out = tmp_path / "sub.nii"
    args = [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--frame", "1", "--steps", "1", "--axis", "2"]
    run = run_python(NO_TORCH_MAIN, *args, timeout=300)
    assert run.returncode == 0, run.stderr
    assert nib.load(out).shape == (512, 384, 24)


def test_torch_engine_without_torch_names_the_extra(tiny_bundle, example4d_path, tmp_path):
    args = [str(example4d_path), "-o", str(tmp_path / "x.nii.gz"), "--model", str(tiny_bundle), "--engine", "torch"]
    run = run_python(NO_TORCH_MAIN, *args, timeout=300)
    assert run.returncode == 1
    assert "torch extra" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "x.nii.gz").exists()


def test_existing_output_is_refused_and_kept(ort_output, tiny_bundle, example4d_path):
    out, _ = ort_output
    before = out.read_bytes()
    result = CliRunner().invoke(infer, [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert out.read_bytes() == before


def test_trt_engine_is_reported_clearly(tiny_bundle, example4d_path, tmp_path):
    out = tmp_path / "trt.nii.gz"
    result = CliRunner().invoke(infer, [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--engine", "trt"])
    assert result.exit_code == 1 and "TensorRT" in result.output
    assert not out.exists()


def test_missing_input_is_one_line(tiny_bundle, tmp_path):
    result = CliRunner().invoke(infer, [str(tmp_path / "none.nii.gz"), "--model", str(tiny_bundle)])
    assert result.exit_code == 1 and "none.nii.gz: file not found" in result.output


def test_openvino_engine_matches_ort_in_fp32(ort_output, tiny_bundle, example4d_path, tmp_path):
    pytest.importorskip("openvino")
    out, _ = ort_output
    ov_out = tmp_path / "ov.nii.gz"
    args = [str(example4d_path), "-o", str(ov_out), "--model", str(tiny_bundle), "--frame", "0", "--steps", "2"]
    result = CliRunner().invoke(infer, [*args, "--engine", "openvino", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "engine openvino fp32 [OpenVINO" in result.output
    a, b = nib.load(ov_out).get_fdata(), nib.load(out).get_fdata()
    assert 10 * np.log10(np.ptp(b) ** 2 / np.mean((a - b) ** 2)) >= 60.0


def test_precision_the_engine_cannot_run_is_refused(tiny_bundle, example4d_path, tmp_path):
    out = tmp_path / "fp16.nii.gz"
    args = [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--precision", "fp16"]
    result = CliRunner().invoke(infer, [*args, "--engine", "ort"])
    assert result.exit_code == 1 and "--engine ort runs fp32 only" in result.output
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", "-7"])
def test_negative_seed_is_a_usage_error(tiny_bundle, example4d_path, tmp_path, seed):
    """Seeds are non-negative (numpy's SeedSequence takes no negative entropy): refused before any work, exit 2."""
    out = tmp_path / "out.nii.gz"
    args = [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--frame", "0", "--seed", seed]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--seed': {seed} is not in the range x>=0" in result.output
    assert "Traceback" not in result.output and not out.exists()
