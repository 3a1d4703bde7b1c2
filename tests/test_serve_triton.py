"""Serving (docs/serving.md): the request contract and its batching on the real ONNX Runtime engine, the Triton
model repository, and medsr-serve on the tritonserver that PyTriton bundles, driven over loopback by tritonclient.

The server tests need the serve extra (nvidia-pytriton, tritonclient), whose numpy < 2 pin keeps it out of an
environment with numpy 2: scripts/test runs this file again in its own virtual environment; elsewhere those tests
are skipped with that reason. Every response is compared bit for bit with LatentSRPipeline.super_resolve on the
same planes, window and seed, computed in this process on the same engine.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medsr.bundle import load_bundle
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.engine.sessions import open_sessions
from medsr.engine.volume import window_percentiles
from medsr.errors import InputError, OutputError
from medsr.io.normalize import IntensityWindow, denormalize, fit_window, normalize
from medsr.models import DEFAULT_BUNDLE
from medsr.serve.repository import RepositoryOptions, config_pbtxt, write_repository
from medsr.serve.service import PlaneService

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # the server's and the reference's engine threads (the same, so the same kernels run)
SERVE_EXTRA = (
    "needs the serve extra (nvidia-pytriton, tritonclient), which pins numpy < 2: scripts/test runs this file in "
    "its own virtual environment (.venv-serve)"
)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def pipeline(bundle):
    return LatentSRPipeline(bundle, open_sessions(bundle, "ort", threads=THREADS))


def planes(shape, seed, low=0.0, high=1000.0):
    """LR planes in an input's units (MR-like signal): smooth structure plus noise."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    base = np.sin(x / 3.0 + seed)[None] * np.cos(y / 4.0)[None] * np.arange(1, n + 1)[:, None, None]
    return (low + (high - low) * (0.5 + 0.4 * base / n) + rng.normal(0, 10, shape)).astype(np.float32)


def reference(pipeline, lr, seed=0, steps=None, consistency=None, first_index=0, window=None):
    """What a response must hold: medsr's normalization, LatentSRPipeline.super_resolve, the inverse window."""
    window = window or fit_window(lr, *window_percentiles(pipeline.bundle))
    normalized = normalize(lr, window, clip=False)[0]
    options = SamplingOptions(steps=steps, seed=seed, consistency=consistency)
    result = pipeline.super_resolve(normalized, options, first_index=first_index)
    return denormalize(result.images, window), result.residuals[:, None], window


def reference_for(pipeline, lr, params):
    """`reference` for a request sent with the parameters ``params`` (the service's defaults where absent)."""
    window = None
    if "window_low" in params:
        window = IntensityWindow(float(params["window_low"]), float(params["window_high"]))
    return reference(
        pipeline,
        lr,
        params.get("seed", 0),
        params.get("steps"),
        params.get("consistency"),
        params.get("first_index", 0),
        window,
    )


# --- the request contract and its batching, on the real engine (no Triton) -------------------------------------


def test_service_batches_requests_as_the_pipeline_runs_them_alone(pipeline):
    service = PlaneService(pipeline)
    specs = [
        ((2, 16, 16), {"seed": 1}),
        ((1, 16, 16), {"seed": 2, "first_index": 7}),
        ((2, 16, 16), {"seed": 1, "consistency": "none"}),
        ((1, 12, 20), {"seed": 3, "steps": 2, "window_low": "-5", "window_high": 900.0}),
        ((1, 136, 12), {"seed": 4}),  # above the tile size: tiled, as medsr-infer does
    ]
    inputs = [planes(shape, i) for i, (shape, _) in enumerate(specs)]
    nan = planes((1, 16, 16), 9)
    nan[0, 3, 3] = np.nan
    requests = [service.parse(x, params) for x, (_, params) in zip(inputs, specs)]
    try:
        service.parse(nan, {})
    except InputError as exc:
        requests.insert(1, exc)
    responses = service.run(requests)
    assert isinstance(responses.pop(1), InputError)
    for x, (_, params), response in zip(inputs, specs, responses):
        sr, residual, used = reference_for(pipeline, x, params)
        assert response.sr.dtype == np.float32 and response.sr.shape == (len(x), 4 * x.shape[1], 4 * x.shape[2])
        np.testing.assert_array_equal(response.sr, sr)
        np.testing.assert_array_equal(response.residual, residual.astype(np.float32))
        np.testing.assert_array_equal(response.window, np.float32([[used.low, used.high]] * len(x)))


