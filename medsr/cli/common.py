"""What every medsr command shares: MedsrError -> one-line error and exit code 1; SIGINT/SIGTERM -> exit 130/143
after the atomic writers have removed their temporary files."""

from __future__ import annotations

import functools
import logging
import signal
import sys

import click

from medsr.errors import BackendError, MedsrError


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class _ProgressSafeHandler(logging.Handler):
    """Writes log records to stderr through tqdm, so that they do not break a progress bar being drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging's own contract: a failing handler reports, never raises)
            self.handleError(record)


def log_to_stderr() -> logging.Handler:
    """Show medsr's informational messages (a TensorRT plan being built for minutes, the fp32 islands decided) on
    stderr as ``medsr: <message>``, once per process; the handler."""
    logger = logging.getLogger("medsr")
    for handler in logger.handlers:
        if isinstance(handler, _ProgressSafeHandler):
            return handler
    handler = _ProgressSafeHandler(logging.INFO)
    handler.setFormatter(logging.Formatter("medsr: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def run_command(command: click.Command) -> None:
    """Run a click command as a console script, turning MedsrError into ``Error: <message>`` on stderr; medsr's
    informational messages go to stderr too (:func:`log_to_stderr`)."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    log_to_stderr()
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted: no output was written.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MedsrError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted: no output was written.", err=True)
        sys.exit(130)


def medsr_errors(function):
    """Decorator for command callbacks: MedsrError becomes a ClickException, so CliRunner sees exit code 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MedsrError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def torch_reference() -> None:
    """Register the PyTorch reference as the engine's ``torch`` backend, for ``--engine torch`` and the parity
    reference: importing medsr.export.reference registers it (the engine never imports the PyTorch side). Without
    the torch extra, a one-line BackendError says what to install."""
    try:
        import medsr.export.reference  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"--engine torch needs the torch extra (pip install 'medsr[torch]'): {exc}") from exc
