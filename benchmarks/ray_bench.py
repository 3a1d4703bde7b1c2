"""medsr-infer over an archive: 1 and 2 single-thread Ray workers against one local process (docs/scale-out.md).

    python benchmarks/ray_bench.py [--volumes 8] [--slices 2] [--size 64] [--rounds 3] [--tag ray-cpu]

Runs in the main environment with the ray extra. Writes VOLUMES synthetic NIfTI volumes of SIZE x SIZE x SLICES
(medsr.bench.stages.write_test_volume, x4 in-plane with the default bundle at its 1 step) and times, in interleaved
rounds, the whole command (Ray's start and stop included) of:

- ``medsr-infer DIR -o OUT --threads 1`` (one local process, one engine thread)
- ``medsr-infer DIR -o OUT --ray local --workers 1 --threads 1``
- ``medsr-infer DIR -o OUT --ray local --workers 2 --threads 1``

each into a fresh OUT. Also records the seconds medsr_summary.json gives each volume (the engine's work, without
Ray's start). Writes results/TAG.json and results/TAG.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "one local process, 1 thread": ["--threads", "1"],
    "--ray local --workers 1 --threads 1": ["--ray", "local", "--workers", "1", "--threads", "1"],
    "--ray local --workers 2 --threads 1": ["--ray", "local", "--workers", "2", "--threads", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="ray-cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from medsr.bench.stages import write_test_volume

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_bench import machine

    started = time.time()
    info = machine()
    info["load_average"] = list(os.getloadavg())
    info["versions"] = {}
    for name in ("numpy", "onnxruntime", "ray"):
        from importlib.metadata import version

        info["versions"][name] = version(name)
    work = Path(tempfile.mkdtemp(prefix="medsr-ray-bench-"))
    archive = work / "archive"
    archive.mkdir()
    for i in range(args.volumes):
        write_test_volume(archive / f"v{i}.nii.gz", args.size, args.slices, seed=i)
    medsr_infer = [sys.executable, "-c", "from medsr.cli.infer import main; main()"]
    runs: dict[str, list[dict]] = {name: [] for name in COMMANDS}
    try:
        for r in range(args.rounds):
            for name, extra in COMMANDS.items():
                out = work / f"out-{r}-{len(runs[name])}-{abs(hash(name)) % 1000}"
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                result = subprocess.run(
                    [*medsr_infer, str(archive), "-o", str(out), *extra], capture_output=True, text=True, check=False
                )
                wall = time.perf_counter() - t0
                if result.returncode != 0:
                    raise SystemExit(f"{name} failed: {result.stderr[-2000:]}")
                summary = json.loads((out / "medsr_summary.json").read_text())
                seconds = [item.get("seconds") or 0.0 for item in summary["items"]]
                runs[name].append(
                    {"wall_s": wall, "volume_s_sum": float(sum(seconds)), "load_average_1min_before": load_before}
                )
                shutil.rmtree(out, ignore_errors=True)
                print(f"round {r + 1}: {name}: {wall:.1f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_average_after"] = list(os.getloadavg())
    base = float(np.median([run["wall_s"] for run in runs["one local process, 1 thread"]]))
    one = float(np.median([run["wall_s"] for run in runs["--ray local --workers 1 --threads 1"]]))
    rows = []
    for name, extra in COMMANDS.items():
        walls = [run["wall_s"] for run in runs[name]]
        median = float(np.median(walls))
        rows.append(
            {
                "command": "medsr-infer DIR -o OUT " + " ".join(extra),
                "label": name,
                "wall_s_median": median,
                "wall_s_min": float(min(walls)),
                "speed_vs_local": base / median,
                "speed_vs_1_worker": one / median,
                "runs": runs[name],
            }
        )
    command = ("python benchmarks/ray_bench.py " + " ".join(sys.argv[1:])).strip()
    result = {
        "command": command,
        "config": {
            "volumes": args.volumes,
            "volume_shape": [args.size, args.size, args.slices],
            "bundle": "default (1 step)",
            "engine": "ort fp32 cpu",
            "rounds": args.rounds,
        },
        "machine": info,
        "wall_seconds": time.time() - started,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    planes = args.volumes * args.slices
    lines = [
        f"# medsr-infer on Ray: 1 and 2 workers against one local process ({args.tag})",
        "",
        f"- command: `{command}` (main environment, ray installed)",
        (f"- machine: {info['cpu']}, {info['cores']} cores (shared, other jobs running), AVX-512 "
        f"{'yes' if info['avx512'] else 'no'}, bf16 units: {', '.join(info['bf16_units']) or 'none'}"),
        (f"- load average (1, 5, 15 min) at start {[round(v, 2) for v in info['load_average']]}, at end "
        f"{[round(v, 2) for v in info['load_average_after']]}"),
        f"- versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
        (f"- work: {args.volumes} NIfTI volumes of {args.size} x {args.size} x {args.slices} ({planes} planes, x4 "
        f"in-plane), the default bundle at its 1 step, ONNX Runtime fp32 on the CPU; the wall time of the whole "
        f"command (Ray's start and stop included), {args.rounds} interleaved rounds"),
        f"- wall time of the whole benchmark: {result['wall_seconds']:.0f} s",
        "",
        "| command | wall s (median) | fastest | speed vs one local process | vs 1 worker | per-volume s summed (median) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        summed = float(np.median([run["volume_s_sum"] for run in row["runs"]]))
        lines.append(
            f"| `{row['command']}` | {row['wall_s_median']:.1f} | {row['wall_s_min']:.1f} | "
            f"{row['speed_vs_local']:.2f} | {row['speed_vs_1_worker']:.2f} | {summed:.1f} |"
        )
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
