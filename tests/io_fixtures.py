"""Helpers shared by the I/O, tiling and medsr-infer tests: real DICOM files from pydicom's packages, small images
built from them, NIfTI writers, hashing of inputs, and world-coordinate oracles that do not use medsr.io."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

FOUR = 4  # the tiny preset's scale


def ct5n_dir() -> Path:
    """pydicom's 5-slice CT series (16x16, files in reverse order of position)."""
    import pydicom

    return Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"


def pydicom_file(name: str) -> Path:
    """A file of pydicom-data (RG1_UNCR.dcm: MONOCHROME1 chest CR; MR2_UNCR.dcm: oblique shoulder MR)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def hash_tree(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or directories), to prove inputs are untouched."""
    digests = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in Path(root).rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def listing(directory: Path) -> list[str]:
    """Every entry under ``directory``, hidden ones included (temporary files would show here)."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


def oblique_affine(zooms=(0.9, 1.1, 2.5), origin=(-40.0, 25.0, 12.0)) -> np.ndarray:
    """A voxel -> RAS affine rotated about all three axes (no axis is aligned with the world's)."""
    a, b, c = 0.3, -0.5, 0.8
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


def smooth_image(shape, seed: int = 0) -> np.ndarray:
    """A smooth, non-constant float image of ``shape`` (sums of sines), values about 0..1000."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = np.zeros(shape)
    for _ in range(3):
        image += np.sin(sum(g * rng.uniform(0.05, 0.4) for g in grids) + rng.uniform(0, 6))
    return (image - image.min()) / np.ptp(image) * 1000.0


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    dtype=np.float32,
    slope=None,
    inter=None,
    descrip: str = "",
    codes=(1, 1),
) -> Path:
    """Write ``data`` as NIfTI-1 with nibabel: stored ``dtype``, optional scl_slope/inter (``data`` in stored units)."""
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    if slope is not None:
        image.header.set_slope_inter(slope, inter or 0.0)
    if descrip:
        image.header["descrip"] = descrip.encode()
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(path))
    return path


def copy_series(directory: Path, names: list[str] | None = None) -> Path:
    """Copy CT5N into ``directory`` (optionally renaming the files, e.g. to shuffle their order)."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = sorted(ct5n_dir().iterdir())
    for i, source in enumerate(sources):
        shutil.copy(source, directory / (names[i] if names else source.name))
    return directory


def write_series(
    directory: Path,
    positions,
    orientation=(1, 0, 0, 0, 1, 0),
    uid: str | None = None,
    rows: int = 16,
    cols: int = 16,
    spacing=(0.5, 0.5),
    modify=None,
    prefix: str = "im",
) -> Path:
    """A synthetic series built from CT5N's first header: one slice per IPP in ``positions`` (LPS mm).

    ``modify(ds, k)`` may change each dataset before it is saved.
    """
    import pydicom
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(min(ct5n_dir().iterdir()))
    series_uid = uid or generate_uid()
    for k, position in enumerate(positions):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
        ds.Rows, ds.Columns = rows, cols
        pixels = (smooth_image((rows, cols), seed=k) - 500).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        ds.InstanceNumber = len(positions) - k
        if modify is not None:
            modify(ds, k)
        ds.save_as(directory / f"{prefix}{k:03d}.dcm", enforce_file_format=True)
    return directory


def radiograph_crop(path: Path, size=(40, 48), origin=(900, 900)) -> Path:
    """A small DICOM cut from pydicom-data's RG1_UNCR.dcm (real CR header: MONOCHROME1, PixelSpacing 0.000)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm"))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pixels = ds.pixel_array[origin[0] : origin[0] + size[0], origin[1] : origin[1] + size[1]]
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_world_centres(dataset_paths: list[Path]) -> np.ndarray:
    """World (LPS mm) of every pixel centre, straight from each file's IPP/IOP/PixelSpacing (DICOM PS3.3
    C.7.6.2.1.1), slices sorted along the normal: (Z, rows, cols, 3). An oracle independent of medsr.io."""
    import pydicom

    slices = []
    for path in dataset_paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        j, i = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        world = ipp + i[..., None] * dc * iop[:3] + j[..., None] * dr * iop[3:]
        normal = np.cross(iop[:3], iop[3:])
        slices.append((float(ipp @ normal), world))
    return np.stack([world for _, world in sorted(slices, key=lambda item: item[0])])


def nifti_world_centres(affine: np.ndarray, shape) -> np.ndarray:
    """World (RAS mm) of every voxel centre of a (X, Y, Z) grid: (X, Y, Z, 3)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1)
    return index @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


class StandInPipeline:
    """The batch interface of medsr.engine.pipeline.LatentSRPipeline over a stand-in's own ``super_resolve(lr,
    options, progress=None, first_index=0) -> SRResult``, batch by batch on the calling thread."""

    def super_resolve_batches(self, batches, options, sink, progress=None, trace=None, overlap=True):
        for batch in batches:
            sink(batch, self.super_resolve(batch.lr, options, first_index=batch.first_index))
