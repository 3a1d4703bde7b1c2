"""Every command that takes a seed refuses a negative one as a usage error (exit 2, the option named), instead of a
NumPy traceback from ``np.random.default_rng`` deep in the run."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from medsr.cli.eval import cli as eval_cli
from medsr.cli.export import export
from medsr.cli.infer import infer
from medsr.cli.train import cli as train_cli

COMMANDS = {
    "medsr-infer": (infer, ["volume.nii.gz"]),
    "medsr-eval parity": (eval_cli, ["parity"]),
    "medsr-eval fidelity": (eval_cli, ["fidelity"]),
    "medsr-eval compare": (eval_cli, ["compare", "a.json", "b.json"]),
    "medsr-export": (export, ["--preset", "tiny", "--random-init", "-o", "bundle"]),
    "medsr-train vae": (train_cli, ["vae"]),
    "medsr-train denoiser": (train_cli, ["denoiser"]),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_negative_seed_is_a_usage_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command, args = COMMANDS[name]
    subcommand, rest = (args[:1], args[1:]) if command in (eval_cli, train_cli) else ([], args)
    result = CliRunner().invoke(command, [*subcommand, "--seed", "-1", *rest])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--seed'" in result.output
    assert not any(tmp_path.iterdir()), "a refused command wrote something"
