"""The layering of the package, enforced (docs/design.md, "Import rules").

Every medsr module is read for its imports, module-level and lazy (inside functions) alike, and each medsr
subpackage may import only the layers below it:

    errors, models  <-  degrade  <-  bundle  <-  io  <-  engine  <-  serve, data  <-  eval  <-  export  <-  bench  <-  cli

The runtime layers (engine, serve, io, degrade, bundle) and the NumPy-only data and eval layers never import torch
or its companions. Then, at run time: every module imports as the first medsr module of an interpreter (no import
cycle that depends on the entry point); every runtime module imports with torch blocked and brings no PyTorch-side
or upper-layer medsr module along; and ``medsr-infer --help`` loads no heavy module at all.
"""

from __future__ import annotations

import ast
import json
from functools import cache
from pathlib import Path

import pytest
from fresh_python import run_python

PACKAGE = Path(__file__).resolve().parents[1] / "medsr"

#: The medsr layers each layer may import (besides itself). A layer absent here may import nothing of medsr.
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "errors": set(),
    "models": set(),
    "degrade": {"errors"},
    "bundle": {"errors", "degrade"},
    "io": {"errors", "degrade", "bundle"},
    "engine": {"errors", "degrade", "bundle", "io", "models"},
    "serve": {"errors", "degrade", "bundle", "io", "models", "engine"},
    "data": {"errors", "degrade", "bundle", "io", "models", "engine"},
    "eval": {"errors", "degrade", "bundle", "io", "models", "engine", "data"},
    "export": {"errors", "degrade", "bundle", "io", "models", "engine", "data", "eval"},
    "bench": {"errors", "degrade", "bundle", "io", "models", "engine", "data", "eval", "export"},
    "cli": {"errors", "degrade", "bundle", "io", "models", "engine", "data", "eval", "export", "bench", "serve"},
}
TORCH_FREE_LAYERS = ("errors", "models", "degrade", "bundle", "io", "engine", "serve", "data", "eval")
TORCH_FAMILY = {"torch", "torchvision", "diffusers", "safetensors", "onnxscript", "onnxslim", "transformers"}
RUNTIME_LAYERS = ("degrade", "bundle", "io", "engine", "serve")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``medsr.engine.sessions`` -> ``engine``; ``medsr`` and ``medsr.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


@cache
def imports_of(path: Path) -> tuple[str, ...]:
    """Every module named by an import statement anywhere in the file (relative imports resolved)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return tuple(names)


MODULE_FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_layer_is_known():
    layers = {layer_of(module_name(path)) for path in MODULE_FILES}
    assert layers <= set(ALLOWED_IMPORTS), sorted(layers - set(ALLOWED_IMPORTS))


@pytest.mark.parametrize("path", MODULE_FILES, ids=lambda path: module_name(path))
def test_imports_point_down(path):
    module = module_name(path)
    layer = layer_of(module)
    wrong = sorted(
        name
        for name in imports_of(path)
        if name.split(".")[0] == "medsr" and layer_of(name) != layer and layer_of(name) not in ALLOWED_IMPORTS[layer]
    )
    assert not wrong, f"{module} ({layer}) may import only {sorted(ALLOWED_IMPORTS[layer])}; it imports {wrong}"
    if layer in TORCH_FREE_LAYERS:
        heavy = sorted({name for name in imports_of(path) if name.split(".")[0] in TORCH_FAMILY})
        assert not heavy, f"{module} is torch-free ({layer}) but imports {heavy}"


def test_every_module_imports_first():
    """Each module imports on its own in an interpreter that has loaded no medsr module yet: an import cycle works
    from one entry point and fails from another, so every module is tried as the first. One interpreter preloads the
    third-party libraries, then forks once per module."""
    modules = sorted(module_name(path) for path in MODULE_FILES)
    code = (
        "import importlib, json, os, sys\n"
        "for heavy in ('numpy', 'torch', 'diffusers', 'onnx', 'onnxruntime', 'nibabel', 'click'):\n"
        "    importlib.import_module(heavy)\n"
        "failures = {}\n"
        f"for module in {modules!r}:\n"
        "    read, write = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os.close(read)\n"
        "        try:\n"
        "            importlib.import_module(module)\n"
        "            message = ''\n"
        "        except BaseException as exc:\n"
        "            message = f'{type(exc).__name__}: {exc}'\n"
        "        os.write(write, message.encode()[:4000])\n"
        "        os._exit(0)\n"
        "    os.close(write)\n"
        "    message = os.read(read, 8192).decode()\n"
        "    os.close(read)\n"
        "    os.waitpid(pid, 0)\n"
        "    if message:\n"
        "        failures[module] = message\n"
        "print(json.dumps(failures))\n"
    )
    run = run_python(code, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {}


def test_runtime_modules_import_with_torch_blocked():
    """Importing every runtime module, with torch and its companions unimportable, succeeds and brings in no
    PyTorch-side, evaluation or command-line module."""
    runtime = sorted(module_name(path) for path in MODULE_FILES if layer_of(module_name(path)) in RUNTIME_LAYERS)
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(TORCH_FAMILY)!r}: sys.modules[name] = None\n"
        f"for module in {runtime!r}: importlib.import_module(module)\n"
        "upper = ('medsr.export', 'medsr.eval', 'medsr.cli', 'medsr.bench', 'medsr.data')\n"
        "leaked = sorted(m for m in sys.modules if m.startswith(upper))\n"
        "assert not leaked, leaked\n"
        "print(len(sys.modules))\n"
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
