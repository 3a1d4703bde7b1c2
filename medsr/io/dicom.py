"""DICOM in: a series directory or a single file as a Volume (docs/sources.md, "Medical image I/O").

Files are grouped by SeriesInstanceUID (one series is chosen, or the series are listed), sorted by the position of
ImagePositionPatient along the slice normal (cross product of the two ImageOrientationPatient vectors; never by
InstanceNumber or file name), and the slice step is taken from the positions, not SliceThickness. The affine is built
in LPS (DICOM's patient coordinates) and turned to RAS by diag(-1, -1, 1). Values go through the modality LUT
(RescaleSlope/RescaleIntercept or a Modality LUT Sequence); MONOCHROME1 is flagged on the Volume (``inverted``).
PixelSpacing may be missing or zero: ImagerPixelSpacing is used instead, then 1 mm with a note.

Geometry of one slice (DICOM PS3.3 C.7.6.2.1.1): pixel (column i, row j) sits at
``IPP + row_dir * column_spacing * i + col_dir * row_spacing * j`` with ``PixelSpacing = [row_spacing,
column_spacing]``, so the affine's columns are ``row_dir * PixelSpacing[1]``, ``col_dir * PixelSpacing[0]``, the
slice step vector, and the first slice's IPP.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsr.errors import InputError
from medsr.io.image import Volume, check_finite, check_input_file, collect_logs, flat, require
from medsr.io.limits import MemoryLimit

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: LPS (DICOM) to RAS (NIfTI) and back: the same matrix.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Two IOP vectors closer than this (per component) are the same orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Slice positions may deviate from a regular grid by this fraction of the slice step.
SPACING_TOLERANCE = 0.01


@dataclass(frozen=True)
class DicomSeries:
    """What a DICOM writer needs from the source series (``Volume.meta``).

    ``datasets`` are the source headers without pixel data, in slice order (k = 0, 1, ...); ``rescale`` holds each
    slice's (RescaleSlope, RescaleIntercept); ``bits_stored`` and ``signed`` bound the stored values;
    ``has_geometry``: the source carried ImagePositionPatient and ImageOrientationPatient; ``spacing_known``: it
    carried a valid PixelSpacing or ImagerPixelSpacing; ``modality_lut_sequence``: values went through a
    (non-invertible) Modality LUT Sequence.
    """

    datasets: tuple
    files: tuple[Path, ...]
    rescale: tuple[tuple[float, float], ...]
    bits_stored: int
    signed: bool
    has_geometry: bool
    spacing_known: bool
    modality_lut_sequence: bool


@dataclass(frozen=True)
class SeriesEntry:
    """One series found in a directory: its files and their headers (without pixel data), in file-name order."""

    uid: str
    files: tuple[Path, ...]
    headers: tuple

    @property
    def header(self):
        return self.headers[0]

    def describe(self) -> str:
        number = self.header.get("SeriesNumber", "?")
        modality = self.header.get("Modality", "?")
        text = str(self.header.get("SeriesDescription", "")).strip()
        return f"{self.uid} (#{number} {modality}{' ' + repr(text) if text else ''}, {len(self.files)} file(s))"


def has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` starts with the 128-byte preamble and ``DICM`` (DICOM PS3.10 file format)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path))


def dicom_files(directory: Path) -> list[Path]:
    """The DICOM files directly inside ``directory`` (by suffix or preamble; hidden files skipped), sorted."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise InputError(f"{directory}: cannot list directory: {exc.strerror or exc}") from exc
    return [p for p in entries if not p.name.startswith(".") and is_dicom_file(p)]


