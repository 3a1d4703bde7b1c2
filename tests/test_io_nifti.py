"""NIfTI in and out: scaling of every stored type, 2D/3D/4D, header fields kept, provenance recorded, integer output
only when asked, and world coordinates checked against nibabel and SimpleITK (independent readers)."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from io_fixtures import nifti_world_centres, oblique_affine, smooth_image, write_nifti

from medsr.errors import InputError
from medsr.io.affine import grid_corners_world, upsample_affine
from medsr.io.nifti import COMMENT_ECODE, load_nifti, save_nifti

PROVENANCE = {"medsr_version": "0.1.0", "model": "tiny", "scale": 4}
LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [
        (np.uint8, None, None),  # unscaled 8-bit
        (np.int16, 0.5, -10.0),  # scaled signed 16-bit
        (np.uint16, 2.0, 100.0),  # scaled unsigned 16-bit
        (np.int32, None, None),  # wide integers
        (np.float32, None, None),
        (np.float64, None, None),  # read as float32
    ],
)
def test_load_applies_scaling_for_every_stored_type(tmp_path, dtype, slope, inter):
    raw = np.round(smooth_image((6, 5, 4)) / 8).astype(dtype)
    path = write_nifti(tmp_path / "x.nii.gz", raw, oblique_affine(), dtype=dtype, slope=slope, inter=inter)
    volume = load_nifti(path)
    expected = raw.astype(np.float64) * (slope or 1.0) + (inter or 0.0)
    assert volume.data.dtype == np.float32 and volume.data.shape == (6, 5, 4)
    np.testing.assert_allclose(volume.data, expected, rtol=1e-6)
    assert volume.stored_dtype == np.dtype(dtype) and volume.format == "nifti"


@pytest.mark.parametrize(
    ("written_as", "named", "compress"),
    [
        ("plain.nii", "misnamed.nii.gz", False),  # some converters write uncompressed data under .nii.gz
        ("packed.nii.gz", "misnamed.nii", True),  # gzip bytes under .nii
    ],
)
def test_compression_is_told_by_content_not_by_name(tmp_path, written_as, named, compress):
    """The same bytes read under their right and their wrong name give the same voxels and affine, as nibabel
    reads them under the right name (and SimpleITK, which also goes by content, under the wrong .nii.gz one)."""
    raw = np.round(smooth_image((6, 5, 4)) / 8).astype(np.int16)
    right = write_nifti(tmp_path / written_as, raw, oblique_affine(), dtype=np.int16, slope=0.5, inter=-3.0)
    assert (right.read_bytes()[:2] == b"\x1f\x8b") == compress
    wrong = tmp_path / named
    wrong.write_bytes(right.read_bytes())
    volume = load_nifti(wrong)
    reference = nib.load(right)
    np.testing.assert_array_equal(volume.data, reference.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(volume.affine, reference.affine)
    if named.endswith(".gz"):
        sitk = pytest.importorskip("SimpleITK")
        itk = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(wrong))), (2, 1, 0))
        np.testing.assert_allclose(volume.data, itk, rtol=1e-6)


@pytest.mark.parametrize("endianness", ["<", ">"])
def test_nifti2_and_big_endian_files_load(tmp_path, endianness):
    raw = smooth_image((5, 4, 3))
    header = nib.Nifti2Header(endianness=endianness)
    nib.save(nib.Nifti2Image(raw, oblique_affine(), header=header), tmp_path / "two.nii")
    volume = load_nifti(tmp_path / "two.nii")
    np.testing.assert_allclose(volume.data, raw, rtol=1e-6)
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-5)


def test_a_file_without_a_nifti_header_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"not an image at all, but long enough to hold a header field"))
    with pytest.raises(InputError, match="corrupt NIfTI: the header's sizeof_hdr is neither 348 nor 540") as info:
        load_nifti(path)
    assert str(path) in str(info.value)


def test_2d_and_4d_files_keep_their_layout(tmp_path):
    two_d = load_nifti(write_nifti(tmp_path / "a.nii", smooth_image((7, 9)), np.eye(4)))
    assert two_d.data.shape == (7, 9, 1) and two_d.is_2d
    four_d = load_nifti(write_nifti(tmp_path / "b.nii", smooth_image((5, 6, 3, 2)), np.eye(4)))
    assert four_d.data.shape == (5, 6, 3, 2) and four_d.frames == 2 and not four_d.is_2d


def test_save_keeps_codes_units_description_and_extensions(tmp_path, example4d_path):
    """nibabel's real EPI: descrip, two comment extensions, codes 1/1, mm and s, a 2.2 mm slice and TR 2 s."""
    source = load_nifti(example4d_path)
    affine = upsample_affine(source.affine, [4, 4, 1])
    data = np.zeros((512, 384, 24, 2), dtype=np.float32)
    save_nifti(tmp_path / "sr.nii.gz", data, affine, source, PROVENANCE)
    out, before = nib.load(tmp_path / "sr.nii.gz"), nib.load(example4d_path)
    for field in ("qform_code", "sform_code", "xyzt_units", "descrip"):
        assert out.header[field] == before.header[field], field
    assert out.header.get_zooms()[3] == pytest.approx(before.header.get_zooms()[3])
    np.testing.assert_allclose(
        out.header.get_zooms()[:3], np.array(before.header.get_zooms()[:3]) / [4, 4, 1], rtol=1e-6
    )
    contents = [ext.get_content() for ext in out.header.extensions]
    assert contents[:2] == [ext.get_content() for ext in before.header.extensions]
    assert out.header.extensions[-1].get_code() == COMMENT_ECODE
    assert json.loads(contents[-1])["medsr"] == PROVENANCE
    assert out.get_data_dtype() == np.float32 and out.dataobj.slope == 1.0


