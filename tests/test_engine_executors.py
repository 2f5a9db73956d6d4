"""The executor registry: the executors that exist, and a clear answer for every other name."""

from __future__ import annotations

import pytest

from tunepipe.errors import UserError
from tunepipe.executors.base import EXECUTORS, Executor, get_executor


def test_the_known_executors_are_the_modules_that_exist():
    assert EXECUTORS == ("local", "torchrun", "slurm")
    for kind in EXECUTORS:
        assert isinstance(get_executor(kind), Executor)


@pytest.mark.parametrize("kind", ["base", "preflight", "kubernetes", ""])
def test_other_names_are_user_errors_naming_the_known_ones(kind):
    with pytest.raises(UserError, match=r"unknown executor .* \(known: local, torchrun, slurm\)"):
        get_executor(kind)
