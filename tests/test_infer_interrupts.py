"""What happens when things go wrong during a run: SIGINT and SIGTERM while the output is being written, a disk that
fills up (simulated in-process, and for real with a file-size limit), a read-only output directory and an unreadable
input (as an unprivileged user). Each time: one line, non-zero exit, no output and no temporary file, input intact."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fresh_python import run_python
from io_fixtures import ct5n_dir, hash_tree, listing, smooth_image, write_nifti
from PIL import Image

from medsr.cli.infer import infer

# medsr-infer's console entry point with torch blocked and the writer slowed down once the temporary file is
# complete on disk and not yet renamed: the moment an interrupt is most likely to leave a partial output.
SLOW_WRITE = r"""
import sys, time
sys.modules["torch"] = None
import nibabel, pydicom.dataset
real_nifti, real_dicom = nibabel.save, pydicom.dataset.Dataset.save_as

def announce():
    print("WRITING", file=sys.stderr, flush=True)
    time.sleep(60)

def slow_nifti(image, filename):
    real_nifti(image, filename)
    announce()

def slow_dicom(self, filename, **kwargs):
    real_dicom(self, filename, **kwargs)
    announce()

nibabel.save, pydicom.dataset.Dataset.save_as = slow_nifti, slow_dicom
from medsr.cli.infer import main
sys.argv[0] = "medsr-infer"
main()
"""
MAIN = 'import sys; sys.modules["torch"] = None; from medsr.cli.infer import main; sys.argv[0] = "medsr-infer"; main()'


def _wait_for(process: subprocess.Popen, marker: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if marker in line:
            return
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"{marker} never came: {process.stderr.read()}")


@pytest.mark.parametrize(
    ("sig", "code", "fmt"),
    [
        (signal.SIGINT, 130, "nifti"),  # Ctrl-C during a NIfTI write
        (signal.SIGTERM, 143, "nifti"),  # a scheduler's kill during a NIfTI write
        (signal.SIGTERM, 143, "dicom"),  # during a DICOM series (a directory), after its first file
    ],
)
def test_interrupt_while_writing_leaves_no_output(tiny_bundle, tmp_path, sig, code, fmt):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / ("sr.nii.gz" if fmt == "nifti" else "sr")
    before = hash_tree(ct5n_dir())
    args = [str(ct5n_dir()), "-o", str(output), "--format", fmt, "--model", str(tiny_bundle), "--steps", "1"]
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, *args], stderr=subprocess.PIPE, text=True)
    _wait_for(process, "WRITING")
    assert listing(out_dir)  # the temporary is there, hidden
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert listing(out_dir) == []
    assert hash_tree(ct5n_dir()) == before


def _full_disk(calls_before_failing: int):
    """A writer replacement that writes part of a file, then fails as a full disk does."""
    calls = []

    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, Path)))
        calls.append(target)
        Path(target).write_bytes(b"partial")
        if len(calls) > calls_before_failing:
            raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("fmt", ["nifti", "dicom", "png"])
def test_disk_full_during_the_write(tiny_bundle, tmp_path, monkeypatch, fmt):
    import nibabel
    import pydicom.dataset

    source = ct5n_dir()
    if fmt == "png":
        source = tmp_path / "x.png"
        Image.fromarray((smooth_image((16, 16)) / 4).astype("uint8")).save(source)
    monkeypatch.setattr(nibabel, "save", _full_disk(0))
    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", _full_disk(2))  # the third file of the series fails
    monkeypatch.setattr(Image.Image, "save", _full_disk(0))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / {"nifti": "sr.nii", "dicom": "sr", "png": "sr.png"}[fmt]
    args = [str(source), "-o", str(output), "--format", fmt, "--model", str(tiny_bundle), "--steps", "1"]
    result = CliRunner().invoke(infer, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert f"{output}: could not write output: No space left on device" in lines[0]
    assert listing(out_dir) == []


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG


def test_a_real_partial_write_is_removed(tiny_bundle, tmp_path):
    """The kernel stops the write at 48 KiB of an 80 KiB NIfTI: the same cleanup as a full disk, for real."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [str(ct5n_dir()), "-o", str(out_dir / "sr.nii"), "--model", str(tiny_bundle), "--steps", "1"]
    run = run_python(MAIN, *args, timeout=300, preexec_fn=_limit_file_size)
    assert run.returncode == 1, run.stderr
    assert run.stderr.strip().splitlines() == [f"Error: {out_dir / 'sr.nii'}: could not write output: File too large"]
    assert listing(out_dir) == []


def _without_permission_override():
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set (prctl PR_CAPBSET_DROP): after exec even
    root obeys permission bits, as any user does."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _run_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """medsr-infer bound by permission bits (root normally bypasses them)."""
    extra = {"preexec_fn": _without_permission_override} if os.geteuid() == 0 else {}
    return run_python(MAIN, *args, timeout=300, **extra)


def test_read_only_output_directory_and_unreadable_input(tiny_bundle, tmp_path):
    source = write_nifti(tmp_path / "in.nii", smooth_image((12, 12, 3)), np.eye(4))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    bundle = str(tiny_bundle)
    run = _run_unprivileged([str(source), "-o", str(read_only / "sr.nii.gz"), "--model", bundle, "--steps", "1"])
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"Error: {read_only / 'sr.nii.gz'}: output directory {read_only} is not writable"
    ], run.stderr
    os.chmod(source, 0o000)
    writable = tmp_path / "out"
    writable.mkdir()
    run = _run_unprivileged([str(source), "-o", str(writable / "sr.nii.gz"), "--model", bundle, "--steps", "1"])
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and str(source) in lines[0] and "permission denied" in lines[0], (
        lines
    )
    assert listing(read_only) == [] and listing(writable) == []
    os.chmod(read_only, 0o755)
