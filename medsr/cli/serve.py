"""``medsr-serve``: serve a model bundle over HTTP and gRPC on the tritonserver that PyTriton bundles (the serve
extra; docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

import click

from medsr.cli.common import medsr_errors, run_command
from medsr.cli.model import MODEL_HELP
from medsr.engine.precision import describe_precisions, precision_choices

_ENGINES = ("ort", "openvino", "trt")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", type=click.Path(path_type=Path, file_okay=False), help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Requests waiting at most; beyond, a request is refused at once ('Exceeds maximum queue size': retry later).",
)
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=16, show_default=True, help="Planes per engine run at most."
)
@click.option(
    "--max-request-memory",
    default="1G",
    show_default=True,
    help="Refuse a request whose image arrays need more than this (e.g. 512M, 4G; 0: no bound): it gets an "
    "error, the others are served.",
)
@click.option("--engine", type=click.Choice(_ENGINES), default="ort", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(precision_choices(*_ENGINES)),
    default="fp32",
    show_default=True,
    help=describe_precisions(*_ENGINES),
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads of the engine (default: the available cores).")
@click.option(
    "--exit-timeout",
    type=click.IntRange(min=0),
    default=30,
    show_default=True,
    help="Seconds a SIGTERM waits for in-flight requests (and open HTTP connections) before the server exits.",
)
@click.option("--verbose", is_flag=True, help="Show tritonserver's own log.")
@medsr_errors
def serve(
    model,
    host,
    http_port,
    grpc_port,
    metrics_port,
    max_queue,
    max_batch,
    max_request_memory,
    engine,
    device,
    precision,
    threads,
    exit_timeout,
    verbose,
):
    """Serve the model: requests are LR planes float32 (B, H, W) in the input's units; responses the SR planes in
    the same units (docs/serving.md). Stops gracefully on SIGTERM or Ctrl-C."""
    import time

    from medsr.cli.model import load_model
    from medsr.io.limits import parse_size
    from medsr.serve.local import serve_bundle
    from medsr.serve.repository import RepositoryOptions

    started = time.monotonic()
    max_request_bytes = parse_size(max_request_memory)
    bundle = load_model(model)
    options = RepositoryOptions(
        engine=engine,
        device=device,
        precision=precision,
        threads=threads or 0,
        max_batch_size=max_batch,
        max_queue_size=max_queue,
        max_request_bytes=max_request_bytes,
    )

    def ready(server) -> None:
        click.echo(
            f"medsr-serve: model {options.name} ({bundle.manifest.name}, engine {engine} on {device}) ready in "
            f"{time.monotonic() - started:.1f} s: HTTP {server.host}:{server.http_port}, gRPC "
            f"{server.host}:{server.grpc_port}, metrics http://{server.host}:{server.metrics_port}/metrics",
            err=True,
        )

    serve_bundle(
        bundle.root, options, host, http_port, grpc_port, metrics_port, exit_timeout, verbose=verbose, on_ready=ready
    )
    click.echo("medsr-serve: stopped", err=True)


def _write_triton(ctx: click.Context, param: click.Parameter, value):
    """Eager callback of ``--triton`` and ``--model``: once both are parsed, write the repository and exit."""
    seen = ctx.meta.setdefault("medsr.triton", {})
    seen[param.name] = value
    if len(seen) < 2 or seen["triton"] is None or ctx.resilient_parsing:
        return value
    from medsr.cli.model import load_model
    from medsr.errors import MedsrError
    from medsr.serve.repository import write_repository

    try:
        bundle = load_model(seen["model"])
        path = write_repository(bundle.root, seen["triton"])
    except MedsrError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote Triton model repository {seen['triton']} (model {path.name}, bundle {bundle.manifest.name})")
    ctx.exit(0)


def triton_export_options(command):
    """``--triton DIR [--model BUNDLE]`` of medsr-export: write a Triton model repository of an existing bundle
    (default: the bundled one) into DIR and exit, exporting nothing (docs/serving.md)."""
    command = click.option(
        "--model",
        type=click.Path(path_type=Path, file_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_write_triton,
        help="With --triton: the bundle to serve (default: the bundled one).",
    )(command)
    return click.option(
        "--triton",
        type=click.Path(path_type=Path, file_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_write_triton,
        help="Write a Triton model repository of --model into this directory and exit (nothing is exported; "
        "docs/serving.md).",
    )(command)


def main() -> None:
    run_command(serve)


if __name__ == "__main__":
    main()
