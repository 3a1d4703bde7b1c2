"""Running code in a fresh Python interpreter: what a test needs to see imports, exit codes and signals as a user's
shell would, untouched by modules this test session has already loaded."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str, *args: str, timeout: float = 60, **extra) -> subprocess.CompletedProcess:
    """``python -c code args...`` with captured text output; the exit code is the caller's to check."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=timeout, **extra
    )
