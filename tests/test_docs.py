"""The user documents agree with the project: the README's test command is what CI runs, the extras table is
pyproject.toml's, scripts/test parses, every ``docs/<file>.md, "<section>"`` citation names a real section, and
nothing cites notes that do not ship with the project."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
SOURCES_SECTIONS = [
    "The method",
    "MedVAE and SD-VAE checkpoints",
    "Medical image I/O",
    "Data that ships offline",
    "Packages and exporters",
    "Deployment engines",
    "Degradations and fair baselines",
    "Through-plane super-resolution",
    "GPU engines",
    "Serving and scale-out",
]
#: `docs/<name>.md, "<title>"` (also `[docs/<name>.md](...)`, "<title>"), across line breaks and comment markers.
CITATION = re.compile(r'docs/(\w+)\.md(?:\]\([^)]*\))?,\s*(?:section\s*)?"([^"]+)"')
#: Developers' notes outside the repository, and bare tracker numbers: a user can follow neither.
UNSHIPPED = re.compile(
    "|".join([r"\b(?:REFERENCE|DESIGN|STYLE)" + r"\.md", r"(?:\.\.|/work)" + r"/shared\b", r"\b[Ii]ssue" + r" #?\d+"])
)


def _project_texts() -> list[Path]:
    """The package, tests, docs and build files (no virtual environments)."""
    files = [*ROOT.glob("medsr/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("*.md"), *ROOT.glob("scripts/*")]
    files += [ROOT / name for name in ("pyproject.toml", "Dockerfile", ".ci/run") if (ROOT / name).is_file()]
    files += [path for folder in ("docs", "benchmarks", "studies") for path in (ROOT / folder).rglob("*.md")]
    return files


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def _headings(name: str) -> list[str]:
    text = (ROOT / "docs" / f"{name}.md").read_text()
    return [line.lstrip("#").strip() for line in text.splitlines() if re.match(r"#{1,6} ", line)]


def _bash_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def test_readme_test_command_is_what_ci_runs():
    commands = [lines[0] for lines in _bash_blocks(_readme()) if len(lines) == 1 and "scripts/test" in lines[0]]
    assert commands == ["bash scripts/test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == commands[0]


def test_readme_keeps_the_quick_start_command():
    assert ["pip install . && medsr-infer examples/colin27_lr_x4.nii.gz -o out.nii.gz"] in _bash_blocks(_readme())


def test_shell_scripts_parse():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    for script in (ROOT / "scripts" / "test", ROOT / ".ci" / "run"):
        result = subprocess.run([bash, "-n", str(script)], check=False, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_scripts_test_installs_extras_that_exist():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installs = re.findall(r'pip install -e "\.\[([^\]]+)\]"', (ROOT / "scripts" / "test").read_text())
    assert installs, "scripts/test installs no extras"
    for extras in installs:
        assert set(extras.split(",")) <= set(pyproject["project"]["optional-dependencies"])


def test_extras_table_is_pyproject():
    """Each row of the README's extras table lists exactly the packages of that extra (the core row: the
    dependencies)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {"(none)": pyproject["dependencies"], **pyproject["optional-dependencies"]}
    rows = re.findall(r"^\| (\(none\)|`[\w-]+`) \| .*\(([^()]*)\)[^|]*\|$", _readme(), flags=re.MULTILINE)
    table = {name.strip("`"): {p.strip() for p in packages.split(",")} for name, packages in rows}
    names = {key: {re.split(r"[<>=!~\[ ]", dep)[0] for dep in deps} for key, deps in wanted.items()}
    core = re.search(r"^\| \(none\) \| the engine: (.*) \|$", _readme(), flags=re.MULTILINE)
    table["(none)"] = {p.strip() for p in core.group(1).split(",")}
    assert table == names


def test_sources_has_its_sections_in_order():
    assert _headings("sources")[1:] == SOURCES_SECTIONS


def test_citations_of_the_docs_name_real_sections():
    missing = []
    for path in _project_texts():
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text(errors="replace"))
        for name, title in CITATION.findall(text):
            doc = ROOT / "docs" / f"{name}.md"
            if not doc.is_file() or title not in _headings(name):
                missing.append(f"{path.relative_to(ROOT)}: docs/{name}.md, {title!r}")
    assert missing == []


def test_nothing_cites_unshipped_notes():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _project_texts()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if UNSHIPPED.search(line)
    ]
    assert found == []
