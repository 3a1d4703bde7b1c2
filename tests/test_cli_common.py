"""What every console script shares (medsr.cli.common.run_command): medsr's informational messages on stderr."""

from __future__ import annotations

import logging
import sys

import click

from medsr.cli import common


def test_informational_messages_reach_stderr_once(monkeypatch, capsys):
    """A console script shows medsr's INFO messages (such as a TensorRT plan being built for minutes) as
    ``medsr: <message>`` on stderr, and stdout stays the command's own; running twice adds no second handler."""

    @click.command()
    def talk():
        logging.getLogger("medsr.engine.trt").info("building the TensorRT plan of %s", "denoiser")
        click.echo("done")

    logger = logging.getLogger("medsr")
    before = list(logger.handlers)
    monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["talk"])
    try:
        common.run_command(talk)
        common.run_command(talk)
        added = [h for h in logger.handlers if h not in before]
        assert len(added) == 1
    finally:
        logger.handlers = before
    out, err = capsys.readouterr()
    assert out == "done\ndone\n"
    assert err == "medsr: building the TensorRT plan of denoiser\n" * 2
