"""Served throughput and latency of medsr-serve against the in-process pipeline, with and without dynamic batching.

    .venv-serve/bin/python benchmarks/serve_bench.py [--rounds 3] [--threads 2] [--size 64] [--tag serve-cpu]

Runs in the environment of the serve extra (PyTriton, tritonclient). Two medsr-serve processes run side by side on
loopback: one with dynamic batching (``--max-batch 16``, Triton gathering up to 16 planes per engine run) and one
with ``--max-batch 1`` (one plane per engine run: what the server does without dynamic batching). Each load is C
concurrent gRPC clients (C = 1, 4, 16), each sending requests of one LR plane of SIZE x SIZE back to back; the
in-process rows run LatentSRPipeline.super_resolve on the same planes in this process, one plane per call and 16
planes in one call. The default bundle at its own steps (1), the same engine threads everywhere. The rounds
interleave every row, so all rows see the same load from the machine's other jobs; throughput is the median over
rounds, latency percentiles are over every request of every round. Writes results/TAG.json and results/TAG.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 4, 16)


def machine() -> dict:
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "onnxruntime", "tritonclient", "nvidia-pytriton"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "avx512": "avx512f" in flags,
        "bf16_units": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "python": platform.python_version(),
        "versions": versions,
    }


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(threads: int, max_batch: int) -> tuple[subprocess.Popen, str, float]:
    http, grpc, metrics = free_ports(3)
    started = time.monotonic()
    command = [
        sys.executable, "-m", "medsr.cli.serve", "--http-port", str(http), "--grpc-port", str(grpc),
        "--metrics-port", str(metrics), "--threads", str(threads), "--max-batch", str(max_batch),
        "--max-queue", "64", "--exit-timeout", "10",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    while not lines or "ready in" not in lines[-1]:
        lines.append(process.stderr.readline())
        if not lines[-1]:
            raise SystemExit("medsr-serve did not start: " + "".join(lines))
    return process, f"127.0.0.1:{grpc}", time.monotonic() - started


def load(url: str, planes: list[np.ndarray], clients: int, per_client: int, seed0: int) -> dict:
    """``clients`` threads, each with its own gRPC client, sending ``per_client`` one-plane requests back to back."""
    import tritonclient.grpc as grpcclient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        conn = grpcclient.InferenceServerClient(url)
        try:
            barrier.wait()
            for k in range(per_client):
                i = (c * per_client + k) % len(planes)
                tensor = grpcclient.InferInput("LR", [1, *planes[i].shape], "FP32")
                tensor.set_data_from_numpy(planes[i][None])
                t0 = time.perf_counter()
                try:
                    conn.infer("medsr", [tensor], parameters={"seed": seed0 + i, "first_index": 0})
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(str(exc)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "planes": len(latencies), "latencies_s": latencies, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="engine threads, server and in-process")
    parser.add_argument("--size", type=int, default=64, help="LR plane side")
    parser.add_argument("--requests", type=int, default=16, help="requests per load (at least one per client)")
    parser.add_argument("--tag", default="serve-cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    from medsr.bundle import load_bundle
    from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
    from medsr.engine.sessions import open_sessions
    from medsr.engine.volume import window_percentiles
    from medsr.io.normalize import denormalize, fit_window, normalize
    from medsr.models import DEFAULT_BUNDLE

    started = time.time()
    info = machine()
    info["load_average"] = list(os.getloadavg())
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : args.size, 0 : args.size]
    planes = [
        (500 + 300 * np.sin(x / 3.0 + i) * np.cos(y / 4.0) + rng.normal(0, 10, (args.size, args.size))).astype(
            np.float32
        )
        for i in range(16)
    ]
    bundle = load_bundle(DEFAULT_BUNDLE)
    pipeline = LatentSRPipeline(bundle, open_sessions(bundle, "ort", threads=args.threads))
    percentiles = window_percentiles(bundle)

    def in_process(indices: list[int], seed0: int) -> list[np.ndarray]:
        out = []
        for i in indices:
            window = fit_window(planes[i][None], *percentiles)
            lr = normalize(planes[i][None], window, clip=False)[0]
            result = pipeline.super_resolve(lr, SamplingOptions(seed=seed0 + i))
            out.append(denormalize(result.images, window))
        return out

    def in_process_batch(indices: list[int]) -> None:
        stack = np.stack([planes[i] for i in indices])  # one window over the batch, one engine call
        window = fit_window(stack, *percentiles)
        pipeline.super_resolve(normalize(stack, window, clip=False)[0], SamplingOptions(seed=0))

    servers = {}
    for name, max_batch in (("served, dynamic batching (--max-batch 16)", 16), ("served, --max-batch 1", 1)):
        process, url, ready_s = start_server(args.threads, max_batch)
        servers[name] = {"process": process, "url": url, "ready_s": ready_s}
    import tritonclient.grpc as grpcclient

    # The served SR equals the in-process SR bit for bit (the same engine, threads, window and seed).
    conn = grpcclient.InferenceServerClient(servers[next(iter(servers))]["url"])
    tensor = grpcclient.InferInput("LR", [1, args.size, args.size], "FP32")
    tensor.set_data_from_numpy(planes[0][None])
    served_sr = conn.infer("medsr", [tensor], parameters={"seed": 7}).as_numpy("SR")
    conn.close()
    bit_equal = bool(np.array_equal(served_sr, in_process([0], 7)[0]))

    # Warm-up, not recorded: every batch shape the rows run (ONNX Runtime plans a new shape on its first run).
    in_process([0], 0)
    in_process_batch(list(range(16)))
    for server in servers.values():
        load(server["url"], planes, 16, 1, 0)

    rows: dict[str, dict] = {}

    def record(key: str, wall: float, n: int, latencies: list[float], errors: list[str] | None = None) -> None:
        row = rows.setdefault(key, {"throughput": [], "latencies_s": [], "errors": []})
        row["throughput"].append(n / wall)
        row["latencies_s"].extend(latencies)
        row["errors"].extend(errors or [])

    for r in range(args.rounds):
        seed0 = 100 * r
        latencies = []
        t0 = time.perf_counter()
        for i in range(4):
            t = time.perf_counter()
            in_process([i], seed0)
            latencies.append(time.perf_counter() - t)
        record("in-process super_resolve, 1 plane per call|1", time.perf_counter() - t0, 4, latencies)
        t0 = time.perf_counter()
        in_process_batch(list(range(16)))
        wall = time.perf_counter() - t0
        record("in-process super_resolve, 16 planes in one call|1", wall, 16, [wall])
        for clients in CONCURRENCY:
            per_client = max(1, args.requests // clients) if clients > 1 else 4
            for name, server in servers.items():
                result = load(server["url"], planes, clients, per_client, seed0)
                record(f"{name}|{clients}", result["wall_s"], result["planes"], result["latencies_s"], result["errors"])
        print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)

    stops = {}
    for name, server in servers.items():
        t0 = time.monotonic()
        server["process"].send_signal(signal.SIGTERM)
        server["process"].communicate(timeout=60)
        stops[name] = {"exit": server["process"].returncode, "stop_s": time.monotonic() - t0}
    info["load_average_after"] = list(os.getloadavg())

    table = []
    for key, row in rows.items():
        name, clients = key.rsplit("|", 1)
        lat = np.asarray(row["latencies_s"])
        table.append(
            {
                "mode": name,
                "clients": int(clients),
                "planes_per_s_median": float(np.median(row["throughput"])),
                "planes_per_s_rounds": row["throughput"],
                "p50_ms": float(np.percentile(lat, 50) * 1000),
                "p99_ms": float(np.percentile(lat, 99) * 1000),
                "requests": int(lat.size),
                "errors": row["errors"],
            }
        )
    # Ratios inside each round (the machine's other jobs change its speed from round to round), then their median.
    base = rows["in-process super_resolve, 1 plane per call|1"]["throughput"]
    for t in table:
        t["vs_in_process_1_plane"] = float(np.median([x / b for x, b in zip(t["planes_per_s_rounds"], base)]))
    for t in table:
        if t["mode"].startswith("served, dynamic"):
            off = next(u for u in table if u["mode"] == "served, --max-batch 1" and u["clients"] == t["clients"])
            ratios = [x / y for x, y in zip(t["planes_per_s_rounds"], off["planes_per_s_rounds"])]
            t["vs_max_batch_1"] = float(np.median(ratios))
    command = "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "config": {
            "bundle": str(DEFAULT_BUNDLE.name),
            "steps": pipeline.scheduler_config.default_steps,
            "plane": [args.size, args.size],
            "engine": "ort fp32 cpu",
            "threads": args.threads,
            "rounds": args.rounds,
            "requests_per_load": args.requests,
            "protocol": "gRPC (tritonclient), 1 plane per request, loopback",
        },
        "machine": info,
        "served_equals_in_process_bit_for_bit": bit_equal,
        "server_ready_s": {name: s["ready_s"] for name, s in servers.items()},
        "server_stop": stops,
        "wall_seconds": time.time() - started,
        "rows": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# medsr-serve: throughput and latency ({args.tag})",
        "",
        f"- command: `{result['command']}` (in .venv-serve)",
        (f"- machine: {info['cpu']}, {info['cores']} cores (shared, other jobs running), AVX-512 "
        f"{'yes' if info['avx512'] else 'no'}, bf16 units: {', '.join(info['bf16_units']) or 'none'}"),
        (f"- load average (1, 5, 15 min) at start {[round(v, 2) for v in info['load_average']]}, at end "
        f"{[round(v, 2) for v in info['load_average_after']]}"),
        f"- versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
        (f"- work: the default bundle at its own steps, 1 LR plane of {args.size} x {args.size} per request (x4), "
        f"ONNX Runtime fp32, {args.threads} engine threads; {args.rounds} interleaved rounds; gRPC over loopback"),
        f"- served SR equal to in-process super_resolve bit for bit: {bit_equal}",
        f"- wall time of the whole benchmark: {result['wall_seconds']:.0f} s",
        "",
        (
            "| mode | clients | planes/s (median of rounds) | vs in-process 1 plane/call | dynamic batching vs "
            "--max-batch 1 | p50 ms | p99 ms | requests | errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(table, key=lambda t: (not t["mode"].startswith("in-process"), t["clients"], t["mode"])):
        batching = f"{t['vs_max_batch_1']:.2f}" if "vs_max_batch_1" in t else "-"
        lines.append(
            f"| {t['mode']} | {t['clients']} | {t['planes_per_s_median']:.2f} | {t['vs_in_process_1_plane']:.2f} | "
            f"{batching} | {t['p50_ms']:.0f} | {t['p99_ms']:.0f} | {t['requests']} | {len(t['errors'])} |"
        )
    lines += [
        "",
        (
            "Ratios are taken inside each round (the other jobs change the machine's speed from round to round), "
            "then their median. Latency is per request (one plane), from the client's send to its response, over "
            "every request of every round; for the 16-planes-in-one-call row it is the call. p99 of a few dozen "
            "requests is close to their maximum."
        ),
    ]
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
