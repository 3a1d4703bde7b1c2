"""NIfTI volumes in and out, with nibabel.

Loading reads the header first (shape and type are checked, and the memory limit applied, before any voxel is
read), then the voxels with scl_slope/scl_inter applied (``get_fdata``). Compression is told by content, not by the
name, as ITK does: a file starting with the gzip magic bytes is decompressed whatever its suffix, so an uncompressed
file named ``.nii.gz`` (written so by some converters) and a gzipped one named ``.nii`` both load. Saving keeps the
template's orientation codes, units, description, time step and extensions, writes the given affine into both qform
and sform with their codes set explicitly (a copied header would otherwise reset them; docs/sources.md, "Medical
image I/O"), writes float32 with slope 1 / intercept 0 unless an integer type is asked for, and records medsr's
provenance in a JSON comment extension.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medsr.errors import InputError
from medsr.io.atomic import atomic_path
from medsr.io.dtypes import quantize
from medsr.io.image import FLOAT32, Volume, check_finite, check_input_file, collect_logs, flat
from medsr.io.limits import MemoryLimit

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NIFTI_ECODE_COMMENT: the extension code of free text, here medsr's provenance as JSON.
COMMENT_ECODE = 6
#: qform/sform code of an image whose coordinates come from a scanner (NIFTI_XFORM_SCANNER_ANAT).
SCANNER_CODE = 1
#: Header data types medsr reads (names as numpy gives them); complex, RGB and bool are refused.
READABLE_KINDS = "iuf"
#: The first two bytes of every gzip stream (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"
#: sizeof_hdr, the header's first field: 348 for NIfTI-1, 540 for NIfTI-2 (either byte order).
HEADER_SIZES = {348: "Nifti1Image", 540: "Nifti2Image"}


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_gzip(path: Path) -> bool:
    """Whether the file at ``path`` starts with the gzip magic bytes (its content, whatever its name)."""
    with open(path, "rb") as file:
        return file.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def _image_class(path: Path, stream):
    """The nibabel class (NIfTI-1 or -2) that the header's sizeof_hdr names; the stream is left at its start."""
    import nibabel as nib

    first = stream.read(4)
    stream.seek(0)
    sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")} if len(first) == 4 else set()
    for size, name in HEADER_SIZES.items():
        if size in sizes:
            return getattr(nib, name)
    raise InputError(f"{path}: unreadable or corrupt NIfTI: the header's sizeof_hdr is neither 348 nor 540")


@contextlib.contextmanager
def _open(path: Path) -> Iterator:
    """nibabel image with its header parsed and its voxels not yet read, valid inside the ``with`` block.

    The file is decompressed when its content is gzip, whatever its suffix (nibabel alone goes by the suffix).
    """
    import gzip

    try:
        stream = (gzip.open if is_gzip(path) else open)(path, "rb")
    except OSError as exc:  # check_input_file ran, but the file can still vanish or fail to read
        raise InputError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc
    with stream:
        try:
            klass = _image_class(path, stream)
            image = klass.from_stream(stream)
        except InputError:
            raise
        except Exception as exc:  # a corrupt header can fail anywhere inside nibabel's parser
            raise InputError(f"{path}: unreadable or corrupt NIfTI: {flat(exc)}") from exc
        yield image


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """(X, Y, Z) or (X, Y, Z, T) from the header's dims: a 2D image gains Z = 1, a 5D one with T = 1 drops it."""
    if len(shape) == 2:
        return (*shape, 1)
    if len(shape) == 5 and shape[3] == 1:
        return (*shape[:3], shape[4])
    if len(shape) not in (3, 4):
        raise InputError(f"{path}: expected a 2D, 3D or 4D image, got shape {shape}")
    if 0 in shape:
        raise InputError(f"{path}: image has an empty axis, shape {shape}")
    return shape


def load_nifti(path: str | os.PathLike, limit: MemoryLimit | None = None, repair_nonfinite: bool = False) -> Volume:
    """Read a 2D, 3D or 4D NIfTI file as float32 with its scaling applied (2D becomes (X, Y, 1)).

    The header repairs nibabel makes (and would print: ``sform_code 123 not valid; setting to 0``) become the
    Volume's notes.

    Raises:
        InputError: missing, empty, unreadable, corrupt or truncated file; unsupported data type (complex, RGB);
            too large for ``limit``; NaN or Inf voxels (unless ``repair_nonfinite``).
    """
    path = Path(path)
    check_input_file(path, "a NIfTI file")
    with collect_logs("nibabel.global") as messages:
        volume = _read(path, limit, repair_nonfinite)
    return dataclasses.replace(volume, notes=volume.notes + tuple(dict.fromkeys(messages)))