def _read(path: Path, pixels: bool):
    """pydicom Dataset of ``path`` (headers only unless ``pixels``), its warnings silenced: errors become one line."""
    pydicom = require("pydicom", "dicom", "reading DICOM")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=not pixels)
            for _ in dataset:  # decode every top-level element now, so a malformed value fails here, not later
                pass
            return dataset
        except pydicom.errors.InvalidDicomError as exc:
            raise InputError(f"{path}: not a DICOM file (no DICM preamble and no file meta information)") from exc
        except Exception as exc:  # pydicom raises many types for corrupt or truncated files
            raise InputError(f"{path}: unreadable DICOM: {flat(exc)}") from exc


def scan_series(files: Iterable[Path], failures: list[tuple[Path, InputError]] | None = None) -> dict[str, SeriesEntry]:
    """Group DICOM files by SeriesInstanceUID, reading headers only. Files without pixel data (DICOMDIR, reports,
    presentation states) are left out. An unreadable file raises InputError, or with ``failures`` is appended there
    and left out."""
    groups: dict[str, list[tuple[Path, object]]] = {}
    for path in files:
        try:
            with collect_logs("pydicom"):  # the load reports what matters; a scan stays quiet
                header = _read(path, pixels=False)
        except InputError as exc:
            if failures is None:
                raise
            failures.append((path, exc))
            continue
        if "PixelData" not in header and "Rows" not in header:
            continue
        groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append((path, header))
    return {
        uid: SeriesEntry(uid, tuple(p for p, _ in items), tuple(h for _, h in items)) for uid, items in groups.items()
    }


def choose_series(where: Path, series: dict[str, SeriesEntry], wanted: str | None) -> SeriesEntry:
    """The series whose UID or SeriesNumber is ``wanted``, or the only one; else InputError listing them all."""
    if not series:
        raise InputError(f"{where}: no DICOM image found")
    if wanted is not None:
        for entry in series.values():
            if wanted in (entry.uid, str(entry.header.get("SeriesNumber", ""))):
                return entry
        listing = "; ".join(entry.describe() for _, entry in sorted(series.items()))
        raise InputError(f"{where}: no series {wanted!r}; found {listing}")
    if len(series) > 1:
        listing = "; ".join(entry.describe() for _, entry in sorted(series.items()))
        raise InputError(f"{where}: holds {len(series)} DICOM series; choose one with --series UID: {listing}")
    return next(iter(series.values()))


