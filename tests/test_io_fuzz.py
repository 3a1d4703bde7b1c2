"""Hypothesis fuzzing of the NIfTI and DICOM header paths: whatever the header says, reading either works or raises
InputError (one line, naming the file) — never another exception, never a huge allocation.

NIfTI: a valid single-file image whose header fields (dims, datatype, pixdim, vox_offset, scaling, codes,
quaternion, srows, magic) are overwritten with arbitrary values, plus byte flips and truncation. DICOM: a real CT
slice (pydicom's CT5N) whose geometry, pixel-format and rescale attributes are replaced by arbitrary strings and
numbers, written with pydicom's validation off, read alone and as part of a series; plus byte flips and truncation.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_fixtures import ct5n_dir, smooth_image, write_nifti

from medsr.engine.jobs import InferSettings, prepare_job
from medsr.errors import InputError, MedsrError
from medsr.io.dicom import load_dicom
from medsr.io.inputs import Job
from medsr.io.limits import MemoryLimit
from medsr.io.nifti import load_nifti

LIMIT = MemoryLimit(256 << 20, 4, "the test's limit")
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
#: A bundle as prepare_job sees it: scale, size unit and intensity percentiles.
BUNDLE = SimpleNamespace(
    scale=4,
    lr_multiple=4,
    manifest=SimpleNamespace(task=SimpleNamespace(intensity=SimpleNamespace(low=0.5, high=99.5))),
)
SETTINGS = InferSettings(max_bytes=LIMIT.max_bytes)

# (offset, struct format) of NIfTI-1 header fields (nifti1.h).
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"),
    **{f"dim{i}": (40 + 2 * i, "<h") for i in range(8)},
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    **{f"pixdim{i}": (76 + 4 * i, "<f") for i in range(8)},
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    **{name: (256 + 4 * i, "<f") for i, name in enumerate(["qb", "qc", "qd", "qx", "qy", "qz"])},
    **{f"srow{i}": (280 + 4 * i, "<f") for i in range(12)},
}
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1.0, 1e-30, 1e30]),
)
SHORTS = st.one_of(st.integers(-(2**15), 2**15 - 1), st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 16, 512, 768, 2048]))


def _field_values():
    return st.dictionaries(
        st.sampled_from(sorted(NIFTI_FIELDS)),
        st.one_of(FLOATS, SHORTS, st.integers(-(2**31), 2**31 - 1)),
        min_size=1,
        max_size=5,
    )


def _patch(blob: bytearray, name: str, value) -> None:
    offset, fmt = NIFTI_FIELDS[name]
    if fmt == "<f":
        value = float(value)
    else:
        bits = 8 * struct.calcsize(fmt)
        value = int(value) if np.isfinite(float(value)) else 0
        value = (value + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)
    struct.pack_into(fmt, blob, offset, value)


def _nothing_printed(capfd) -> None:
    """Neither medsr nor the libraries under it wrote to stdout or stderr (warnings must become notes)."""
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def _must_be_clean(load) -> None:
    """Run ``load``; only InputError may come out, and its message must be one line."""
    try:
        load()
    except InputError as exc:
        assert "\n" not in str(exc)


def _base_nifti(directory: Path) -> bytearray:
    path = write_nifti(directory / "base.nii", smooth_image((6, 5, 4)), np.eye(4), dtype=np.int16, slope=0.5)
    return bytearray(path.read_bytes())


@FUZZ
@given(fields=_field_values(), magic=st.sampled_from([b"n+1\0", b"ni1\0", b"xyz\0", b"n+2\0"]))
def test_nifti_header_fields(fields, magic, capfd):
    """Also: nothing printed (nibabel's header repairs become notes)."""
    capfd.readouterr()
    with tempfile.TemporaryDirectory() as tmp:
        blob = _base_nifti(Path(tmp))
        for name, value in fields.items():
            _patch(blob, name, value)
        blob[344:348] = magic
        path = Path(tmp) / "fuzz.nii"
        path.write_bytes(bytes(blob))
        _must_be_clean(lambda: load_nifti(path, limit=LIMIT))
        _must_be_clean(
            lambda: prepare_job(
                Job(path, "fuzz"), Path(tmp) / "out.nii", BUNDLE, InferSettings(max_bytes=LIMIT.max_bytes)
            )
        )
    _nothing_printed(capfd)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=8), cut=st.integers(0, 800))