def test_empty_description_gets_medsr_and_the_model(tmp_path):
    source = load_nifti(write_nifti(tmp_path / "x.nii", smooth_image((4, 4, 2)), np.eye(4)))
    save_nifti(tmp_path / "y.nii", np.zeros((16, 16, 2)), upsample_affine(np.eye(4), [4, 4, 1]), source, PROVENANCE)
    assert nib.load(tmp_path / "y.nii").header["descrip"].item() == b"medsr 0.1.0 x4 tiny"


def test_integer_output_only_when_asked_uses_the_input_scaling(tmp_path):
    raw = np.round(smooth_image((6, 6, 2)) / 4).astype(np.int16)
    source = load_nifti(write_nifti(tmp_path / "x.nii", raw, np.eye(4), dtype=np.int16, slope=0.5, inter=-10))
    values = source.data.copy()
    values[0, 0, 0] = 1e6  # beyond int16 * 0.5 - 10: clipped and counted
    clipped = save_nifti(tmp_path / "i.nii", values, np.eye(4), source, PROVENANCE, dtype=np.dtype(np.int16))
    out = nib.load(tmp_path / "i.nii")
    assert out.get_data_dtype() == np.int16 and (out.dataobj.slope, out.dataobj.inter) == (0.5, -10.0)
    assert clipped == pytest.approx(1 / values.size)
    np.testing.assert_allclose(out.get_fdata().ravel()[1:], values.ravel()[1:], atol=0.25)
    assert out.get_fdata()[0, 0, 0] == 32767 * 0.5 - 10


def test_world_coordinates_agree_with_nibabel_and_simpleitk(tmp_path):
    """Voxel centres of an oblique int16 file: medsr vs nibabel vs SimpleITK, then the SR grid's outer corners."""
    sitk = pytest.importorskip("SimpleITK")
    affine = oblique_affine()
    path = write_nifti(tmp_path / "obl.nii.gz", smooth_image((9, 7, 5)), affine, dtype=np.int16, slope=0.25)
    volume = load_nifti(path)
    centres = nifti_world_centres(volume.affine, volume.data.shape)
    np.testing.assert_allclose(centres, nifti_world_centres(nib.load(path).affine, (9, 7, 5)), atol=1e-4)
    image = sitk.ReadImage(str(path))
    for index in [(0, 0, 0), (8, 6, 4), (3, 2, 1), (8, 0, 4)]:
        itk_ras = LPS @ np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(centres[index], itk_ras, atol=1e-4)
    sr_affine = upsample_affine(volume.affine, [4, 4, 1])
    save_nifti(tmp_path / "sr.nii.gz", np.zeros((36, 28, 5)), sr_affine, volume, PROVENANCE)
    out = nib.load(tmp_path / "sr.nii.gz")
    np.testing.assert_allclose(
        grid_corners_world(out.affine, out.shape), grid_corners_world(affine, (9, 7, 5)), atol=1e-4
    )
    itk_out = sitk.ReadImage(str(tmp_path / "sr.nii.gz"))
    corners = [(i, j, k) for i in (-0.5, 35.5) for j in (-0.5, 27.5) for k in (-0.5, 4.5)]
    itk_corners = np.array([LPS @ np.array(itk_out.TransformContinuousIndexToPhysicalPoint(c)) for c in corners])
    np.testing.assert_allclose(itk_corners, grid_corners_world(affine, (9, 7, 5)), atol=1e-4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.full((4, 4, 2), np.nan), "NaN or Inf"),  # refused without --repair-nonfinite
        (np.zeros((4, 4, 2, 2, 2)), "expected a 2D, 3D or 4D image"),
    ],
)
def test_unusable_volumes_are_refused_by_name(tmp_path, data, message):
    path = write_nifti(tmp_path / "bad.nii", data, np.eye(4))
    with pytest.raises(InputError, match=message) as info:
        load_nifti(path)
    assert str(path) in str(info.value)


def test_nonfinite_voxels_are_repaired_only_when_asked(tmp_path):
    data = smooth_image((4, 4, 2))
    data[0, 0, 0], data[1, 0, 0], data[2, 0, 0] = np.nan, np.inf, -np.inf
    volume = load_nifti(write_nifti(tmp_path / "x.nii", data, np.eye(4)), repair_nonfinite=True)
    finite = data[np.isfinite(data)]
    assert volume.data[0, 0, 0] == volume.data[2, 0, 0] == np.float32(finite.min())
    assert volume.data[1, 0, 0] == np.float32(finite.max())
    assert "3 NaN/Inf voxel(s) replaced" in volume.notes[0]
