"""The one place compiled engines go: TensorRT plans, OpenVINO compiled blobs and TensorRT timing caches.

Never inside a bundle or the installed package (the default model sits in site-packages, often read-only): under
``$MEDSR_CACHE`` when it is set, else the user cache directory (``$XDG_CACHE_HOME/medsr``, else ``~/.cache/medsr``).
Layout (docs/design.md, "Nothing is written at run time into a bundle or the package")::

    <root>/engines/<manifest sha256>/<engine>-<version>/<device>/<precision>/   what one bundle compiled to
    <root>/runtimes/<engine>-<version>/<device>/                                 shared by every bundle (timings)

The manifest digest is the sha256 of the bundle's ``medsr.json`` bytes, which hold every graph's sha256: two
bundles with the same name but other graphs or settings never share an entry, and a re-exported bundle starts
afresh. The runtime part (engine version, device: GPU name and compute capability, or the CPU model) keeps an
engine compiled elsewhere from being read. A cache folder that cannot be written makes the run go on uncached
with one warning (:func:`usable_dir`). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path

from medsr.bundle.load import MANIFEST_NAME

CACHE_ENV = "MEDSR_CACHE"


def cache_root() -> Path:
    """``$MEDSR_CACHE``, else ``$XDG_CACHE_HOME/medsr``, else ``~/.cache/medsr`` (not created here)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medsr"


def manifest_digest(bundle) -> str:
    """Hex sha256 of ``bundle``'s manifest file (``bundle.root / medsr.json``) as stored on disk."""
    return hashlib.sha256((Path(bundle.root) / MANIFEST_NAME).read_bytes()).hexdigest()


def path_part(text: str) -> str:
    """``text`` as one safe folder name: runs of characters other than letters, digits, ``.``, ``_``, ``-``
    become ``_`` ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3"); "", "." and ".." become "_"."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return part if part not in ("", ".", "..") else "_"


def engine_dir(bundle, engine: str, version: str, device: str, *parts: str) -> Path:
    """``<root>/engines/<manifest sha256>/<engine>-<version>/<device>/<parts...>`` (not created here)."""
    folder = cache_root() / "engines" / manifest_digest(bundle) / path_part(f"{engine}-{version}") / path_part(device)
    return folder.joinpath(*map(path_part, parts))


def runtime_dir(engine: str, version: str, device: str) -> Path:
    """``<root>/runtimes/<engine>-<version>/<device>``: what one runtime on one device shares across bundles."""
    return cache_root() / "runtimes" / path_part(f"{engine}-{version}") / path_part(device)


def usable_dir(path: Path, what: str) -> Path | None:
    """``path`` created and proven writable (a probe file is created and removed), or None after a warning that
    names ``what``, the folder and the way out: the caller then runs without that cache.

    A real write is tried because permission bits do not tell (root ignores them; a file may sit where a folder of
    the path should be)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        warnings.warn(
            f"{what} disabled, {path} is not writable ({exc.strerror or exc}); "
            f"set {CACHE_ENV} to a writable folder to keep compiled engines",
            stacklevel=3,
        )
        return None
    return path
