"""Real evaluation slices, each with a stable, unique id: the inputs of parity and fidelity runs.

Inputs are files, directories of files, or sources of the default split by name (``colin27-slab``, ``epi``,
``default:heldout``, ...: :func:`medsr.data.sources.resolve_sources`). A NIfTI file gives its foreground slices along
one axis (default: the axis of largest voxel spacing, as ``medsr-infer`` slices; frame 0 of a 4D file); a 2D image
(DICOM, PNG, TIFF) gives one slice, in display orientation. Each slice is the network input ``medsr-infer``
prepares from the same file (:func:`medsr.data.pairs.source_slices`, through medsr.engine.volume.prepare_input:
the bundle's intensity window fitted on the whole source). Ids are ``<source>_ax<axis>_<index:03d>``
for volume slices and ``<source>`` for 2D images, the source being the file stem (``ch2.nii.gz`` -> ``ch2``) or the
split's source name, so a file always gives the same ids, whatever other files are evaluated with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medsr.data.pairs import source_slices
from medsr.data.sources import Source, resolve_sources
from medsr.engine.volume import choose_slice_axis
from medsr.errors import InputError
from medsr.io.dicom import DICOM_SUFFIXES
from medsr.io.nifti import NIFTI_SUFFIXES, is_nifti
from medsr.io.raster import RASTER_SUFFIXES

IMAGE_SUFFIXES = tuple(NIFTI_SUFFIXES) + tuple(DICOM_SUFFIXES) + tuple(RASTER_SUFFIXES)


@dataclass(frozen=True)
class EvalSlice:
    """One normalized slice: ``image`` (H, W) float32 in [-1, 1], slice ``index`` along ``axis`` of the source named
    ``source`` (its voxel box, if any) read from ``path`` (axis and index -1 for a 2D image), and its ``id``."""

    id: str
    source: str
    path: Path
    axis: int
    index: int
    image: np.ndarray


def builtin_volume() -> Path:
    """nibabel's example4d.nii.gz: a real EPI brain volume (128 x 96 x 24 x 2, 2 mm; MIT), always installed."""
    from nibabel.testing import data_path

    path = Path(data_path) / "example4d.nii.gz"
    if not path.is_file():
        raise InputError(f"{path}: nibabel's example volume is missing; pass --data FILES")
    return path


def file_stem(path: Path) -> str:
    """The file name without its image suffix (``ch2.nii.gz`` -> ``ch2``)."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def eval_sources(inputs: list[str | os.PathLike], axis: int | None = None) -> list[Source]:
    """A Source per file given, per image file (by suffix, sorted) of each directory given, and per default-split
    source named; ``axis`` overrides the slice axis of volumes. Source names must be unique (they prefix the ids)."""
    sources = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise InputError(f"{path}: no image file ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            sources += [file_source(p, axis) for p in found]
        elif path.is_file():
            sources.append(file_source(path, axis))
        else:
            named = resolve_sources([str(item)])
            sources += [replace(s, axes=(axis,)) if axis is not None and s.is_volume else s for s in named]
    seen: dict[str, Source] = {}
    for source in sources:
        other = seen.setdefault(source.name, source)
        if other is not source:
            raise InputError(f"{other.path} and {source.path} are both named {source.name!r}: image ids would collide")
    return sources


def file_source(path: Path, axis: int | None = None) -> Source:
    """The Source of one file: a NIfTI volume sliced along ``axis`` (default :func:`volume_axis`), or a 2D image."""
    if is_nifti(path):
        return Source(file_stem(path), path, "mri", axes=(volume_axis(path) if axis is None else axis,), frame=0)
    return Source(file_stem(path), path, "mri")


def volume_axis(path: Path) -> int:
    """The slice axis ``medsr-infer`` would choose for a NIfTI file (largest voxel spacing), read from its header."""
    import nibabel as nib

    try:
        affine = nib.load(str(path)).affine
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: unreadable NIfTI: {exc}") from exc
    return choose_slice_axis(tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)))


def spread(items: list, count: int | None) -> list:
    """``count`` items evenly spaced over ``items``, the centre of each of ``count`` equal parts (so the fringe
    slices of a volume are not favoured), or all of them when None or ``count >= len(items)``."""
    if count is None or count >= len(items):
        return list(items)
    if count < 1:
        raise InputError(f"the number of slices per file must be >= 1, got {count}")
    picks = ((np.arange(count) + 0.5) * len(items) / count).astype(int)
    return [items[i] for i in picks]


def load_eval_slices(
    sources: list[Source], percentiles: tuple[float, float], per_file: int | None = None, min_size: int = 16
) -> list[EvalSlice]:
    """The foreground slices of ``sources`` (:func:`eval_sources`), at most ``per_file`` (evenly spaced) from each,
    normalized with the window of ``percentiles`` (the bundle's: medsr.engine.volume.window_percentiles); slices
    smaller than ``min_size`` on either side are skipped."""
    slices = []
    for source in sources:
        for item in spread(source_slices(source, percentiles, min_size=min_size), per_file):
            if source.is_volume:
                name, axis, index = f"{source.name}_ax{item.axis}_{item.index:03d}", item.axis, item.index
            else:
                name, axis, index = source.name, -1, -1
            slices.append(EvalSlice(name, source.name, source.path, axis, index, item.image))
    return slices
