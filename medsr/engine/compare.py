"""Array agreement figures shared by the engine's precision gate (medsr.engine.precision) and the parity harness
(medsr.eval.parity): one definition of PSNR, so the gate and the reports measure the same thing."""

from __future__ import annotations

import numpy as np


def compare_arrays(actual: np.ndarray, expected: np.ndarray) -> dict:
    """Max abs error, relative L2 error and PSNR (dB, peak = the expected array's range) of two arrays."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = actual - expected
    mse = float(np.mean(diff**2))
    peak = float(expected.max() - expected.min()) or 1.0
    return {
        "max_abs": float(np.max(np.abs(diff))),
        "rel_l2": float(np.linalg.norm(diff) / (np.linalg.norm(expected) or 1.0)),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse)),
    }
