"""DICOM in and out on pydicom's real files: series grouping and sorting, LPS to RAS, modality LUT, MONOCHROME1,
PixelSpacing fallbacks; world coordinates against SimpleITK and a per-file oracle; the derived SR series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from io_fixtures import (
    copy_series,
    ct5n_dir,
    dicom_world_centres,
    nifti_world_centres,
    pydicom_file,
    radiograph_crop,
    write_series,
)

from medsr.errors import InputError
from medsr.io.affine import grid_corners_world, upsample_affine
from medsr.io.dicom import load_dicom
from medsr.io.dicom_write import save_dicom

LPS = np.diag([-1.0, -1.0, 1.0])
PROVENANCE = {"medsr_version": "0.1.0", "model": "tiny", "scale": 4}


def ras_centres(volume) -> np.ndarray:
    """medsr's voxel centres in LPS, laid out (Z, rows, cols, 3) like the oracle."""
    return (nifti_world_centres(volume.affine, volume.data.shape) @ LPS).transpose(2, 1, 0, 3)


def test_ct_series_is_sorted_by_position_and_matches_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    volume = load_dicom(ct5n_dir())
    assert volume.data.shape == (16, 16, 5) and volume.stored_dtype == np.int16
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct5n_dir())))
    image = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), volume.data)  # HU, same order
    itk = np.array(
        [[[image.TransformIndexToPhysicalPoint((i, j, k)) for i in range(16)] for j in range(16)] for k in range(5)]
    )
    np.testing.assert_allclose(ras_centres(volume), itk, atol=1e-4)
    np.testing.assert_allclose(ras_centres(volume), dicom_world_centres(list(ct5n_dir().iterdir())), atol=1e-4)


def test_order_never_comes_from_file_names(tmp_path):
    """The same files under names in the opposite order load identically (sorting is by IPP along the normal)."""
    names = ["a", "b", "c", "d", "e"]
    reordered = load_dicom(copy_series(tmp_path / "s", names[::-1]))
    np.testing.assert_array_equal(reordered.data, load_dicom(ct5n_dir()).data)


def test_oblique_mr_slice_matches_simpleitk_and_applies_rescale():
    sitk = pytest.importorskip("SimpleITK")
    path = pydicom_file("MR2_UNCR.dcm")
    volume = load_dicom(path)
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(
        volume.data[:, :, 0].T, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), rtol=1e-6
    )
    image = sitk.ReadImage(str(path))
    for index in [(0, 0, 0), (1023, 0, 0), (0, 1023, 0), (1023, 1023, 0), (511, 300, 0)]:
        np.testing.assert_allclose(
            ras_centres(volume)[index[::-1]], image.TransformIndexToPhysicalPoint(index), atol=1e-4
        )
    np.testing.assert_allclose(ras_centres(volume), dicom_world_centres([path]), atol=1e-4)


def test_monochrome1_radiograph_without_spacing_falls_back_and_notes_it(tmp_path):
    volume = load_dicom(radiograph_crop(tmp_path / "cr.dcm"))
    assert volume.inverted and volume.is_2d and volume.data.shape == (48, 40, 1)
    assert volume.zooms == (1.0, 1.0, 1.0) and "assuming 1 mm" in volume.notes[0]


def test_imager_pixel_spacing_is_the_first_fallback(tmp_path):
    path = radiograph_crop(tmp_path / "cr.dcm")
    ds = pydicom.dcmread(path)
    ds.ImagerPixelSpacing = ["0.15", "0.16"]
    ds.save_as(path)
    volume = load_dicom(path)
    assert volume.zooms[:2] == pytest.approx((0.16, 0.15)) and not volume.notes


def test_several_series_are_listed_or_chosen(tmp_path):
    write_series(tmp_path / "d", [(0, 0, z) for z in range(3)], uid="1.2.3.4")
    write_series(tmp_path / "d", [(0, 0, z) for z in (10, 12)], uid="1.2.3.5", prefix="other")
    with pytest.raises(
        InputError, match=r"holds 2 DICOM series; choose one with --series UID: .*1\.2\.3\.4.*1\.2\.3\.5"
    ):
        load_dicom(tmp_path / "d")
    assert load_dicom(tmp_path / "d", series="1.2.3.5").data.shape[2] == 2
    with pytest.raises(InputError, match="no series '9'"):
        load_dicom(tmp_path / "d", series="9")