def test_nifti_bytes(flips, cut):
    with tempfile.TemporaryDirectory() as tmp:
        blob = _base_nifti(Path(tmp))
        for position, value in flips:
            blob[position % len(blob)] = value
        path = Path(tmp) / "fuzz.nii.gz" if cut % 2 else Path(tmp) / "fuzz.nii"
        payload = bytes(blob[: len(blob) - cut % len(blob)])
        if path.suffix == ".gz":
            import gzip

            payload = gzip.compress(payload)[: max(1, len(payload) - cut)]
        path.write_bytes(payload)
        _must_be_clean(lambda: load_nifti(path, limit=LIMIT))


DICOM_TEXT = st.one_of(
    st.text(alphabet="0123456789.-+eE\\ naif", max_size=24),
    st.sampled_from(["0.000", "", "1\\1", "nan\\nan", "-1\\2", "1e308\\1e308", "0\\0\\1\\1\\0\\0", "1\\0\\0\\0\\1\\0"]),
)
DICOM_NUMBERS = {
    "Rows": st.integers(0, 70000),
    "Columns": st.integers(0, 70000),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 3),
    "SamplesPerPixel": st.integers(0, 4),
}
DICOM_STRINGS = [
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
    "NumberOfFrames",
    "SliceThickness",
    "SeriesInstanceUID",
]
PHOTOMETRIC = st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "", "monochrome2"])


@st.composite
def dicom_edits(draw):
    numbers = draw(st.dictionaries(st.sampled_from(sorted(DICOM_NUMBERS)), st.integers(0, 0), max_size=3))
    edits = {key: draw(DICOM_NUMBERS[key]) for key in numbers}
    for key in draw(st.lists(st.sampled_from(DICOM_STRINGS), max_size=4, unique=True)):
        edits[key] = draw(DICOM_TEXT)
    if draw(st.booleans()):
        edits["PhotometricInterpretation"] = draw(PHOTOMETRIC)
    return edits, draw(st.integers(-600, 600)), draw(st.booleans())


def _write_edited(source: Path, target: Path, edits: dict, pixel_delta: int, drop: bool) -> None:
    ds = pydicom.dcmread(source)
    for keyword, value in edits.items():
        setattr(ds, keyword, value)
    if pixel_delta < 0:
        ds.PixelData = ds.PixelData[:pixel_delta]
    elif pixel_delta > 0:
        ds.PixelData = ds.PixelData + b"\0" * pixel_delta
    if drop:
        del ds.PixelData
    ds.save_as(target, enforce_file_format=True)


@FUZZ
@given(edit=dicom_edits())
def test_dicom_header_fields(edit, capfd):
    """Also: nothing printed (pydicom's warnings become notes or errors)."""
    capfd.readouterr()
    edits, pixel_delta, drop = edit
    config = pydicom.config.settings
    saved = (config.writing_validation_mode, config.reading_validation_mode)
    config.writing_validation_mode = config.reading_validation_mode = pydicom.config.IGNORE
    try:
        with tempfile.TemporaryDirectory() as tmp:
            series = Path(tmp) / "series"
            series.mkdir()
            files = sorted(ct5n_dir().iterdir())
            for source in files[:2]:
                (series / source.name).write_bytes(source.read_bytes())
            try:
                _write_edited(files[2], series / "edited.dcm", edits, pixel_delta, drop)
            except (ValueError, TypeError, OverflowError, OSError, struct.error):
                return  # pydicom cannot even write this one
            _must_be_clean(lambda: load_dicom(series / "edited.dcm", limit=LIMIT))
            _must_be_clean(lambda: load_dicom(series, limit=LIMIT))
            _must_be_clean(
                lambda: prepare_job(
                    Job(series, "s"), Path(tmp) / "o.nii", BUNDLE, InferSettings(max_bytes=LIMIT.max_bytes)
                )
            )
            _nothing_printed(capfd)
    finally:
        config.writing_validation_mode, config.reading_validation_mode = saved


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), max_size=10), cut=st.integers(0, 3000))
def test_dicom_bytes(flips, cut):
    blob = bytearray(min(ct5n_dir().iterdir()).read_bytes())
    for position, value in flips:
        blob[position % len(blob)] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.dcm"
        path.write_bytes(bytes(blob[: len(blob) - cut % len(blob)]))
        _must_be_clean(lambda: load_dicom(path, limit=LIMIT))


def test_errors_of_the_fuzzed_paths_are_medsr_errors():
    """The contract the fuzzing relies on: InputError is what the command line prints as one line."""
    assert issubclass(InputError, MedsrError)
    with pytest.raises(InputError):
        load_dicom(Path("/nonexistent/x.dcm"))
