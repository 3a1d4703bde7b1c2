"""Turning ``medsr-infer`` arguments into jobs: one image, or a batch of files, directories and glob patterns.

One argument naming a file, or a directory that directly holds the DICOM files of one series (or of several, with
``--series`` choosing one or a file named as the output), is a single job. Anything else is a batch: several
arguments, a glob pattern, or any other directory. A batch directory is searched recursively: every NIfTI, PNG or
TIFF file is a job, and the DICOM files of each directory are one job per series (a CT series is one job), except
images without a position in space (radiographs), which are one job each.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medsr.errors import InputError
from medsr.io.formats import OUTPUT_SUFFIX, format_of_name
from medsr.io.nifti import is_nifti
from medsr.io.raster import raster_format

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Job:
    """One image to super-resolve: ``source`` (file or DICOM directory), its DICOM ``series`` UID when chosen, the
    ``stem`` of its output name, ``unique_stem`` for when another job of a batch has the same stem, and ``files``:
    how many files the series has (1 for anything but DICOM)."""

    source: Path
    stem: str
    series: str | None = None
    files: int = 1
    unique_stem: str = ""

    def output_name(self, fmt: str, scale: int, unique: bool = False) -> str:
        """``<stem>_sr<scale>x`` with the format's suffix (none for a DICOM series, which is a directory)."""
        suffix = "" if fmt == "dicom" and self.files > 1 else OUTPUT_SUFFIX[fmt]
        return f"{(self.unique_stem or self.stem) if unique else self.stem}_sr{scale}x{suffix}"

    def default_format(self) -> str:
        """NIfTI for NIfTI and DICOM inputs, the same format for PNG and TIFF."""
        return raster_format(self.source) or "nifti"


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _file_job(path: Path) -> Job:
    """A job for one file; its unique stem keeps the suffix (``x.nii`` and ``x.nii.gz`` -> ``x_nii``, ``x_nii_gz``)."""
    return Job(path, _stem(path), unique_stem=path.name.replace(".", "_"))


def _dicom_jobs(directory: Path, files: list[Path]) -> list[Job]:
    """One job per series among ``files`` (DICOM files of ``directory``); an unreadable file is a job of its own,
    which fails with its message when run."""
    from medsr.io.dicom import scan_series

    failures: list = []
    series = scan_series(files, failures)
    jobs = [_file_job(path) for path, _ in failures]
    for entry in series.values():
        if len(entry.files) == 1 or any("ImagePositionPatient" not in h for h in entry.headers):
            for file in entry.files:  # one image, or projection images (radiographs) that share a series
                job = _file_job(file)
                jobs.append(Job(job.source, job.stem, entry.uid, 1, job.unique_stem))
        else:
            number = entry.header.get("SeriesNumber")
            stem = directory.name + (f"_s{number}" if len(series) > 1 else "")
            jobs.append(Job(directory, stem, entry.uid, len(entry.files), f"{directory.name}_{entry.uid}"))
    return jobs


def _walk(directory: Path) -> list[Job]:
    """Jobs found under a batch directory (recursively; hidden entries skipped)."""
    from medsr.io.dicom import is_dicom_file

    jobs = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths = [Path(root) / name for name in sorted(names) if not name.startswith(".")]
        images = [p for p in paths if is_nifti(p) or raster_format(p)]
        jobs += [_file_job(p) for p in images]
        dicoms = [p for p in paths if p not in images and is_dicom_file(p)]
        if dicoms:
            jobs += _dicom_jobs(Path(root), dicoms)
    return jobs


def _is_single_directory(path: Path, series: str | None, output: Path | None) -> bool:
    """Whether a lone directory argument is one DICOM input: it directly holds DICOM files and no other images, and
    either one series, or ``--series`` chooses one, or the output is a file (then the load lists the series)."""
    from medsr.io.dicom import dicom_files, scan_series

    files = dicom_files(path)
    if not files or any(is_nifti(p) or raster_format(p) for p in path.iterdir()):
        return False
    if series is not None or len(scan_series(files, failures=[])) <= 1:
        return True
    return output is None or format_of_name(output) is not None


def expand_inputs(
    arguments: Sequence[str], series: str | None = None, output: Path | None = None
) -> tuple[list[Job], bool]:
    """The jobs named by the command line's INPUT arguments, and whether they form a batch (``output``: the -o
    path, which tells a directory of several DICOM series meant as a batch from one meant as a single input).

    Raises:
        InputError: no argument, or a batch whose arguments match nothing.
    """
    if not arguments:
        raise InputError("no input given")
    single = Path(arguments[0])
    is_pattern = any(c in arguments[0] for c in GLOB_CHARS) and not single.exists()
    if len(arguments) == 1 and not is_pattern:
        if not single.is_dir():
            return [Job(single, _stem(single), series)], False
        if _is_single_directory(single, series, output):
            return [Job(single, single.name, series)], False
    jobs: list[Job] = []
    for argument in arguments:
        matches = sorted(glob.glob(argument, recursive=True)) if any(c in argument for c in GLOB_CHARS) else []
        for path in [Path(m) for m in matches] or [Path(argument)]:
            if path.is_dir():
                jobs += _walk(path)
            else:
                jobs.append(_file_job(path))
    if not jobs:
        raise InputError(f"no image found in {', '.join(arguments)}")
    return jobs, True
