"""Atomic output: a file appears complete under its final name, or not at all.

Writers write to a hidden temporary file in the destination directory and rename it into place, so a crash, a full
disk or an interrupt (SIGINT/SIGTERM raise in the main thread) never leaves a partial output under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medsr.errors import OutputError


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists (unless ``overwrite``) or whose directory is missing or read-only."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: output exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"{path}: output path is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: output directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on any error delete it.

    The temporary name keeps the final suffixes (``.nii.gz`` stays ``.nii.gz``) because some writers choose the
    format from the file name.
    """
    path = check_output_path(path, overwrite)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: output appeared while writing; pass --overwrite to replace it")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{path}: could not write output: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
