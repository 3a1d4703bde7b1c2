"""DICOM out: the SR image as a new derived series of the source's study (``--format dicom``).

Each output slice is its source slice's header with: new SeriesInstanceUID (one per run) and SOPInstanceUIDs, ImageType
DERIVED\\SECONDARY, a DerivationDescription naming medsr, its version and the model, a SourceImageSequence pointing
at the source slice, Rows/Columns of the SR grid, PixelSpacing (and ImagerPixelSpacing) divided by the scale,
ImagePositionPatient of the SR grid's first voxel from the one affine rule (medsr.io.affine), and the pixel data
re-quantized through the slice's own RescaleSlope/RescaleIntercept into the source's stored type (clipping counted).
Patient, study, orientation, photometric interpretation (MONOCHROME1 stays MONOCHROME1) and windowing are kept.
Overlays, icon images and pixel-value extremes of the old grid are dropped. Files are Explicit VR Little Endian.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np

from medsr.errors import InputError
from medsr.io.atomic import atomic_dir, atomic_path
from medsr.io.dicom import LPS_TO_RAS, DicomSeries, read_floats
from medsr.io.dtypes import quantize
from medsr.io.image import Volume, collect_logs, flat, require

#: Attributes that describe the old pixel grid and would be wrong on the new one.
STALE_KEYWORDS = (
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
)


def check_dicom_source(template: Volume) -> None:
    """Refuse ``--format dicom`` for a source whose patient and study cannot be carried over, or whose values
    cannot be stored back."""
    if template.format != "dicom":
        raise InputError(
            f"{template.path}: --format dicom needs a DICOM input (the output copies its patient and study); "
            f"this input is {template.format.upper()}"
        )
    if template.meta.modality_lut_sequence:
        raise InputError(
            f"{template.path}: the source uses a Modality LUT Sequence, which medsr cannot invert for DICOM output; "
            "use --format nifti"
        )


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit), as precise as that allows."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def _stored_limits(meta: DicomSeries, dtype: np.dtype) -> tuple[int, int]:
    bits = min(meta.bits_stored, dtype.itemsize * 8)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if meta.signed else (0, 2**bits - 1)


def _scaled_spacing(dataset, keyword: str, factors: tuple[float, float]) -> None:
    """Divide a valid PixelSpacing-like attribute (row, column spacing) by the upsampling of rows and columns."""
    spacing = read_floats(dataset, keyword, 2)
    if spacing is not None and (spacing > 0).all():
        setattr(dataset, keyword, [_ds(spacing[0] / factors[0]), _ds(spacing[1] / factors[1])])


def _derived_slice(source, k: int, pixels: np.ndarray, geometry: dict, provenance: dict, series_uid: str):
    """A copy of the source slice's header describing the SR slice ``k`` with stored ``pixels`` (rows, cols)."""
    import copy

    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = copy.deepcopy(source)
    for keyword in STALE_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    for tag in [elem.tag for elem in ds if 0x6000 <= elem.tag.group <= 0x60FF and elem.tag.group % 2 == 0]:
        del ds[tag]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.get("SOPClassUID", "")
    reference.ReferencedSOPInstanceUID = source.get("SOPInstanceUID", "")
    ds.SourceImageSequence = [reference]
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = _series_number(source)
    image_type = [str(v) for v in (source.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.DerivationDescription = (
        f"medsr {provenance.get('medsr_version')} x{provenance.get('scale')} super-resolution, "
        f"model {provenance.get('model')}"
    )[:1024]
    ds.SeriesDescription = f"{source.get('SeriesDescription', '')} SR x{provenance.get('scale')}".strip()[:64]
    now = datetime.datetime.now()
    ds.InstanceCreationDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Rows, ds.Columns = pixels.shape
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        _scaled_spacing(ds, keyword, geometry["factors"])
    if geometry["has_geometry"]:
        ds.ImagePositionPatient = [_ds(v) for v in geometry["positions"][k]]
    pixel_bytes = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    ds.add_new(0x7FE00010, "OB" if pixels.dtype.itemsize == 1 else "OW", pixel_bytes)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return ds


def _series_number(source) -> int:
    """The source's SeriesNumber + 1000 (a derived series gets its own number), or 1000."""
    number = read_floats(source, "SeriesNumber", 1)
    value = int(number[0]) + 1000 if number is not None else 1000
    return value if abs(value) < 2**31 else 1000


def _geometry(affine: np.ndarray, template: Volume, shape: tuple[int, ...]) -> dict:
    """IPP of each output slice (LPS mm) and the in-plane upsampling of rows and columns."""
    affine_lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    slices = np.stack([np.zeros(shape[2]), np.zeros(shape[2]), np.arange(shape[2])], axis=1)
    positions = slices @ affine_lps[:3, :3].T + affine_lps[:3, 3]
    source_cols, source_rows = template.data.shape[:2]
    factors = (shape[1] / source_rows, shape[0] / source_cols)
    return {"positions": positions, "factors": factors, "has_geometry": template.meta.has_geometry}


def save_dicom(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    template: Volume,
    provenance: dict,
    overwrite: bool = False,
) -> float:
    """Write ``data`` (X, Y, Z), input units, as a derived series of ``template``'s; return the clipped fraction.

    One slice (a radiograph) is written to the file ``path``; several to the directory ``path`` as
    ``0001.dcm``, ``0002.dcm``, ... in slice order. Both appear atomically.
    """
    generate_uid = require("pydicom.uid", "dicom", "writing DICOM").generate_uid
    check_dicom_source(template)
    meta: DicomSeries = template.meta
    if data.ndim != 3 or data.shape[2] != len(meta.datasets):
        raise InputError(f"{template.path}: DICOM output needs one image per source slice, got shape {data.shape}")
    dtype = np.dtype(template.stored_dtype)
    limits = _stored_limits(meta, dtype)
    geometry = _geometry(affine, template, data.shape)
    series_uid = generate_uid()
    clipped = []

    def derived_slices():
        for k, (source, (slope, inter)) in enumerate(zip(meta.datasets, meta.rescale)):
            pixels, fraction = quantize(data[:, :, k].T, dtype, slope, inter, limits)
            clipped.append(fraction)
            yield k, _derived_slice(source, k, pixels, geometry, provenance, series_uid)

    if len(meta.datasets) == 1:
        with atomic_path(path, overwrite=overwrite) as tmp:
            for _, ds in derived_slices():
                _write(ds, tmp, template.path)
    else:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            for k, ds in derived_slices():
                _write(ds, Path(tmp) / f"{k + 1:04d}.dcm", template.path)
    return float(np.mean(clipped))


def _write(ds, path: Path, source: Path) -> None:
    """Save one file; a source attribute pydicom cannot encode becomes an InputError (disk errors stay OSError)."""
    try:
        with collect_logs("pydicom"):
            ds.save_as(path, enforce_file_format=True)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises ValueError, TypeError, struct.error... for unencodable values
        raise InputError(f"{source}: cannot write the SR series as DICOM: {flat(exc)}") from exc
