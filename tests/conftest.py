"""Shared test helpers: run the CLI in-process and capture what a user would see."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SEED_REFERENCE = REPO.parent / "shared" / "seed" / "flag-reference.zh.md"


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `tunepipe ARGS` in this process: (exit status, stdout, stderr)."""
    from tunepipe.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["tunepipe", *map(str, args)]
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec next to a copy-free reference to the bundled examples; returns its path."""

    def write(text: str, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text.replace("$EXAMPLES", str(EXAMPLES)), encoding="utf-8")
        return path

    return write