def test_gantry_tilt_gives_a_sheared_affine(tmp_path):
    """Slices stepping along z while shifting along y: the third column follows the positions, not the normal."""
    positions = [(0.0, 0.3 * k, 2.0 * k) for k in range(4)]
    volume = load_dicom(write_series(tmp_path / "tilt", positions))
    np.testing.assert_allclose(
        ras_centres(volume), dicom_world_centres(sorted((tmp_path / "tilt").iterdir())), atol=1e-4
    )


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([(0, 0, 0), (0, 0, 1), (0, 0, 3)], "not evenly spaced"),  # a missing slice
        ([(0, 0, 0), (0, 0, 0), (0, 0, 1)], "same position"),  # two echoes in one series
    ],
)
def test_irregular_series_are_refused(tmp_path, positions, message):
    with pytest.raises(InputError, match=message):
        load_dicom(write_series(tmp_path / "s", positions))


def test_mixed_orientations_are_refused(tmp_path):
    def rotate_last(ds, k):
        if k == 2:
            ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]

    with pytest.raises(InputError, match="orientation differs"):
        load_dicom(write_series(tmp_path / "s", [(0, 0, z) for z in range(3)], modify=rotate_last))


def _sr_series(volume, tmp_path, values=None):
    affine = upsample_affine(volume.affine, [4, 4, 1])
    shape = (volume.data.shape[0] * 4, volume.data.shape[1] * 4, volume.data.shape[2])
    data = np.repeat(np.repeat(volume.data, 4, axis=0), 4, axis=1) if values is None else values
    out = tmp_path / "sr"
    clipped = save_dicom(out if shape[2] > 1 else out.with_suffix(".dcm"), data, affine, volume, PROVENANCE)
    return (out if shape[2] > 1 else out.with_suffix(".dcm")), affine, clipped


def test_derived_series_keeps_patient_and_study_and_the_field_of_view(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    volume = load_dicom(ct5n_dir())
    out, affine, clipped = _sr_series(volume, tmp_path)
    assert clipped == 0.0
    files = sorted(out.iterdir())
    source = pydicom.dcmread(volume.meta.files[0])
    first = pydicom.dcmread(files[0])
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID", "Modality"):
        assert first.get(keyword) == source.get(keyword), keyword
    assert first.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files} | {source.SOPInstanceUID}) == 6
    assert list(first.ImageType[:2]) == ["DERIVED", "SECONDARY"] and "medsr" in first.DerivationDescription
    assert (first.Rows, first.Columns) == (64, 64)
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.488281 / 4] * 2)
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    reread = load_dicom(out)
    np.testing.assert_array_equal(reread.data, np.repeat(np.repeat(volume.data, 4, axis=0), 4, axis=1))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out)))
    image = reader.Execute()
    corners = [(i, j, k) for i in (-0.5, 63.5) for j in (-0.5, 63.5) for k in (-0.5, 4.5)]
    itk = np.array([LPS @ np.array(image.TransformContinuousIndexToPhysicalPoint(c)) for c in corners])
    np.testing.assert_allclose(itk, grid_corners_world(volume.affine, volume.data.shape), atol=1e-4)
    np.testing.assert_allclose(reread.affine, affine, atol=1e-6)


def test_derived_radiograph_stays_monochrome1_and_reports_clipping(tmp_path):
    volume = load_dicom(radiograph_crop(tmp_path / "cr.dcm"))
    values = np.repeat(np.repeat(volume.data, 4, axis=0), 4, axis=1)
    values[0, 0, 0] = -5.0  # below the unsigned 15-bit range of RG1: clipped to 0
    out, _, clipped = _sr_series(volume, tmp_path, values)
    ds = pydicom.dcmread(out)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.pixel_array.dtype == np.uint16
    assert ds.PixelSpacing == pydicom.dcmread(tmp_path / "cr.dcm").PixelSpacing  # "0.000" stays unknown
    assert clipped == pytest.approx(1 / values.size) and ds.pixel_array[0, 0] == 0
    assert "ImagePositionPatient" not in ds  # the source had no geometry: none is invented
