"""A small run of benchmarks/volume_overlap.py, as CI runs the benchmarks: it completes on the bundled default model,
finds the overlapped and serial volumes bit-identical, and records every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_volume_overlap_benchmark_small_run(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "volume_overlap.py"), "--shape", "16", "16", "5"]
    command += ["--threads", "1", "--repeats", "1", "--batch-size", "2", "--tag", "small", "--results", str(tmp_path)]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "small.json").read_text())
    assert record["outputs_identical"] is True
    assert record["volume"] == {"shape": [16, 16, 5], "axis": 2, "planes": 5}
    stages = record["serial_stage_seconds_per_volume"]
    assert set(stages) == {"host in", "engine", "host out"} and stages["engine"] > 0
    assert len(record["seconds"]["overlap"]) == len(record["seconds"]["serial"]) == 1
    assert record["best_possible_speedup"] >= 1.0
