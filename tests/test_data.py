"""Tests of medsr.data: reading through medsr.io and the engine's one preparation (DICOM modality LUT, MONOCHROME1,
PNG, TIFF, display orientation), foreground slices, pairs that are exactly the degradation of their HR, aligned
crops, and a split without file overlap."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsr.data.images import load_source
from medsr.data.pairs import (
    degradation_for,
    dihedral,
    make_pair,
    random_crop_pairs,
    random_crops,
    source_slices,
    trim_to_multiple,
)
from medsr.data.sources import Source, check_disjoint, default_split, resolve_sources, source_from_path
from medsr.degrade import make_degradation
from medsr.errors import InputError, ShapeError

#: The default preset's intensity window (percentiles).
P = (0.5, 99.5)


@pytest.fixture(scope="module")
def volume_path(tmp_path_factory) -> Path:
    """A 40 x 44 x 12 smooth random volume whose first and last two axial slices are empty (air)."""
    rng = np.random.default_rng(0)
    data = np.abs(np.cumsum(np.cumsum(rng.standard_normal((40, 44, 12)), axis=0), axis=1))
    data[..., :2] = 0
    data[..., -2:] = 0
    path = tmp_path_factory.mktemp("data") / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


def test_source_slices_skip_empty_and_normalize(volume_path):
    source = Source("vol", volume_path, "mri", axes=(2,))
    slices = source_slices(source, P)
    assert [s.index for s in slices] == list(range(2, 10))  # the 4 air slices are skipped
    assert all(s.image.shape == (40, 44) and s.image.dtype == np.float32 for s in slices)
    assert min(s.image.min() for s in slices) >= -1 and max(s.image.max() for s in slices) <= 1


def test_source_slices_along_every_axis_and_box(volume_path):
    source = Source("vol", volume_path, "mri", axes=(0, 1, 2), box=(None, (0, 30), None))
    shapes = {s.axis: s.image.shape for s in source_slices(source, P, min_size=8)}
    assert shapes == {0: (30, 12), 1: (40, 12), 2: (40, 30)}


@pytest.mark.parametrize("modality, operator", [("mri", "kspace"), ("xray", "lanczos")])
@pytest.mark.parametrize("scale", [2, 4])
def test_pair_is_the_degradation_of_hr(modality, operator, scale):
    hr = np.random.default_rng(1).standard_normal((42, 37)).astype(np.float32)
    op = degradation_for(modality, scale)
    trimmed, lr = make_pair(hr, op)
    assert op.name == operator
    assert trimmed.shape == (42 - 42 % scale, 37 - 37 % scale)
    assert lr.shape == (trimmed.shape[0] // scale, trimmed.shape[1] // scale)
    np.testing.assert_array_equal(lr, make_degradation(operator, scale).forward(trimmed).astype(np.float32))


def test_crops_are_aligned_windows_of_the_whole_slice_pair(volume_path):
    slices = source_slices(Source("vol", volume_path, "mri", axes=(2,)), P)[:1]
    hr_full, lr_full = make_pair(slices[0].image, degradation_for("mri", 4))
    hr, lr, _ = random_crop_pairs(slices, 5, 16, 4, np.random.default_rng(2), augment=False)
    assert hr.shape == (5, 16, 16) and lr.shape == (5, 4, 4)
    for hr_crop, lr_crop in zip(hr, lr):
        ((i, j),) = [
            (i, j)
            for i in range(0, 40 - 15, 4)
            for j in range(0, 44 - 15, 4)
            if np.array_equal(hr_full[i : i + 16, j : j + 16], hr_crop)
        ]
        np.testing.assert_array_equal(lr_crop, lr_full[i // 4 : i // 4 + 4, j // 4 : j // 4 + 4])


def test_augmented_crops_pair_with_the_degradation_of_the_flipped_slice(volume_path):
    slices = source_slices(Source("vol", volume_path, "mri", axes=(2,)), P)[:1]
    hr, lr, _ = random_crop_pairs(slices, 3, 40, 4, np.random.default_rng(3))
    for hr_crop, lr_crop in zip(hr, lr):
        matches = []
        for k in range(8):
            full_hr, full_lr = make_pair(dihedral(slices[0].image, k), degradation_for("mri", 4))
            for i in range(0, full_hr.shape[0] - 39, 4):
                for j in range(0, full_hr.shape[1] - 39, 4):
                    if np.array_equal(full_hr[i : i + 40, j : j + 40], hr_crop):
                        matches.append(np.array_equal(full_lr[i // 4 : i // 4 + 10, j // 4 : j // 4 + 10], lr_crop))
        assert matches and all(matches)


def test_crop_errors(volume_path):
    slices = source_slices(Source("vol", volume_path, "mri", axes=(2,)), P)
    rng = np.random.default_rng(0)
    with pytest.raises(ShapeError, match="multiple of the scale"):
        random_crop_pairs(slices, 1, 18, 4, rng)
    with pytest.raises(ShapeError, match="no slice"):
        random_crop_pairs(slices, 1, 64, 4, rng)
    with pytest.raises(ShapeError, match="no slice"):
        random_crops(slices, 1, 64, rng)
    assert random_crops(slices, 2, 24, rng).shape == (2, 24, 24)
    with pytest.raises(ShapeError, match="smaller than"):
        trim_to_multiple(np.zeros((3, 8)), 4)


def test_dihedral_gives_eight_distinct_images():
    image = np.arange(12.0).reshape(3, 4)
    variants = {dihedral(image, k).tobytes() + bytes(dihedral(image, k).shape) for k in range(8)}
    assert len(variants) == 8


def test_load_source_frames(example4d_path, volume_path):
    assert load_source(example4d_path, P, frame=1).data.shape == (128, 96, 24)
    with pytest.raises(InputError, match="choose a frame"):
        load_source(example4d_path, P)
    with pytest.raises(InputError, match="3D image"):
        load_source(volume_path, P, frame=1)


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str, slope: float, intercept: float) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_modality_lut_and_monochrome1(tmp_path, photometric):
    pytest.importorskip("pydicom")
    pixels = np.arange(24).reshape(4, 6) * 10
    path = tmp_path / "x.dcm"
    _write_dicom(path, pixels, photometric, slope=2.0, intercept=-100.0)
    values = pixels * 2.0 - 100.0
    prepared = load_source(path, (0.0, 100.0))
    np.testing.assert_array_equal(prepared.data[..., 0].T, values)  # medsr.io's (X = columns, Y = rows), stored units
    # the network sees the rows and columns of the file, bright = dense for both photometric interpretations
    dense = values.max() + values.min() - values if photometric == "MONOCHROME1" else values
    expected = 2 * (dense - dense.min()) / (dense.max() - dense.min()) - 1
    np.testing.assert_allclose(prepared.planes(2)[0][0], expected, atol=1e-6)
    [item] = source_slices(Source("x", path, "xray"), P, min_size=4)
    assert item.image.shape == (4, 6)
    assert (item.image[-1, -1] > item.image[0, 0]) == (photometric == "MONOCHROME2")


def test_png_and_tiff(tmp_path):
    from PIL import Image

    gray = (np.arange(48).reshape(6, 8) * 1000).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "a.png")
    [plane], _ = load_source(tmp_path / "a.png", (0.0, 100.0)).planes(2)
    np.testing.assert_allclose(plane, gray / gray.max() * 2 - 1, atol=1e-6)  # rows x columns, as stored
    values = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "b.tif")
    np.testing.assert_array_equal(load_source(tmp_path / "b.tif", P).data[..., 0].T, values)
    rgb = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(InputError, match="grayscale"):  # a training source must be an image medsr-infer reads
        source_slices(Source("c", tmp_path / "c.png", "xray"), P, min_size=4)


def test_image_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_source(tmp_path / "missing.png", P)
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="unknown image type"):
        load_source(tmp_path / "x.jpg", P)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        load_source(tmp_path / "bad.png", P)
    (tmp_path / "bad.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match="bad.dcm"):
        load_source(tmp_path / "bad.dcm", P)


def test_default_split_has_no_file_overlap():
    split = default_split()
    check_disjoint(split["train"], split["heldout"])
    heldout_files = {s.file_key for s in split["heldout"] if s.box is None}
    assert heldout_files and not heldout_files & {s.file_key for s in split["train"]}
    slab = next(s for s in split["heldout"] if s.name == "colin27-slab").box[2]
    for seen in (s for s in split["train"] if s.file_key == next(iter(split["heldout"])).file_key):
        start, stop = seen.box[2]
        assert (stop is not None and stop <= slab[0] - 8) or start >= slab[1] + 8  # the unused gap


def test_check_disjoint_refuses_overlap(volume_path):
    whole = Source("a", volume_path, "mri")
    part = Source("b", volume_path, "mri", box=(None, None, (0, 4)))
    other = Source("c", volume_path, "mri", box=(None, None, (4, None)))
    check_disjoint([part], [other])
    with pytest.raises(InputError, match="overlaps"):
        check_disjoint([whole], [part])


def test_resolve_sources(volume_path):
    sources = resolve_sources(["default:train-mri", "shoulder", str(volume_path)], modality="xray")
    assert [s.modality for s in sources] == ["mri", "mri", "mri", "xray"]
    assert sources[-1] == source_from_path(volume_path, "xray")
    with pytest.raises(InputError, match="not a source name"):
        resolve_sources(["no-such-thing"])
    with pytest.raises(InputError, match="modality"):
        Source("x", volume_path, "ct")
