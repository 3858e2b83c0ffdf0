"""The package's shape: import names, layering, entry points, cheap start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(("." * node.level) + node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "formats").rglob("*.py")), ids=lambda p: p.name)
def test_formats_never_imports_converter(path):
    bad = {m for m in _imports(path) if "converter" in m}
    assert not bad, f"{path.name} imports the upper layer: {bad}"


def test_bare_names_are_not_installed():
    """converter/ and formats/ install under nnconv.*, never as top-level packages."""
    code = "import importlib.util as u; print(u.find_spec('converter'), u.find_spec('formats'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.split() == ["None", "None"]


@pytest.mark.parametrize("args", [["--help"], ["formats"]])
def test_cli_starts_without_torch(args):
    code = (
        "import sys\n"
        "from nnconv.converter.cli import main\n"
        f"sys.argv = ['nnconv', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "heavy = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("ok\n")


def test_python_dash_m_runs_the_cli():
    run = subprocess.run(
        [sys.executable, "-m", "nnconv.converter", "formats"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "safetensors" in run.stdout


@pytest.mark.parametrize(
    "path", sorted(p for d in ("formats", "converter") for p in (ROOT / d).rglob("*.py"))
)
def test_modules_stay_small(path):
    assert len(path.read_text("utf-8").splitlines()) <= 420, f"{path.name}: split it"
