"""The import rules of docs/internals.md are import-linter contracts (pyproject.toml): they hold on the
tree, and they fail on a planted violation (so the check in CI can fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install import-linter)")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_tree_keeps_every_contract():
    done = lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


@pytest.mark.parametrize("module, planted, contract", [
    ("compiler/plan.py", "from ..executors import preflight", "the compiler imports neither executors nor stage code"),
    ("runtime/stages/train.py", "from tunepipe.executors import base", "stage code imports neither executors"),
    ("spec/loader.py", "from ..compiler import plan", "spec imports nothing of the rest"),
    ("runner.py", "from .runtime.stages import train", "only the worker imports stage modules"),
])  # fmt: skip
def test_a_planted_violation_breaks_its_contract(tmp_path, module, planted, contract):
    root = copy_tree(tmp_path)
    path = root / "src" / "tunepipe" / module
    path.write_text(path.read_text() + f"\n{planted}  # planted\n")
    done = lint(root)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if "BROKEN" in line]
    assert any(line.startswith(contract) for line in broken), done.stdout
