"""``--engine auto``: the one choice of medsr.engine.select, its order and reasons, its errors, and where the CLIs
record it (the summary line and each output's provenance)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from fresh_python import run_python
from io_fixtures import smooth_image, write_nifti

from medsr.bench.engines import EngineSpec
from medsr.cli.infer import infer
from medsr.engine.select import (
    AUTO_ORDER,
    NAMED,
    OPENVINO_FP32_BEATS_ORT,
    EngineChoice,
    choose_engine,
    probe_openvino,
    probe_ort,
    probe_trt,
    resolve_engine,
)
from medsr.errors import BackendError

# Blocks openvino (as if not installed) before anything is imported, then prints choose_engine('cpu').
CHOICE_WITHOUT_OPENVINO = (
    "import sys; sys.modules['openvino'] = None\n"
    "from medsr.engine.select import choose_engine\n"
    "print(tuple(choose_engine('cpu')))\n"
)


def _gpu_engine_present() -> bool:
    import onnxruntime

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return True


def _expected_cpu_choice() -> tuple[str, str, str]:
    """(engine, precision, a phrase of the reason) that the rules give on this machine, read independently."""
    try:
        import openvino
    except ImportError:
        return "ort", "fp32", "openvino not used: openvino is not installed"
    from medsr.engine.openvino import has_bf16_units

    if has_bf16_units(openvino.Core()):
        return "openvino", "auto", "on a CPU with bf16 units: bf16 per graph where the parity gate passes"
    if OPENVINO_FP32_BEATS_ORT:
        return "openvino", "fp32", "measured faster than ONNX Runtime fp32"
    return "ort", "fp32", "openvino not used: this CPU has no bf16 units (AVX-512 BF16 or AMX), and OpenVINO fp32"


def test_the_choice_on_this_machine():
    engine, precision, phrase = _expected_cpu_choice()
    choice = choose_engine("cpu")
    assert (choice.engine, choice.precision) == (engine, precision)
    assert phrase in choice.reason
    assert resolve_engine("auto", "cpu") == choice


def test_without_openvino_auto_runs_onnx_runtime():
    run = run_python(CHOICE_WITHOUT_OPENVINO)
    assert run.returncode == 0, run.stderr
    engine, precision, reason = eval(run.stdout.strip())  # a tuple of three str
    assert (engine, precision) == ("ort", "fp32")
    assert reason.startswith("ONNX Runtime ") and "CPUExecutionProvider" in reason
    assert "openvino not used: openvino is not installed" in reason


def _probe(precision, why):
    return lambda device, wanted: (precision if wanted in ("auto", precision) else None, why)


def test_order_reasons_and_fallback_with_stand_in_probes():
    bf16 = {"openvino": _probe("auto", "bf16 units"), "ort": _probe("fp32", "ORT CPU")}
    assert choose_engine("cpu", probes=bf16) == EngineChoice("openvino", "auto", "bf16 units")
    absent = {"openvino": _probe(None, "openvino is not installed"), "ort": _probe("fp32", "ORT CPU")}
    assert choose_engine("cpu", probes=absent) == EngineChoice(
        "ort", "fp32", "ORT CPU; openvino not used: openvino is not installed"
    )
    gpu = {"trt": _probe("auto", "TensorRT"), "ort": _probe("fp32", "ORT CUDA")}
    assert choose_engine("cuda", probes=gpu).engine == "trt"
    no_trt = {"trt": _probe(None, "TensorRT >= 10 is not installed"), "ort": _probe("fp32", "ORT CUDA")}
    choice = choose_engine("cuda", probes=no_trt)
    assert choice == EngineChoice("ort", "fp32", "ORT CUDA; trt not used: TensorRT >= 10 is not installed")
    assert AUTO_ORDER == {"cuda": ("trt", "ort"), "cpu": ("openvino", "ort")}  # torch is never chosen


def test_each_probe_refuses_another_device_or_precision():
    assert probe_openvino("cuda", "auto") == (None, "runs on the CPU only")
    assert probe_trt("cpu", "auto") == (None, "runs on a GPU only")
    assert probe_ort("cpu", "bf16") == (None, "runs fp32 only, not bf16")
    assert probe_openvino("cpu", "fp16") == (None, "runs fp32, bf16 only, not fp16")
    assert probe_ort("cpu", "auto")[0] == "fp32"  # ONNX Runtime's best is its only precision


def test_a_precision_no_engine_runs_is_one_line_naming_each_engine():
    with pytest.raises(BackendError) as info:
        choose_engine("cpu", "fp16")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--engine auto --device cpu --precision fp16: no engine can run")
    assert "openvino: runs fp32, bf16 only, not fp16" in message and "ort: runs fp32 only, not fp16" in message
    assert choose_engine("cpu", "fp32").precision == "fp32"


def test_a_named_engine_is_taken_as_named():
    assert resolve_engine("openvino", "cpu") == EngineChoice("openvino", "fp32", NAMED)
    assert resolve_engine("trt", "cuda", "fp16") == EngineChoice("trt", "fp16", NAMED)
    with pytest.raises(BackendError, match="unknown engine"):
        resolve_engine("onnx", "cpu")


@pytest.mark.skipif(_gpu_engine_present(), reason="a GPU engine is installed here")
def test_cuda_without_a_gpu_engine_is_one_line(tiny_bundle, example4d_path, tmp_path):
    out = tmp_path / "x.nii.gz"
    args = [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--device", "cuda"]
    run = run_python("from medsr.cli.infer import main; main()", *args, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("Error: --engine auto --device cuda: no engine can run (trt: ")
    assert "ort: this onnxruntime has no CUDAExecutionProvider" in lines[0]
    assert not out.exists()


def test_a_named_engine_that_is_missing_stays_an_error(tiny_bundle, example4d_path, tmp_path):
    """--engine openvino without openvino fails (no fallback to ONNX Runtime), as does ort on a missing GPU."""
    out = tmp_path / "x.nii.gz"
    args = [str(example4d_path), "-o", str(out), "--model", str(tiny_bundle), "--frame", "0", "--engine", "openvino"]
    code = "import sys; sys.modules['openvino'] = None\nfrom medsr.cli.infer import main; main()"
    run = run_python(code, *args, timeout=120)
    assert run.returncode == 1 and "needs OpenVINO, which is not installed" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    if not _gpu_engine_present():
        result = CliRunner().invoke(infer, [*args[:-1], "ort", "--device", "cuda"])
        assert result.exit_code == 1 and "onnxruntime-gpu" in result.output and not out.exists()


@pytest.fixture(scope="module")
def auto_run(tiny_bundle, tmp_path_factory):
    """medsr-infer with no --engine on a small volume: the summary line and the output's provenance."""
    folder = tmp_path_factory.mktemp("auto")
    source = write_nifti(folder / "in.nii.gz", smooth_image((16, 16, 2)), np.diag([1.0, 1.0, 3.0, 1.0]))
    out = folder / "out.nii.gz"
    result = CliRunner().invoke(infer, [str(source), "-o", str(out), "--model", str(tiny_bundle), "--steps", "1"])
    assert result.exit_code == 0, result.output
    provenance = json.loads(nib.load(out).header.extensions[-1].get_content())["medsr"]
    return result.output, provenance


