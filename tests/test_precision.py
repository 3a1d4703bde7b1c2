"""One list of precisions per engine, used by every command-line option and accepted exactly by every engine, and
the one parity-gated ``auto`` policy (medsr.engine.precision)."""

from __future__ import annotations

from types import SimpleNamespace

import click
import numpy as np
import pytest
from trt_fakes import FakeCuda, fake_bundle, fake_tensorrt

import medsr.engine.precision as precision_module
import medsr.engine.sessions as sessions_module
from medsr.cli.eval import cli as eval_cli
from medsr.cli.export import export
from medsr.cli.infer import infer
from medsr.engine.precision import AUTO_MARGIN_DB, PRECISIONS, choose_mixed, precision_choices
from medsr.engine.sessions import ENGINES, open_sessions
from medsr.errors import BackendError

EVERY_PRECISION = precision_choices(*ENGINES) + ("int8", "fp8")


def commands():
    """Every medsr command that takes options: (name, click.Command)."""
    found = [("medsr-infer", infer), ("medsr-export", export)]
    found += [(f"medsr-eval {name}", command) for name, command in eval_cli.commands.items()]
    return found


def test_every_precision_option_offers_exactly_the_engines_lists():
    checked = []
    for name, command in commands():
        options = {param.name: param for param in command.params if isinstance(param, click.Option)}
        for option in ("precision", "trt_precision"):
            if option not in options:
                continue
            engine = options.get("engine")
            if option == "trt_precision":
                engines = ("trt",)
            else:  # --engine auto runs one of the named engines
                engines = tuple(choice for choice in engine.type.choices if choice != "auto")
            assert tuple(options[option].type.choices) == precision_choices(*engines), (name, option)
            checked.append(name)
    assert {"medsr-infer", "medsr-export", "medsr-eval parity"} <= set(checked), checked


def test_open_sessions_accepts_exactly_each_engines_list(monkeypatch):
    opened = []
    fakes = {name: (lambda bundle, **kw: opened.append(kw["precision"]) or {}) for name in ENGINES}
    monkeypatch.setattr(sessions_module, "_BACKENDS", fakes)
    for engine in ENGINES:
        accepted = []
        for precision in EVERY_PRECISION:
            try:
                open_sessions(SimpleNamespace(), engine, precision=precision)
                accepted.append(precision)
            except BackendError as exc:
                assert f"--engine {engine} runs" in str(exc) and precision in str(exc)
        assert tuple(accepted) == PRECISIONS[engine], engine


def test_tensorrt_accepts_exactly_its_list(tmp_path, monkeypatch):
    from medsr.engine.profiles import ShapeProfile
    from medsr.engine.trt import open_trt_sessions

    profile = ShapeProfile("denoiser", (("sample", ((1, 3, 64, 64),) * 3),))
    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_module, "probe_output", lambda bundle, sessions: np.arange(4.0))
    cuda = FakeCuda()
    accepted = []
    for precision in EVERY_PRECISION:
        try:
            sessions = open_trt_sessions(fake_bundle(tmp_path / "b"), precision, trt=fake_tensorrt(cuda), cuda=cuda)
        except BackendError as exc:
            assert "TensorRT precision must be one of" in str(exc)
            continue
        accepted.append(precision)
        for session in sessions.values():
            session.key(profile)  # every accepted precision has a builder recipe (auto was resolved per graph)
    assert tuple(accepted) == PRECISIONS["trt"]


def test_openvino_accepts_exactly_its_list(tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from medsr.bundle import load_bundle
    from medsr.engine.openvino import has_bf16_units, import_openvino, open_openvino_sessions

    monkeypatch.setenv("MEDSR_CACHE", str(tmp_path))
    bundle = load_bundle(tiny_bundle)
    bf16 = has_bf16_units(import_openvino().Core())
    accepted = []
    for precision in EVERY_PRECISION:
        try:
            open_openvino_sessions(bundle, precision, threads=1)
        except BackendError as exc:
            if precision == "bf16" and not bf16 and "no bf16 units" in str(exc):
                accepted.append(precision)  # in the list; this CPU cannot run it
                continue
            assert "OpenVINO precision must be one of fp32, bf16, auto" in str(exc)
            continue
        accepted.append(precision)
    assert tuple(accepted) == PRECISIONS["openvino"]


# --- the auto policy --------------------------------------------------------------------------------------------


def _policy(penalties: dict[str, float]):
    """An engine whose probe output moves by ``penalties[graph]`` for each graph in reduced precision, and a log of
    the precisions opened."""
    opened = []

    def open_at(precision):
        opened.append(precision)
        return {graph: SimpleNamespace(precision=precision) for graph in ("encoder", "denoiser", "decoder")}

    def output(bundle, sessions):
        shift = sum(penalties[g] for g, s in sessions.items() if s.precision == "bf16")
        return np.linspace(0.0, 1.0, 101) + shift

    return open_at, output, opened


def test_auto_keeps_the_most_reduced_graphs_that_pass_end_to_end():
    # 1e-3 alone is 60 dB; the decoder's 0.01 is 40 dB, below 40 + the margin: only the decoder stays fp32
    open_at, output, opened = _policy({"encoder": 1e-3, "denoiser": 1e-3, "decoder": 1e-2})
    sessions, chosen, parity = choose_mixed(None, open_at, "bf16", threshold_db=40.0, output=output)
    assert chosen == {"encoder": "bf16", "denoiser": "bf16", "decoder": "fp32"}
    assert {g: s.precision for g, s in sessions.items()} == chosen
    assert parity == pytest.approx(20 * np.log10(1 / 2e-3)) and parity >= 40.0 + AUTO_MARGIN_DB
    assert opened == ["fp32", "bf16"]


def test_auto_falls_back_to_fp32_everywhere_when_nothing_passes():
    open_at, output, _ = _policy({"encoder": 0.1, "denoiser": 0.1, "decoder": 0.1})
    sessions, chosen, parity = choose_mixed(None, open_at, "bf16", threshold_db=40.0, output=output)
    assert set(chosen.values()) == {"fp32"} and parity == float("inf")
    assert {s.precision for s in sessions.values()} == {"fp32"}


def test_the_margin_is_part_of_the_gate():
    # 0.009 on one graph: 40.9 dB, which clears a bare 40 dB threshold but not 40 + AUTO_MARGIN_DB
    open_at, output, _ = _policy({"encoder": 9e-3, "denoiser": 9e-3, "decoder": 9e-3})
    _, chosen, _ = choose_mixed(None, open_at, "bf16", threshold_db=40.0, output=output)
    assert set(chosen.values()) == {"fp32"}
    _, chosen, parity = choose_mixed(None, open_at, "bf16", threshold_db=40.0 - AUTO_MARGIN_DB, output=output)
    assert list(chosen.values()).count("bf16") == 1 and parity == pytest.approx(20 * np.log10(1 / 9e-3))
