"""Refusing images too large for memory before any voxel is allocated.

Readers call ``MemoryLimit.check`` with the shape from the file's header, before reading pixel data. The estimate
covers the image arrays of a run (input, normalized copy, SR output and its conversion for writing); the model's own
working memory is bounded separately by the tile size (medsr.engine.tiling).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medsr.errors import InputError

#: Bytes per input voxel: the float32 image, a float64 transient while normalizing, the float32 normalized copy.
IN_BYTES_PER_VOXEL = 16
#: Bytes per output voxel: the tile blend and the engine's SR slice, the denormalized output, its conversion for
#: writing. Measured: peak RSS grew by 18-21 bytes per output pixel from 500x500 to 2000x2000 radiographs at x4
#: (tiny bundle, tiles of 128; 2026-11-26), so a 2000x2000 radiograph needs about 1.2 GiB of image arrays.
OUT_BYTES_PER_VOXEL = 20

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def available_memory() -> int:
    """Bytes this process can allocate without swapping: MemAvailable of /proc/meminfo, else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> int:
    """Bytes from ``"8G"``, ``"512MiB"``, ``"1.5GB"`` or ``"1000000"`` (K, M, G, T are powers of 1024).

    >>> parse_size("1.5G")
    1610612736
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not match:
        raise InputError(f"memory size must look like 8G, 512M or 1000000, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_size(n_bytes: float) -> str:
    """``1.5 GiB``-style text (KiB, MiB or GiB; bytes below 1 KiB).

    >>> format_size(3 * 2**30)
    '3.0 GiB'
    """
    if n_bytes < 1024:
        return f"{int(n_bytes)} B"
    power = min(3, int(math.log(n_bytes, 1024)))
    return f"{n_bytes / 1024**power:.1f} {('KiB', 'MiB', 'GiB')[power - 1]}"


@dataclass(frozen=True)
class MemoryLimit:
    """The most memory (bytes) a run may plan for, and the scale factor its output grows by on ``axes`` axes (2:
    in-plane, s x s on each slice; 1: through-plane, along the slice axis).

    ``source`` says where the limit came from, for the message (``--max-memory`` or the available memory).
    """

    max_bytes: int
    scale: int
    source: str = "--max-memory"
    axes: int = 2

    def estimate(self, shape: Sequence[int]) -> int:
        """Bytes needed to super-resolve an image of ``shape`` (X, Y, Z[, T]) by ``scale`` on ``axes`` axes."""
        voxels = math.prod(int(n) for n in shape)
        return voxels * IN_BYTES_PER_VOXEL + voxels * self.scale**self.axes * OUT_BYTES_PER_VOXEL

    def check(self, path: Path, shape: Sequence[int]) -> None:
        """Raise InputError naming the limit when ``shape`` needs more than ``max_bytes``."""
        needed = self.estimate(shape)
        if needed > self.max_bytes:
            size = "x".join(str(int(n)) for n in shape)
            raise InputError(
                f"{path}: image of {size} voxels needs about {format_size(needed)} to super-resolve x{self.scale}, "
                f"over the memory limit of {format_size(self.max_bytes)} ({self.source}); choose one --frame, "
                "crop the image, or raise --max-memory"
            )
