"""Named sources of real training and evaluation images, and the default train / held-out split.

A source is one file (a NIfTI volume, optionally a voxel box and frame of it, or a 2D image) with the modality
that decides its degradation (``mri``: k-space truncation; ``xray``: Lanczos). Data that ships offline here
(docs/sources.md, "Data that ships offline"):

- Colin27 T1 brain, 181 x 217 x 181 at 1 mm (Debian package mricron-data, BSD-3 / MNI): one subject.
- nibabel's example4d EPI, 128 x 96 x 24 x 2 at 2 x 2 x 2.2 mm (MIT): another subject and contrast (T2*).
- pydicom-data: RG1_UNCR chest and RG3_UNCR lower-leg CR radiographs, MR2_UNCR shoulder T1 MRI slice (MIT).

The split is by file, never by slice, with one exception forced by Colin27 being a single subject: its axial
slab z = 96..119 is held out and the 8 slices (8 mm) on either side are used by nothing, so no training slice is a
near-copy of a held-out one (training slices along x and y are cut from the boxes outside the slab and gap too).
The held-out Colin slices are therefore unseen *slices of a seen brain*. The EPI and shoulder files are the truly unseen subjects (other anatomy, contrast and resolution).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medsr.errors import InputError

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
MODALITIES = ("mri", "xray")
#: Held-out Colin27 axial slab (z, voxel indices, stop exclusive) and the unused gap on either side.
COLIN27_HELDOUT = (96, 120)
COLIN27_GAP = 8


@dataclass(frozen=True)
class Source:
    """One image file and how to cut slices from it.

    Attributes:
        name: short unique name, used in split tables and metrics.
        path: the file (NIfTI for volumes, DICOM/PNG/TIFF for 2D images).
        modality: ``"mri"`` (k-space LR) or ``"xray"`` (Lanczos LR).
        axes: slice axes of a volume (ignored for a 2D image).
        box: voxel region ((start, stop) per axis, None for the whole axis) of a volume; None: all of it.
        frame: the time point of a 4D volume.
    """

    name: str
    path: Path
    modality: str
    axes: tuple[int, ...] = (2,)
    box: tuple[tuple[int, int] | None, ...] | None = None
    frame: int | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise InputError(f"source {self.name}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if not self.axes or any(axis not in (0, 1, 2) for axis in self.axes):
            raise InputError(f"source {self.name}: slice axes must be among 0, 1, 2, got {self.axes}")

    @property
    def is_volume(self) -> bool:
        return self.path.name.lower().endswith((".nii", ".nii.gz"))

    @property
    def file_key(self) -> str:
        """The file (and frame) the source reads: two sources with one key share a subject."""
        return f"{self.path.resolve()}#{self.frame}"


def source_from_path(path: str | os.PathLike, modality: str, axes: tuple[int, ...] = (0, 1, 2)) -> Source:
    """A source for a user's file: the whole volume (frame 0 of a 4D one), sliced along ``axes``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return Source(name=path.name, path=path, modality=modality, axes=axes)


def _pydicom_file(name: str) -> Path:
    try:
        from pydicom.data import get_testdata_file
    except ImportError as exc:
        raise InputError(f"the {name} source needs pydicom and pydicom-data (pip install 'medsr[dicom,dev]')") from exc
    found = get_testdata_file(name)
    if found is None:
        raise InputError(f"{name} not found in pydicom's test data; install pydicom-data")
    return Path(found)


def _nibabel_file(name: str) -> Path:
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / name
    if not path.is_file():
        raise InputError(f"{path}: nibabel's test data file is missing")
    return path


def _colin27() -> Path:
    if not COLIN27_PATH.is_file():
        raise InputError(f"{COLIN27_PATH}: Colin27 not found; install the Debian package mricron-data")
    return COLIN27_PATH


def default_split() -> dict[str, list[Source]]:
    """``{"train": [...], "heldout": [...]}`` of the default model (module docstring). Resolves files on call."""
    colin = _colin27()
    start, stop = COLIN27_HELDOUT
    below, above = (0, start - COLIN27_GAP), (stop + COLIN27_GAP, None)
    train = [
        Source("colin27-inferior", colin, "mri", axes=(0, 1, 2), box=(None, None, below)),
        Source("colin27-superior", colin, "mri", axes=(0, 1, 2), box=(None, None, above)),
        Source("rg1-chest", _pydicom_file("RG1_UNCR.dcm"), "xray"),
        Source("rg3-leg", _pydicom_file("RG3_UNCR.dcm"), "xray"),
    ]
    heldout = [
        Source("colin27-slab", colin, "mri", axes=(2,), box=(None, None, (start, stop))),
        Source("epi", _nibabel_file("example4d.nii.gz"), "mri", axes=(2,), frame=0),
        Source("shoulder", _pydicom_file("MR2_UNCR.dcm"), "mri"),
    ]
    return {"train": train, "heldout": heldout}


def check_disjoint(train: list[Source], heldout: list[Source]) -> None:
    """Raise InputError when a held-out source reads a file (and frame) that a training source reads too, unless
    their voxel boxes are disjoint along some axis (the Colin27 slab). Slices of any axis stay inside their box."""
    for held in heldout:
        for seen in train:
            if held.file_key == seen.file_key and not _boxes_disjoint(held, seen):
                raise InputError(f"held-out source {held.name} overlaps training source {seen.name} ({held.path})")


def _boxes_disjoint(a: Source, b: Source) -> bool:
    if a.box is None or b.box is None:
        return False
    for range_a, range_b in zip(a.box, b.box):
        if range_a is None or range_b is None:
            continue
        (a0, a1), (b0, b1) = _bounds(range_a), _bounds(range_b)
        if a1 <= b0 or b1 <= a0:
            return True
    return False


def _bounds(pair: tuple[int | None, int | None]) -> tuple[float, float]:
    start, stop = pair
    return (0 if start is None else start), (float("inf") if stop is None else stop)


#: Named groups of the default split that ``--source`` accepts besides single source names and file paths.
SPLIT_GROUPS = ("default:train", "default:train-mri", "default:heldout")


def resolve_sources(specs: list[str], modality: str = "mri") -> list[Source]:
    """Sources from ``--source`` values: a group of :data:`SPLIT_GROUPS`, the name of a default-split source, or a
    file path (a whole volume sliced along all three axes, or a 2D image) read as ``modality``."""
    split = None
    sources: list[Source] = []
    for spec in specs:
        if spec in SPLIT_GROUPS or not Path(spec).exists():
            split = split or default_split()
            named = {s.name: s for part in split.values() for s in part}
            if spec == "default:train-mri":
                sources += [s for s in split["train"] if s.modality == "mri"]
            elif spec in SPLIT_GROUPS:
                sources += split[spec.split(":")[1]]
            elif spec in named:
                sources.append(named[spec])
            else:
                raise InputError(
                    f"{spec}: no such file, and not a source name ({', '.join(sorted(named))}) or group {SPLIT_GROUPS}"
                )
        else:
            sources.append(source_from_path(spec, modality))
    return sources
