"""Command-line mistakes: a usage message and exit status 2, never a traceback."""

from __future__ import annotations

import pytest
from conftest import EXAMPLES

QUICKSTART = str(EXAMPLES / "quickstart.yaml")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run"], "Missing argument 'spec'"),
        (["bogus"], "No such command 'bogus'"),
        (["plan", QUICKSTART, "-f", "xml"], "Invalid value for '--format'"),
        (["run", QUICKSTART, "-j", "0"], "Invalid value for '--jobs'"),
        (["cache", "gc"], "Missing argument 'spec'"),
        (["run", QUICKSTART, "--until", "x[/b]"], "no step named 'x[/b]'"),
        (["flags", "--section", "trian"], "unknown section 'trian'"),
    ],
)
def test_usage_errors_exit_2_without_traceback(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