@pytest.mark.parametrize(
    ("array", "parameters", "message"),
    [
        (np.zeros((1, 8, 8), np.float64), {}, "float32"),
        (np.zeros((8, 8), np.float32), {}, r"\(B, H, W\)"),
        (np.zeros((0, 8, 8), np.float32), {}, "no plane"),
        (np.full((1, 8, 8), np.inf, np.float32), {}, "NaN/Inf"),
        (np.zeros((1, 1, 8), np.float32), {}, "sides"),
        (np.ones((1, 8, 8), np.float32), {"step": 2}, "unknown parameter"),
        (np.ones((1, 8, 8), np.float32), {"steps": 0}, "steps"),
        (np.ones((1, 8, 8), np.float32), {"seed": -1}, "seed"),
        (np.ones((1, 8, 8), np.float32), {"seed": True}, "seed"),
        (np.ones((1, 8, 8), np.float32), {"consistency": "magic"}, "consistency"),
        (np.ones((1, 8, 8), np.float32), {"window_low": 0}, "go together"),
        (np.ones((1, 8, 8), np.float32), {"window_low": 1, "window_high": "x"}, "number"),
    ],
)
def test_service_refuses_malformed_requests(pipeline, array, parameters, message):
    with pytest.raises(InputError, match=message):
        PlaneService(pipeline).parse(array, parameters)


def test_a_request_too_large_for_the_memory_bound_is_refused_and_the_service_goes_on(pipeline):
    service = PlaneService(pipeline, max_request_bytes=8 << 20)  # 8 MiB: 1 plane of 96 x 96 needs about 3 MiB at x4
    with pytest.raises(InputError, match=r"needs about 11\.8 MiB .* over the limit of 8\.0 MiB per request") as caught:
        service.parse(planes((4, 96, 96), 0))
    assert "\n" not in str(caught.value)
    x = planes((2, 16, 16), 1)
    (response,) = service.run([service.parse(x, {"seed": 3})])
    np.testing.assert_array_equal(response.sr, reference(pipeline, x, seed=3)[0])
    assert PlaneService(pipeline, max_request_bytes=None).parse(planes((4, 96, 96), 0)).lr.shape == (4, 96, 96)


def test_a_constant_request_has_no_window(pipeline):
    with pytest.raises(InputError, match="constant"):
        PlaneService(pipeline).parse(np.ones((1, 16, 16), np.float32))


# --- the model repository -------------------------------------------------------------------------------------


def test_repository_layout_and_config(tmp_path, bundle):
    model = write_repository(DEFAULT_BUNDLE, tmp_path, RepositoryOptions(max_batch_size=8, max_queue_size=5))
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 8" in config
    assert "preferred_batch_size: [ 4, 8 ]" in config and "max_queue_size: 5" in config
    assert 'name: "LR" data_type: TYPE_FP32 dims: [ -1, -1 ]' in config
    assert "kind: KIND_CPU count: 1" in config and "latest: { num_versions: 1 }" in config
    assert f'key: "max_request_bytes" value: {{ string_value: "{1 << 30}" }}' in config
    copied = model / "1" / "bundle"
    assert load_bundle(copied).manifest == bundle.manifest
    assert {p.name for p in copied.iterdir()} == {"medsr.json", "NOTICE", *(e.file for e in bundle.graphs.values())}
    assert (model / "1" / "model.py").read_text().startswith('"""The Python-backend model')
    with pytest.raises(OutputError, match="exists"):
        write_repository(DEFAULT_BUNDLE, tmp_path)
    with pytest.raises(InputError, match="GPU"):
        config_pbtxt(RepositoryOptions(engine="trt"), "bundle")


