"""Turning ``medsr-infer`` arguments into jobs: one image, or a batch of files, directories and glob patterns.

One argument naming a file, or a directory that directly holds DICOM files, is a single job (a directory with
several series needs ``--series``). Anything else is a batch: several arguments, a glob pattern, or a directory
without DICOM files of its own. A batch directory is searched recursively: every NIfTI, PNG or TIFF file is a job, and
the DICOM files of each directory are one job per series (so a folder of radiographs gives one job per radiograph,
a CT series one job).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medsr.errors import InputError
from medsr.io.formats import OUTPUT_SUFFIX
from medsr.io.nifti import is_nifti
from medsr.io.raster import raster_format

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Job:
    """One image to super-resolve: ``source`` (file or DICOM directory), its DICOM ``series`` UID when chosen, the
    ``stem`` of its output name, and ``files``: how many files the series has (1 for anything but DICOM)."""

    source: Path
    stem: str
    series: str | None = None
    files: int = 1

    def output_name(self, fmt: str, scale: int) -> str:
        """``<stem>_sr<scale>x`` with the format's suffix (none for a DICOM series, which is a directory)."""
        suffix = "" if fmt == "dicom" and self.files > 1 else OUTPUT_SUFFIX[fmt]
        return f"{self.stem}_sr{scale}x{suffix}"

    def default_format(self) -> str:
        """NIfTI for NIfTI and DICOM inputs, the same format for PNG and TIFF."""
        return raster_format(self.source) or "nifti"


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _dicom_jobs(directory: Path, files: list[Path]) -> list[Job]:
    """One job per series among ``files`` (DICOM files of ``directory``); an unreadable file is a job of its own,
    which fails with its message when run."""
    from medsr.io.dicom import scan_series

    failures: list = []
    series = scan_series(files, failures)
    jobs = [Job(path, _stem(path)) for path, _ in failures]
    for entry in series.values():
        if len(entry.files) == 1:
            stem = _stem(entry.files[0])
        else:
            number = entry.header.get("SeriesNumber")
            stem = directory.name + (f"_s{number}" if len(series) > 1 else "")
        jobs.append(Job(directory if len(entry.files) > 1 else entry.files[0], stem, entry.uid, len(entry.files)))
    return jobs


def _walk(directory: Path) -> list[Job]:
    """Jobs found under a batch directory (recursively; hidden entries skipped)."""
    from medsr.io.dicom import is_dicom_file

    jobs = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths = [Path(root) / name for name in sorted(names) if not name.startswith(".")]
        images = [p for p in paths if is_nifti(p) or raster_format(p)]
        jobs += [Job(p, _stem(p)) for p in images]
        dicoms = [p for p in paths if p not in images and is_dicom_file(p)]
        if dicoms:
            jobs += _dicom_jobs(Path(root), dicoms)
    return jobs


def _is_series_dir(path: Path) -> bool:
    from medsr.io.dicom import dicom_files

    return path.is_dir() and bool(dicom_files(path))


def expand_inputs(arguments: Sequence[str], series: str | None = None) -> tuple[list[Job], bool]:
    """The jobs named by the command line's INPUT arguments, and whether they form a batch.

    Raises:
        InputError: no argument, or a batch whose arguments match nothing.
    """
    if not arguments:
        raise InputError("no input given")
    single = Path(arguments[0])
    is_pattern = any(c in arguments[0] for c in GLOB_CHARS) and not single.exists()
    if len(arguments) == 1 and not is_pattern and (not single.is_dir() or _is_series_dir(single)):
        return [Job(single, single.name if single.is_dir() else _stem(single), series)], False
    jobs: list[Job] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument, recursive=True)) if any(c in argument for c in GLOB_CHARS) else []
        for path in [Path(m) for m in matches] or [Path(argument)]:
            if path.is_dir():
                jobs += _walk(path)
            else:
                jobs.append(Job(path, _stem(path)))
    if not jobs:
        raise InputError(f"no image found in {', '.join(arguments)}")
    return jobs, True
