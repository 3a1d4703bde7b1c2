"""medsr-infer end to end on each input and output format (tiny bundle, one step), with the output's geometry read
back by independent readers (nibabel, SimpleITK, pydicom) and intensities checked to stay in the input's units."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from fresh_python import run_python
from io_fixtures import (
    StandInPipeline,
    ct5n_dir,
    hash_tree,
    oblique_affine,
    radiograph_crop,
    smooth_image,
    write_nifti,
)
from PIL import Image

from medsr.bundle import load_bundle
from medsr.cli.infer import infer
from medsr.engine.pipeline import SamplingOptions, SRResult
from medsr.engine.volume import prepare_input, super_resolve_volume, window_percentiles
from medsr.io.affine import grid_corners_world
from medsr.io.dicom import load_dicom

LPS = np.diag([-1.0, -1.0, 1.0])


def run(tiny_bundle, *args) -> str:
    result = CliRunner().invoke(infer, [*map(str, args), "--model", str(tiny_bundle), "--steps", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def itk_corners(image, shape) -> np.ndarray:
    """RAS world of the 8 outer grid corners of a SimpleITK image of (X, Y, Z) ``shape``."""
    corners = [
        (i, j, k) for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)
    ]
    return np.array([LPS @ np.array(image.TransformContinuousIndexToPhysicalPoint(c)) for c in corners])


def test_dicom_series_to_nifti_keeps_the_field_of_view(tiny_bundle, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    before = hash_tree(ct5n_dir())
    log = run(tiny_bundle, ct5n_dir(), "-o", tmp_path / "ct.nii.gz")
    out = nib.load(tmp_path / "ct.nii.gz")
    source = load_dicom(ct5n_dir())
    assert out.shape == (64, 64, 5) and "5 slices along axis 2" in log
    expected = grid_corners_world(source.affine, source.data.shape)
    np.testing.assert_allclose(grid_corners_world(out.affine, out.shape), expected, atol=1e-4)
    np.testing.assert_allclose(itk_corners(sitk.ReadImage(str(tmp_path / "ct.nii.gz")), out.shape), expected, atol=1e-4)
    assert int(out.header["sform_code"]) == 1 and json.loads(out.header.extensions[-1].get_content())["medsr"]["model"]
    assert hash_tree(ct5n_dir()) == before


def test_dicom_series_to_dicom_series(tiny_bundle, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    run(tiny_bundle, ct5n_dir(), "--format", "dicom", "-o", tmp_path / "sr")
    files = sorted((tmp_path / "sr").iterdir())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "sr")))
    image = reader.Execute()
    source = load_dicom(ct5n_dir())
    assert len(files) == 5 and image.GetSize() == (64, 64, 5)
    np.testing.assert_allclose(
        itk_corners(image, (64, 64, 5)), grid_corners_world(source.affine, (16, 16, 5)), atol=1e-4
    )
    first = pydicom.dcmread(files[0])
    assert first.PatientID == pydicom.dcmread(source.meta.files[0]).PatientID
    assert first.pixel_array.dtype == np.int16 and first.ImageType[0] == "DERIVED"


def test_monochrome1_radiograph_to_dicom_and_png(tiny_bundle, tmp_path):
    cr = radiograph_crop(tmp_path / "cr.dcm")
    log = run(tiny_bundle, cr, "--format", "dicom", "-o", tmp_path / "sr.dcm")
    assert "assuming 1 mm pixels" in log
    ds = pydicom.dcmread(tmp_path / "sr.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and (ds.Rows, ds.Columns) == (160, 192)
    run(tiny_bundle, cr, "-o", tmp_path / "sr.png", "--dtype", "uint16")
    assert Image.open(tmp_path / "sr.png").size == (192, 160)


def test_png_and_tiff_keep_bit_depth_and_scale_the_spacing(tiny_bundle, tmp_path):
    pixels = np.round(smooth_image((20, 24)) * 4).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "x.png", dpi=(25.4 / 0.2, 25.4 / 0.2))
    run(tiny_bundle, tmp_path / "x.png", "-o", tmp_path / "y.png")
    out = Image.open(tmp_path / "y.png")
    assert out.mode == "I;16" and out.size == (96, 80)
    assert 25.4 / out.info["dpi"][0] == pytest.approx(0.05, rel=1e-4)
    Image.fromarray((pixels // 16).astype(np.uint8)).save(tmp_path / "x.tif", dpi=(254.0, 254.0))
    run(tiny_bundle, tmp_path / "x.tif", "-o", tmp_path / "y.tif")
    out = Image.open(tmp_path / "y.tif")
    assert out.mode == "F" and out.tag_v2[296] == 3 and 10 / float(out.tag_v2[282]) == pytest.approx(0.025, rel=1e-6)
    run(tiny_bundle, tmp_path / "x.tif", "-o", tmp_path / "z.tif", "--dtype", "input")
    assert Image.open(tmp_path / "z.tif").mode == "L"


def test_4d_every_frame_or_one_and_oblique_geometry(tiny_bundle, tmp_path):
    affine = oblique_affine(zooms=(1.0, 1.2, 3.0))
    path = write_nifti(tmp_path / "f.nii.gz", smooth_image((12, 8, 3, 2)), affine, dtype=np.int16, slope=0.5)
    run(tiny_bundle, path, "-o", tmp_path / "all.nii.gz")
    run(tiny_bundle, path, "-o", tmp_path / "one.nii", "--frame", "1", "--dtype", "input")
    every, one = nib.load(tmp_path / "all.nii.gz"), nib.load(tmp_path / "one.nii")
    assert every.shape == (48, 32, 3, 2) and one.shape == (48, 32, 3)
    assert one.get_data_dtype() == np.int16 and one.dataobj.slope == 0.5
    for image in (every, one):
        np.testing.assert_allclose(
            grid_corners_world(image.affine, image.shape), grid_corners_world(affine, (12, 8, 3)), atol=1e-4
        )


class _NearestPipeline(StandInPipeline):
    """A stand-in pipeline whose SR slice is the nearest-neighbour upsampling of its LR slice, in model units."""

    def __init__(self, bundle):
        self.bundle = bundle

    def super_resolve(self, lr, options, progress=None, first_index=0):
        return SRResult(images=lr.repeat(4, axis=1).repeat(4, axis=2), residuals=np.zeros(len(lr)))


@pytest.mark.parametrize("invert", [False, True])  # MONOCHROME2, MONOCHROME1 (the model sees it inverted)
def test_output_is_in_the_input_units(tiny_bundle, invert):
    """Normalization and its inverse around the model: the SR volume is the input in the input's units (HU here),
    inverted for the model and back for MONOCHROME1. Values outside the window reach the pipeline unclipped (it clips
    them for its networks only, and data consistency keeps the measured values)."""
    volume = dataclasses.replace(load_dicom(ct5n_dir()), inverted=invert)
    data, bundle = volume.data, load_bundle(tiny_bundle)
    prepared = prepare_input(volume, window_percentiles(bundle))
    result = super_resolve_volume(prepared, np.eye(4), _NearestPipeline(bundle), 2, SamplingOptions())
    low, high = sorted((result.window.low, result.window.high))
    assert (result.window.low > result.window.high) == invert and low < high
    expected = data.repeat(4, axis=0).repeat(4, axis=1)
    np.testing.assert_allclose(result.data, expected, atol=1e-3 * (high - low))
    assert result.clipped_fraction == pytest.approx(np.mean((data < low) | (data > high)))


def test_io_modules_import_no_torch_and_no_reader_until_needed():
    """medsr.io, tiling and medsr-infer import neither torch nor the format libraries before an image needs them."""
    modules = (
        "medsr.io.formats, medsr.io.inputs, medsr.io.dicom, medsr.io.dicom_write, medsr.io.raster, "
        "medsr.io.limits, medsr.engine.tiling, medsr.engine.volume, medsr.cli.jobs, medsr.cli.infer"
    )
    code = (
        f"import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; import {modules}; "
        "print(','.join(m for m in ('pydicom', 'PIL', 'nibabel', 'SimpleITK') if m in sys.modules))"
    )
    run = run_python(code, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "", run.stderr


def test_tiled_radiograph_runs_without_torch(tiny_bundle, tmp_path):
    source = radiograph_crop(tmp_path / "cr.dcm")
    main = (
        "import sys; sys.modules['torch'] = None; from medsr.cli.infer import main; sys.argv[0] = 'medsr-infer'; main()"
    )
    args = [
        str(source),
        "-o",
        str(tmp_path / "sr.tif"),
        "--tile",
        "16",
        "--tile-overlap",
        "8",
        "--model",
        str(tiny_bundle),
        "--steps",
        "1",
    ]
    run = run_python(main, *args, timeout=300)
    assert run.returncode == 0, run.stderr
    out = np.asarray(Image.open(tmp_path / "sr.tif"))
    assert out.shape == (160, 192) and np.isfinite(out).all() and out.std() > 0