def test_medsr_export_writes_a_repository(tmp_path):
    from medsr.cli.export import export

    result = CliRunner().invoke(export, ["--triton", str(tmp_path / "repo"), "--model", str(DEFAULT_BUNDLE)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "medsr" / "config.pbtxt").is_file()
    missing = CliRunner().invoke(export, ["--model", str(tmp_path / "nothing"), "--triton", str(tmp_path / "r2")])
    assert missing.exit_code == 1 and "not found" in missing.output


# --- Triton over loopback ---------------------------------------------------------------------------------------


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def triton_client(kind):
    pytest.importorskip("pytriton", reason=SERVE_EXTRA)
    pytest.importorskip("tritonclient.http", reason=SERVE_EXTRA)
    import tritonclient.grpc
    import tritonclient.http

    return tritonclient.http if kind == "http" else tritonclient.grpc


def infer(module, url, lr, parameters=None, datatype="FP32"):
    """One request; (SR, RESIDUAL, WINDOW) or the exception tritonclient raised."""
    client = module.InferenceServerClient(url)
    tensor = module.InferInput("LR", list(lr.shape), datatype)
    tensor.set_data_from_numpy(lr)
    try:
        result = client.infer("medsr", [tensor], parameters=parameters)
    except Exception as exc:  # noqa: BLE001 - the client's error is what the test looks at
        return exc
    finally:
        client.close()
    return tuple(result.as_numpy(name) for name in ("SR", "RESIDUAL", "WINDOW"))


MAX_REQUEST_MEMORY = "128M"  # the served fixture's bound: 1 plane of 1024 x 512 needs 168 MiB at x4


def start_server(*args, exit_timeout=30):
    """``python -m medsr.cli.serve`` on free loopback ports; (process, urls, seconds to ready) once it is ready."""
    http, grpc, metrics = free_ports(3)
    started = time.monotonic()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medsr.cli.serve",
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
            "--threads",
            str(THREADS),
            "--exit-timeout",
            str(exit_timeout),
            *args,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    while not lines or "ready in" not in lines[-1]:  # the CLI prints one line once ready, or exits with an error
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)
    urls = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "metrics": metrics}
    return process, urls, time.monotonic() - started


def infer_id(kind, url, lr, parameters, request_id, timeout=120.0):
    """One request with a KServe request id: (the response's id, SR) or the exception; never waits past
    ``timeout`` seconds."""
    module = triton_client(kind)
    if kind == "http":
        client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        extra = {}
    else:
        client = module.InferenceServerClient(url)
        extra = {"client_timeout": timeout}
    tensor = module.InferInput("LR", list(lr.shape), "FP32")
    tensor.set_data_from_numpy(lr)
    try:
        result = client.infer("medsr", [tensor], parameters=parameters, request_id=request_id, **extra)
        response = result.get_response()
        return (response["id"] if kind == "http" else response.id), result.as_numpy("SR")
    except Exception as exc:  # noqa: BLE001 - the client's error is what the test looks at
        return exc
    finally:
        client.close()


@pytest.fixture(scope="module")
def served():
    """``python -m medsr.cli.serve`` on loopback, as a user starts it; stopped with SIGTERM at the end."""
    triton_client("http")
    process, urls, startup = start_server("--max-batch", "8", "--max-request-memory", MAX_REQUEST_MEMORY)
    yield {**urls, "startup_s": startup}
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped" in err


def test_health_readiness_and_metrics(served):
    for path in ("live", "ready"):
        with urllib.request.urlopen(f"http://{served['http']}/v2/health/{path}", timeout=5) as response:
            assert response.status == 200
    with urllib.request.urlopen(f"http://{served['http']}/v2/models/medsr/ready", timeout=5) as response:
        assert response.status == 200
    grpc = triton_client("grpc").InferenceServerClient(served["grpc"])
    assert grpc.is_server_live() and grpc.is_model_ready("medsr")
    with urllib.request.urlopen(f"http://127.0.0.1:{served['metrics']}/metrics", timeout=5) as response:
        assert "nv_inference_request_success" in response.read().decode()


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf'^{name}{{model="medsr"[^}}]*}} (\S+)$', text, re.MULTILINE))


def test_concurrent_mixed_requests_equal_the_pipeline_bit_for_bit(served, pipeline):
    specs = [
        ("http", (2, 16, 16), {"seed": 1}),
        ("grpc", (1, 16, 16), {"seed": 2, "first_index": 3}),
        ("http", (3, 16, 16), {"seed": 1, "steps": 2}),
        ("grpc", (2, 16, 16), {"seed": 7, "consistency": "none"}),
        ("http", (1, 12, 20), {"seed": 5}),
        ("grpc", (2, 12, 20), {"seed": 5, "window_low": 0, "window_high": "1000"}),
        ("http", (1, 16, 16), {}),
        ("grpc", (2, 16, 16), {"seed": 1}),
    ]
    inputs = [planes(shape, i) for i, (_, shape, _) in enumerate(specs)]
    requests_before = metric(served["metrics"], "nv_inference_request_success")
    runs_before = metric(served["metrics"], "nv_inference_exec_count")
    barrier = threading.Barrier(len(specs))

    def send(i):
        kind, _, params = specs[i]
        barrier.wait()
        return infer(triton_client(kind), served[kind], inputs[i], params)

    started = time.monotonic()
    with ThreadPoolExecutor(len(specs)) as pool:
        responses = list(pool.map(send, range(len(specs))))
    wall = time.monotonic() - started
    for x, (_, _, params), response in zip(inputs, specs, responses):
        assert isinstance(response, tuple), response
        sr, residual, used = reference_for(pipeline, x, params)
        np.testing.assert_array_equal(response[0], sr)
        np.testing.assert_array_equal(response[1], residual.astype(np.float32))
        np.testing.assert_array_equal(response[2], np.float32([[used.low, used.high]] * len(x)))
    requests = metric(served["metrics"], "nv_inference_request_success") - requests_before
    runs = metric(served["metrics"], "nv_inference_exec_count") - runs_before
    assert requests == len(specs)
    assert runs < requests, "Triton batched no two requests together"  # batching was exercised
    print(
        f"\nserve: startup {served['startup_s']:.2f} s; {len(specs)} concurrent requests in {wall:.2f} s, "
        f"{runs:g} model executions"
    )


