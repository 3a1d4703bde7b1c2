"""A medsr model repository on the tritonserver that PyTriton bundles (``medsr-serve``; docs/serving.md).

PyTriton (PyPI ``nvidia-pytriton``, the ``serve`` extra) ships tritonserver 2.51 with its Python backend and a
backend stub per Python version, and runs on a CPU-only Linux with glibc >= 2.35. PyTriton's own ``Triton.bind``
serves a Python callable, but it fails every request of a dynamic batch when one of them is bad; medsr-serve instead
runs that same server binary on the repository medsr.serve.repository writes, whose model answers each request on
its own (medsr.serve.triton_model). The server is a child process: HTTP and gRPC (KServe v2), health and readiness
(``/v2/health/live``, ``/v2/health/ready``), Prometheus metrics (``/metrics`` on the metrics port); SIGTERM or
SIGINT stops it gracefully (queued and running requests finish within ``exit_timeout`` seconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from medsr.errors import BackendError
from medsr.serve.repository import RepositoryOptions, write_repository


def pytriton_distribution() -> tuple[Path, Path]:
    """(tritonserver directory, external libraries directory) of the installed PyTriton."""
    try:
        import pytriton
    except ImportError as exc:
        raise BackendError(
            "medsr-serve needs PyTriton: pip install 'medsr[serve]' (nvidia-pytriton pins numpy < 2, so give it "
            "its own virtual environment if the rest of yours needs numpy 2)"
        ) from exc
    root = Path(pytriton.__file__).parent
    server = root / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # an editable PyTriton keeps them here
        libs = server / "external_libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise BackendError(f"{server}: this PyTriton has no bundled tritonserver")
    return server, libs


class LocalTriton:
    """tritonserver serving ``repository`` on ``host``: ``start()``, ``wait_ready()``, ``stop()``; a context manager.

    ``workspace``: a directory for the backend directory (the stub of this Python linked in) and the server log.
    """

    def __init__(
        self,
        repository: Path,
        workspace: Path,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        exit_timeout: int = 30,
        verbose: bool = False,
    ):
        self.repository = Path(repository)
        self.workspace = Path(workspace)
        self.host = host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.exit_timeout = exit_timeout
        self.verbose = verbose
        self.log_path = self.workspace / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        """Where a client on this machine reaches the HTTP endpoint."""
        return f"{self._local_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._local_host}:{self.grpc_port}"

    @property
    def _local_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def _backends(self, server: Path) -> Path:
        """A backend directory whose Python backend uses the stub built for this interpreter's version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise BackendError(f"PyTriton has no Python backend stub for Python {version} ({stub})")
        python = self.workspace / "backends" / "python"
        python.mkdir(parents=True, exist_ok=True)
        for item in (server / "backends" / "python").iterdir():
            if item.is_file():
                (python / item.name).symlink_to(item)
        (python / stub.name).symlink_to(stub)
        return python.parent

    def command(self, server: Path) -> list[str]:
        return [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends(server)}",
            f"--backend-config=python,shm-region-prefix-name=medsr_{os.getpid()}_{self.http_port}_",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout}",
            "--strict-readiness=true",
            "--disable-auto-complete-config",
            f"--log-info={'true' if self.verbose else 'false'}",
        ]

    def environment(self, libs: Path) -> dict[str, str]:
        """The server's environment: PyTriton's libraries, and this interpreter's libpython first (on some Python
        builds the stub otherwise loads the system's libpython and model load fails); this environment's ``bin``
        first on PATH, so that the stub runs in it."""
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        paths = [str(libs), libdir, env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = ":".join(path for path in paths if path)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def start(self) -> None:
        server, libs = pytriton_distribution()
        command = self.command(server)
        log = None if self.verbose else open(self.log_path, "wb")  # noqa: SIM115 - the child writes it, not us
        try:
            self.process = subprocess.Popen(
                command,
                env=self.environment(libs),
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            raise BackendError(f"cannot start tritonserver: {exc}") from exc
        finally:
            if log is not None:
                log.close()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Return once every model is ready; BackendError (with the server log's tail) if the server exits first
        or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise BackendError(f"tritonserver exited before it was ready: {self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise BackendError(f"tritonserver was not ready after {timeout:g} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        errors = [line for line in text.splitlines() if line.startswith(("E", "Error"))]
        return " | ".join((errors or text.splitlines())[-lines:]) or "(empty log)"

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        return self.process.wait() if self.process else 0

    def stop(self, grace: float | None = None) -> int:
        """SIGTERM: tritonserver lets queued and running requests finish, unloads the model and exits; killed
        if it has not exited ``grace`` seconds (default exit_timeout + 10) later. Returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace if grace is not None else self.exit_timeout + 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_bundle(
    bundle_dir,
    options: RepositoryOptions | None = None,
    host: str = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    exit_timeout: int = 30,
    verbose: bool = False,
    on_ready=None,
) -> int:
    """Serve the bundle at ``bundle_dir`` until SIGTERM/SIGINT; return tritonserver's exit status.

    The repository (referencing the bundle, not copying it) and the backend directory live in a temporary
    directory removed at exit. ``on_ready(server)`` is called once the model is ready.
    """
    options = options or RepositoryOptions()
    workspace = Path(tempfile.mkdtemp(prefix="medsr-serve-"))
    stopping = []

    def _stop(signum, frame):
        stopping.append(signum)
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    try:
        repository = workspace / "models"
        write_repository(bundle_dir, repository, options, copy_bundle=False)
        server = LocalTriton(
            repository, workspace, host, http_port, grpc_port, metrics_port, exit_timeout=exit_timeout, verbose=verbose
        )
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.start()
            try:
                server.wait_ready()
            except BackendError:
                if stopping:  # asked to stop while the model was loading
                    return 0
                raise
            if on_ready is not None:
                on_ready(server)
            while True:
                try:
                    status = server.process.wait(timeout=server.exit_timeout + 10 if stopping else None)
                    break
                except subprocess.TimeoutExpired:
                    server.process.kill()
        finally:
            server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status != 0 and not stopping:
            raise BackendError(f"tritonserver exited with status {status}: {server.log_tail()}")
        return 0 if stopping else status
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
