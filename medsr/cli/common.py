"""What every medsr command shares: MedsrError -> one-line error and exit code 1; SIGINT/SIGTERM -> exit 130/143
after the atomic writers have removed their temporary files."""

from __future__ import annotations

import functools
import signal
import sys

import click

from medsr.errors import BackendError, MedsrError


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run_command(command: click.Command) -> None:
    """Run a click command as a console script, turning MedsrError into ``Error: <message>`` on stderr."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
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