def test_malformed_requests_get_errors_and_the_server_keeps_serving(served, pipeline):
    http, grpc = triton_client("http"), triton_client("grpc")
    nan = planes((2, 16, 16), 1)
    nan[1, 2, 2] = np.nan
    bad = [
        (http, served["http"], np.zeros((1, 16, 16), np.float64), None, "FP64", "FP64"),
        (grpc, served["grpc"], np.zeros((4, 16), np.float32), None, "FP32", "shape"),
        (http, served["http"], nan, None, "FP32", "NaN"),
        (grpc, served["grpc"], nan, None, "FP32", "NaN"),
        (http, served["http"], np.zeros((0, 16, 16), np.float32), None, "FP32", ""),
        (grpc, served["grpc"], planes((1, 16, 16), 2), {"steps": 0}, "FP32", "steps"),
        (http, served["http"], planes((9, 16, 16), 2), None, "FP32", "batch"),  # above --max-batch 8
    ]
    for module, url, array, params, datatype, message in bad:
        error = infer(module, url, array, params, datatype)
        assert isinstance(error, Exception), (array.shape, params)
        assert message in str(error), str(error)
        if message in ("NaN", "steps"):  # refused by the model: a client error, not a server fault
            assert error.status() in ("400", "StatusCode.INVALID_ARGUMENT"), error.status()
    # A bad request batched with good ones of the same shape fails alone.
    good = [planes((2, 16, 16), 10 + i) for i in range(3)]
    barrier = threading.Barrier(4)

    def send(x):
        barrier.wait()
        return infer(http, served["http"], x, {"seed": 4})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, [good[0], nan, good[1], good[2]]))
    assert isinstance(responses[1], Exception) and "NaN" in str(responses[1])
    for x, response in zip([good[0], good[1], good[2]], [responses[0], responses[2], responses[3]]):
        np.testing.assert_array_equal(response[0], reference(pipeline, x, seed=4)[0])


def test_a_plane_too_large_for_the_memory_limit_gets_an_error_and_the_server_keeps_serving(served, pipeline):
    http = triton_client("http")
    large = planes((1, 1024, 512), 1)  # 168 MiB of image arrays at x4, over the served --max-request-memory 128M
    error = infer(http, served["http"], large)
    assert isinstance(error, Exception) and error.status() == "400", error
    message = str(error)
    assert "medsr:" in message and "over the limit of 128.0 MiB per request" in message, message
    assert "\n" not in message
    x = planes((1, 16, 16), 2)
    response = infer(http, served["http"], x, {"seed": 6})
    assert isinstance(response, tuple), response
    np.testing.assert_array_equal(response[0], reference(pipeline, x, seed=6)[0])


def test_no_request_is_lost_or_duplicated_under_concurrent_load(served, pipeline):
    """N concurrent requests over HTTP and gRPC, each with its own id and seed: N responses, each id once, each
    holding the SR of its own planes (bit for bit), and N successes in Triton's metrics."""
    n = 24
    inputs = [planes((1 + i % 3, 16, 16), 100 + i) for i in range(n)]
    ids = [f"req-{i:03d}" for i in range(n)]
    before = metric(served["metrics"], "nv_inference_request_success")
    runs_before = metric(served["metrics"], "nv_inference_exec_count")
    barrier = threading.Barrier(n)

    def send(i):
        kind = ("http", "grpc")[i % 2]
        barrier.wait()
        return infer_id(kind, served[kind], inputs[i], {"seed": 1000 + i}, ids[i])

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(send, range(n)))
    failures = [r for r in responses if not isinstance(r, tuple)]
    assert not failures, failures
    assert sorted(r[0] for r in responses) == ids  # every id answered exactly once
    for i, (request_id, sr) in enumerate(responses):
        assert request_id == ids[i]
        np.testing.assert_array_equal(sr, reference(pipeline, inputs[i], seed=1000 + i)[0])
    assert metric(served["metrics"], "nv_inference_request_success") - before == n
    assert metric(served["metrics"], "nv_inference_exec_count") - runs_before < n  # batched