def test_the_summary_line_and_provenance_say_which_engine_and_why(auto_run):
    log, provenance = auto_run
    engine, precision, reason = choose_engine("cpu")
    assert provenance["engine"].startswith(f"{engine} {precision} [")
    assert provenance["engine_reason"] == reason
    summary = [line for line in log.splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1 and summary[0].endswith(f"({reason})")
    assert f"; engine {engine} {precision} [" in summary[0]


def test_a_named_engine_records_that_it_was_named(tiny_bundle, tmp_path):
    source = write_nifti(tmp_path / "in.nii.gz", smooth_image((16, 16, 2)), np.diag([1.0, 1.0, 3.0, 1.0]))
    out = tmp_path / "out.nii.gz"
    args = [str(source), "-o", str(out), "--model", str(tiny_bundle), "--steps", "1", "--engine", "ort"]
    result = CliRunner().invoke(infer, args)
    assert result.exit_code == 0, result.output
    provenance = json.loads(nib.load(out).header.extensions[-1].get_content())["medsr"]
    assert provenance["engine"].startswith("ort fp32 [CPUExecutionProvider")
    assert provenance["engine_reason"] == NAMED and result.output.strip().endswith(f"({NAMED})")


def test_infer_help_imports_no_runtime():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from medsr.cli.infer import infer\n"
        "result = CliRunner().invoke(infer, ['--help'])\n"
        "assert result.exit_code == 0 and '[default: auto]' in result.output, result.output\n"
        "print(','.join(m for m in ('openvino', 'onnxruntime', 'tensorrt', 'torch') if m in sys.modules))\n"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_the_benchmark_runs_auto_as_the_engine_it_resolves_to():
    spec = EngineSpec.parse("auto")
    assert (spec.name, spec.precision, spec.label) == ("auto", "auto", "auto")
    concrete, reason = spec.resolve("cpu")
    assert (concrete.name, concrete.precision, reason) == tuple(choose_engine("cpu"))
    assert EngineSpec.parse("ort").resolve("cpu") == (EngineSpec("ort"), "")


def test_eval_parity_and_fidelity_default_to_auto_and_record_why(tiny_bundle, example4d_path, tmp_path):
    pytest.importorskip("torch")
    from medsr.cli.eval import cli

    engine, precision, reason = choose_engine("cpu")
    report = tmp_path / "parity.json"
    args = ["parity", "--model", str(tiny_bundle), "--slices", "1", "--size", "16", "--steps", "1", "-o", str(report)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"engine {engine} {precision} [" in result.output and f"({reason}) vs torch fp32" in result.output
    assert json.loads(report.read_text())["engine_reason"] == reason
    out = tmp_path / "fidelity"
    args = ["fidelity", "--model", str(tiny_bundle), "--data", str(example4d_path), "--max-slices", "1", "--steps", "1",
            "--baselines", "none", "--panels", "0", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].endswith(f"({reason})")
    summaries = [json.loads(path.read_text()) for path in out.glob("*.json")]
    assert any(f'"engine_reason": {json.dumps(reason)}' in json.dumps(item) for item in summaries), summaries
