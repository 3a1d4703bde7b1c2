"""The engine path never imports torch or diffusers, and --help stays light (DESIGN.md, rules of the house)."""

from __future__ import annotations

import pytest
from fresh_python import run_python

ENGINE_MODULES = [
    "medsr.bundle",
    "medsr.engine.pipeline",
    "medsr.engine.sessions",
    "medsr.engine.schedulers",
    "medsr.degrade",
    "medsr.io.nifti",
    "medsr.infer",
    "medsr.eval.parity",
    "medsr.cli.infer",
]


@pytest.mark.parametrize("module", ENGINE_MODULES + ["medsr.engine.trt", "medsr.engine.openvino", "medsr.engine.tiling"])
def test_engine_module_imports_with_torch_blocked(module):
    """No torch, and no PyTorch-side medsr module either: the engine never imports medsr.export."""
    code = (
        f"import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; import {module}; "
        "leaked = [m for m in sys.modules if m.startswith('medsr.export')]; assert not leaked, leaked"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr


def test_infer_help_loads_no_heavy_module():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from medsr.cli.infer import infer\n"
        "result = CliRunner().invoke(infer, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'onnxruntime', 'nibabel', 'onnx') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""