def test_sigterm_under_load_drains_or_fails_every_request_cleanly(pipeline):
    """SIGTERM while several requests are queued or running: each client gets the pipeline's SR bit for bit or a
    clear error, none hangs (a request sent after the signal too), and the server exits 0 in bounded time."""
    triton_client("http")
    exit_timeout = 10
    process, urls, _ = start_server("--max-batch", "2", exit_timeout=exit_timeout)
    n = 8
    inputs = [planes((1, 48, 48), 200 + i) for i in range(n)]
    params = [{"seed": 2000 + i, "steps": 2} for i in range(n)]
    try:
        with ThreadPoolExecutor(n + 1) as pool:
            kinds = [("http", "grpc")[i % 2] for i in range(n)]
            futures = [
                pool.submit(infer_id, kinds[i], urls[kinds[i]], inputs[i], params[i], f"load-{i}", 90.0)
                for i in range(n)
            ]
            deadline = time.monotonic() + 30
            while metric(urls["metrics"], "nv_inference_exec_count") < 1:  # the first batch has run: load is on
                assert time.monotonic() < deadline, "no request ran"
                time.sleep(0.05)
            stopped_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            late = pool.submit(infer_id, "grpc", urls["grpc"], inputs[0], params[0], "late", 30.0)
            results = [future.result(timeout=120) for future in futures]  # none hangs
            late = late.result(timeout=60)
        _, err = process.communicate(timeout=exit_timeout + 30)
        exited_after = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert exited_after < exit_timeout + 20, exited_after
    served_count = 0
    for i, result in enumerate(results):
        if isinstance(result, tuple):
            assert result[0] == f"load-{i}"
            np.testing.assert_array_equal(result[1], reference(pipeline, inputs[i], **params[i])[0])
            served_count += 1
        else:  # a clear error: the server is stopping or gone, never an empty message
            assert str(result).strip(), repr(result)
    assert served_count >= 1  # the batch in flight at the signal finished
    if isinstance(late, tuple):  # accepted before the frontend closed: then it is correct
        np.testing.assert_array_equal(late[1], reference(pipeline, inputs[0], **params[0])[0])
    else:
        assert str(late).strip(), repr(late)
    print(
        f"\nSIGTERM under load: {served_count} of {n} served, {n - served_count} refused, the late request "
        f"{'served' if isinstance(late, tuple) else 'refused'}; exit {exited_after:.1f} s after the signal"
    )


def test_exported_repository_on_tritonserver_busy_and_graceful_stop(tmp_path):
    """The self-contained repository medsr-export --triton writes, on the bundled tritonserver: a full queue answers
    at once with Triton's busy error, and SIGTERM lets the request in flight finish."""
    http = triton_client("http")
    from medsr.serve.local import LocalTriton

    repository = tmp_path / "models"
    write_repository(
        DEFAULT_BUNDLE,
        repository,
        RepositoryOptions(threads=THREADS, max_batch_size=1, max_queue_size=1, max_queue_delay_us=0),
    )
    ports = free_ports(3)
    server = LocalTriton(repository, tmp_path, "127.0.0.1", *ports, exit_timeout=30)
    server.start()
    try:
        server.wait_ready(timeout=60)
        x = planes((1, 32, 32), 3)
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: infer(http, server.http_url, x, {"seed": 1}), range(6)))
        busy = [r for r in responses if isinstance(r, Exception)]
        assert busy and all("Exceeds maximum queue size" in str(r) and r.status() == "503" for r in busy), busy
        assert any(isinstance(r, tuple) for r in responses)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(infer, http, server.http_url, planes((1, 48, 48), 4))
            time.sleep(0.3)
            status = server.stop()
            assert isinstance(in_flight.result(), tuple), in_flight.result()
        assert status == 0
    finally:
        server.stop()
    assert not server.ready()


def test_serve_help():
    result = subprocess.run(
        [sys.executable, "-m", "medsr.cli.serve", "--help"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 0 and "--max-queue" in result.stdout