def _read(path: Path, limit: MemoryLimit | None, repair_nonfinite: bool) -> Volume:
    with _open(path) as image:
        return _read_image(path, image, limit, repair_nonfinite)


def _read_image(path: Path, image, limit: MemoryLimit | None, repair_nonfinite: bool) -> Volume:
    """The Volume of an open nibabel image: header checks and the memory limit first, then the voxels."""
    try:
        stored = np.dtype(image.get_data_dtype())
        shape = _spatial_shape(path, tuple(int(n) for n in image.shape))
    except InputError:
        raise
    except Exception as exc:  # header fields nibabel cannot interpret
        raise InputError(f"{path}: corrupt NIfTI header: {flat(exc)}") from exc
    if stored.kind not in READABLE_KINDS or stored.fields is not None:
        raise InputError(f"{path}: unsupported NIfTI data type {stored}; medsr reads integer and float images")
    if limit is not None:
        limit.check(path, shape)
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(
            f"{path}: the header's affine is not a valid voxel-to-world transform: {np.round(affine, 4).tolist()}"
        )
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32).reshape(shape)
    except Exception as exc:  # truncated or corrupt data: EOFError, zlib.error, ValueError, OSError...
        raise InputError(f"{path}: unreadable, corrupt or truncated NIfTI data: {flat(exc)}") from exc
    data, note = check_finite(path, data, repair_nonfinite)
    header = image.header.copy()  # nibabel moved scl_slope/scl_inter into the data proxy: put them back
    header.set_slope_inter(*_proxy_scaling(image))
    return Volume(
        path=path,
        data=data,
        affine=affine,
        format="nifti",
        meta=header,
        stored_dtype=stored,
        notes=(note,) if note else (),
    )


def _proxy_scaling(image) -> tuple[float, float]:
    slope, inter = getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)
    return float(slope), float(inter)


def _header_for(template: Volume):
    """A header to write under: the template's own for a NIfTI source, else a fresh one in mm with scanner codes."""
    import nibabel as nib

    if template.format == "nifti":
        header = template.meta.copy()
        return header, int(header["qform_code"]), int(header["sform_code"])
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    return header, SCANNER_CODE, SCANNER_CODE


def _slope_inter(template: Volume, dtype: np.dtype) -> tuple[float, float]:
    """The template's scl_slope/scl_inter when writing its own integer type, else 1 / 0."""
    if template.format != "nifti" or dtype != template.stored_dtype:
        return 1.0, 0.0
    slope, inter = template.meta.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope, inter


def save_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    template: Volume,
    provenance: dict,
    dtype: np.dtype = FLOAT32,
    overwrite: bool = False,
) -> float:
    """Write ``data`` (X, Y, Z[, T], input units) with ``affine`` as NIfTI, atomically; return the fraction of
    voxels clipped to the range of an integer ``dtype``.

    The description is the template's (a NIfTI input's) or, when it has none, ``medsr <version> x<s> <model>``;
    ``provenance`` is always stored as a JSON comment extension.
    """
    import nibabel as nib

    header, qform_code, sform_code = _header_for(template)
    dtype = np.dtype(dtype)
    slope, inter = _slope_inter(template, dtype)
    stored, clipped = quantize(data, dtype, slope, inter)
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(stored, affine, header=header)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    image.header.set_slope_inter(slope, inter)
    zooms = list(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    time_zooms = list(template.meta.get_zooms()[3:]) if template.format == "nifti" else []
    image.header.set_zooms(tuple(zooms + (time_zooms + [1.0])[: data.ndim - 3]))
    if not bytes(image.header["descrip"]).strip(b"\x00 "):
        summary = (
            f"medsr {provenance.get('medsr_version', '')} x{provenance.get('scale', '')} {provenance.get('model', '')}"
        )
        image.header["descrip"] = summary.encode("ascii", "replace")[:79]
    comment = json.dumps({"medsr": provenance}, sort_keys=True).encode("utf-8")
    image.header.extensions.append(nib.nifti1.Nifti1Extension(COMMENT_ECODE, comment))
    with atomic_path(path, overwrite=overwrite) as tmp, collect_logs("nibabel.global"):
        nib.save(image, str(tmp))
    return clipped
