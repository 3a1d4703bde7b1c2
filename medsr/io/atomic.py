"""Atomic output: a file appears complete under its final name, or not at all.

Writers write to a hidden temporary file (or directory, for a DICOM series) in the destination directory and rename
it into place, so a crash, a full disk or an interrupt (SIGINT/SIGTERM raise in the main thread) never leaves a
partial output under the final name, and the temporary is removed on the way out. Only SIGKILL or a power cut can
leave a hidden ``.<name>.*.tmp*`` behind, never under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medsr.errors import OutputError, OutputExistsError


def check_output_path(path: str | os.PathLike, overwrite: bool, directory: bool = False) -> Path:
    """Refuse an output that exists (unless ``overwrite``) or whose directory is missing or read-only.

    ``directory``: the output is a directory (a DICOM series) rather than a file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path, f"{path}: output exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir() != directory:
        have, want = ("a directory", "a file") if path.is_dir() else ("a file", "a directory")
        raise OutputError(f"{path}: output path is {have}; this output is {want}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: output directory {parent} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path, mode: int) -> None:
    """Give the temporary the permissions a plainly created output would have (mkstemp makes it private), then
    rename it into place."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on any error delete it.

    The temporary name keeps the final suffixes (``.nii.gz`` stays ``.nii.gz``) because some writers choose the
    format from the file name.
    """
    path = check_output_path(path, overwrite)
    suffix = "".join(path.suffixes)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a file in {path.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: output appeared while writing; pass --overwrite to replace it")
        _publish(tmp, path, 0o666)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{path}: could not write output: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success rename it to ``path``, on any error delete it.

    With ``overwrite``, an existing ``path`` is moved aside, replaced, then deleted (the one moment where neither
    exists is a rename apart).
    """
    path = check_output_path(path, overwrite, directory=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a directory in {path.parent}: {exc.strerror or exc}") from exc
    old = None
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise OutputError(f"{path}: output appeared while writing; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        _publish(tmp, path, 0o777)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{path}: could not write output: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