def read_floats(dataset, keyword: str, count: int) -> np.ndarray | None:
    """The ``count`` numbers of a DS/IS attribute as float64, or None when missing, malformed or not finite."""
    value = dataset.get(keyword)
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
    try:
        values = np.array([float(item) for item in items], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    return values if values.shape == (count,) and np.isfinite(values).all() else None


def _int(dataset, keyword: str, default: int = 0) -> int:
    """An integer attribute (US/IS), ``default`` when missing or malformed."""
    values = read_floats(dataset, keyword, 1)
    return int(values[0]) if values is not None and abs(values[0]) < 2**31 else default


def pixel_spacing(dataset) -> tuple[np.ndarray, str | None]:
    """(row spacing, column spacing) in mm: PixelSpacing, else ImagerPixelSpacing, else (1, 1) with a note."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = read_floats(dataset, keyword, 2)
        if spacing is not None and (spacing > 0).all():
            return spacing, None
    return np.ones(2), "no valid PixelSpacing or ImagerPixelSpacing: assuming 1 mm pixels"


def _orientation(path: Path, dataset) -> np.ndarray | None:
    """(2, 3) unit row and column directions from ImageOrientationPatient, None when absent."""
    iop = read_floats(dataset, "ImageOrientationPatient", 6)
    if iop is None:
        return None
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise InputError(f"{path}: ImageOrientationPatient {iop.tolist()} is not two orthogonal unit vectors")
    return np.stack([row / np.linalg.norm(row), col / np.linalg.norm(col)])


def _slice_geometry(entry: SeriesEntry) -> tuple[list[int], np.ndarray, bool]:
    """Slice order, LPS affine (4, 4) and whether the files carried IPP/IOP."""
    headers = entry.headers
    first = headers[0]
    spacing, _ = pixel_spacing(first)
    orientation = _orientation(entry.files[0], first)
    positions = [read_floats(h, "ImagePositionPatient", 3) for h in headers]
    affine = np.eye(4)
    if orientation is None or any(p is None for p in positions):
        if len(headers) > 1:
            raise InputError(
                f"{entry.files[0].parent}: series {entry.uid} has {len(headers)} slices but not every one has "
                "ImagePositionPatient and ImageOrientationPatient: cannot order them"
            )
        affine[:3, 0], affine[:3, 1] = [spacing[1], 0, 0], [0, spacing[0], 0]
        affine[2, 2] = _slice_thickness(first)
        return [0], affine, False
    for path, header in zip(entry.files, headers):
        other = _orientation(path, header)
        if other is None or np.abs(other - orientation).max() > ORIENTATION_TOLERANCE:
            raise InputError(f"{path}: slice orientation differs from {entry.files[0].name}: not one volume")
    normal = np.cross(orientation[0], orientation[1])
    positions = np.array(positions)
    order = [int(i) for i in np.argsort(positions @ normal, kind="stable")]
    affine[:3, 0] = orientation[0] * spacing[1]
    affine[:3, 1] = orientation[1] * spacing[0]
    affine[:3, 2] = _slice_step(entry, positions[order], normal, first)
    affine[:3, 3] = positions[order[0]]
    return order, affine, True


def _slice_thickness(dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = read_floats(dataset, keyword, 1)
        if value is not None and value[0] > 0:
            return float(value[0])
    return 1.0


def _slice_step(entry: SeriesEntry, positions: np.ndarray, normal: np.ndarray, first) -> np.ndarray:
    """The step vector between consecutive sorted slices (allows a gantry tilt); refuses uneven or repeated slices."""
    if len(positions) == 1:
        return normal * _slice_thickness(first)
    steps = np.diff(positions @ normal)
    where = entry.files[0].parent
    if steps.min() < 1e-3:
        raise InputError(
            f"{where}: series {entry.uid} has slices at the same position (several acquisitions or echoes in one "
            "series?); medsr needs one slice per position"
        )
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step
    deviation = np.linalg.norm(positions - expected, axis=1).max()
    if deviation > SPACING_TOLERANCE * np.linalg.norm(step):
        raise InputError(
            f"{where}: series {entry.uid} is not evenly spaced (slice gaps from {steps.min():.4g} to "
            f"{steps.max():.4g} mm); medsr needs a regular grid"
        )
    return step


def _check_pixel_format(path: Path, header) -> None:
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"{path}: unsupported PhotometricInterpretation {photometric!r}; medsr reads grayscale")
    frames = _int(header, "NumberOfFrames", 1)
    if frames > 1:
        raise InputError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; export single frames")
    if _int(header, "SamplesPerPixel", 1) != 1:
        raise InputError(f"{path}: {_int(header, 'SamplesPerPixel')} samples per pixel; medsr reads grayscale")
    if _int(header, "BitsAllocated") not in (8, 16, 32) or "FloatPixelData" in header:
        raise InputError(f"{path}: unsupported pixel type (BitsAllocated {header.get('BitsAllocated')!r})")


def _same_frame(path: Path, header, reference) -> None:
    for keyword in ("Rows", "Columns", "BitsAllocated", "PixelRepresentation", "PhotometricInterpretation"):
        if header.get(keyword) != reference.get(keyword):
            raise InputError(
                f"{path}: {keyword} {header.get(keyword)!r} differs from the series' {reference.get(keyword)!r}"
            )


def _pixels(path: Path, dataset) -> tuple[np.ndarray, tuple[float, float]]:
    """Modality values (rows, cols) float32 of one file, and its (slope, intercept)."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in dataset:
        raise InputError(f"{path}: no pixel data after the header (a truncated file?)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            stored = dataset.pixel_array
            values = apply_modality_lut(stored, dataset)
        except Exception as exc:  # missing decoders, truncated pixel data, bad LUTs
            raise InputError(f"{path}: cannot decode pixel data: {flat(exc)}") from exc
    rows, cols = _int(dataset, "Rows"), _int(dataset, "Columns")
    if stored.shape != (rows, cols):
        raise InputError(f"{path}: pixel data of shape {stored.shape} for Rows x Columns {rows} x {cols}")
    slope = read_floats(dataset, "RescaleSlope", 1)
    inter = read_floats(dataset, "RescaleIntercept", 1)
    rescale = (float(slope[0]) if slope is not None else 1.0, float(inter[0]) if inter is not None else 0.0)
    return np.asarray(values, dtype=np.float32), rescale


def load_dicom(
    path: str | os.PathLike,
    series: str | None = None,
    limit: MemoryLimit | None = None,
    repair_nonfinite: bool = False,
) -> Volume:
    """Read a DICOM series directory, or one DICOM file, as a Volume (X = columns, Y = rows, Z = slices).

    What pydicom would print (e.g. excess pixel padding) becomes the Volume's notes.

    Raises:
        InputError: no DICOM image, several series and none chosen, corrupt or truncated files, inconsistent
            slices (size, orientation, uneven spacing, repeated positions), colour or multi-frame images, pixel data
            that cannot be decoded, an image too large for ``limit``, NaN/Inf values.
    """
    path = Path(path)
    with collect_logs("pydicom") as messages:
        volume = _load(path, series, limit, repair_nonfinite)
    return dataclasses.replace(volume, notes=volume.notes + tuple(dict.fromkeys(messages)))


def _load(path: Path, series: str | None, limit: MemoryLimit | None, repair_nonfinite: bool) -> Volume:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_dir():
        check_input_file(path, "a DICOM file")
    files = dicom_files(path) if path.is_dir() else [path]
    entry = choose_series(path, scan_series(files), series)
    first = entry.header
    _check_pixel_format(entry.files[0], first)
    order, affine_lps, has_geometry = _slice_geometry(entry)
    rows, cols = _int(first, "Rows"), _int(first, "Columns")
    if rows < 1 or cols < 1:
        raise InputError(f"{entry.files[0]}: image has {rows} rows and {cols} columns")
    if limit is not None:
        limit.check(path, (cols, rows, len(order)))
    data = np.empty((cols, rows, len(order)), dtype=np.float32)
    datasets, rescale = [], []
    for k, index in enumerate(order):
        file = entry.files[index]
        dataset = _read(file, pixels=True)
        _same_frame(file, dataset, first)
        values, slice_rescale = _pixels(file, dataset)
        data[:, :, k] = values.T
        del dataset.PixelData
        datasets.append(dataset)
        rescale.append(slice_rescale)
    data, note = check_finite(path, data, repair_nonfinite)
    _, spacing_note = pixel_spacing(first)
    meta = DicomSeries(
        datasets=tuple(datasets),
        files=tuple(entry.files[i] for i in order),
        rescale=tuple(rescale),
        bits_stored=min(_int(first, "BitsStored", _int(first, "BitsAllocated")) or 64, _int(first, "BitsAllocated")),
        signed=_int(first, "PixelRepresentation") == 1,
        has_geometry=has_geometry,
        spacing_known=spacing_note is None,
        modality_lut_sequence="ModalityLUTSequence" in first,
    )
    return Volume(
        path=path,
        data=data,
        affine=LPS_TO_RAS @ affine_lps,
        format="dicom",
        meta=meta,
        stored_dtype=_stored_dtype(first),
        inverted=str(first.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1",
        notes=tuple(n for n in (spacing_note, note) if n),
    )


def _stored_dtype(header) -> np.dtype:
    signed = _int(header, "PixelRepresentation") == 1
    return np.dtype(f"{'i' if signed else 'u'}{_int(header, 'BitsAllocated') // 8}")
