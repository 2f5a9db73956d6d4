"""How a step is launched: the executor interface (after TorchX's scheduler API).

A step always runs as `python -m tunepipe.runtime.worker STEP.json`; an executor decides where and
how that command runs. The runner drives every executor the same way:

    launch = executor.prepare(step, step_json, log_path)  # no side effects; str(launch) is the dry run
    handle = executor.submit(launch)                       # start it
    executor.poll(handle)        -> None while running, else the exit status (0 = success)
    executor.logs(handle, since) -> (text written to the log after byte `since`, new offset)
    executor.cancel(handle)      # stop it and wait until it is gone (Ctrl-C, --keep-going off)

and, around a run, `executor.expect(steps)` (what it will be asked to submit, in order) and
`executor.close()` at its end.

The step's stdout and stderr go to `launch.log_path` (the default `logs` reads that file); the worker
copies it into the artifact. An executor module `tunepipe.executors.<kind>` defines `EXECUTOR`, a
subclass of `Executor`; `get_executor(kind)` imports it on first use, so the CLI only pays for the
executors a plan uses. Executor options are the step's `executor` mapping (`step.executor`).
"""

from __future__ import annotations

import importlib
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class Launch:
    step_id: str
    argv: list[str]  # the command line
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    cwd: Path | None = None
    script: str | None = None  # a batch script, for executors that submit one (sbatch)

    def __str__(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        command = f"{env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)
        return f"{command}\n{self.script}" if self.script else command


class Executor:
    kind = "base"
    # A batch system that runs a job once the jobs it names succeed (`submit(launch, dependencies=)`):
    # the runner queues the whole stale DAG at once instead of waiting for each step.
    queues = False

    def prepare(self, step: Any, step_json: Path, log_path: Path) -> Launch:
        raise NotImplementedError

    def expect(self, steps: list[Any]) -> None:
        """The steps this run will submit to this executor, in order (the local one starts their
        workers ahead). Optional: a run may submit fewer of them."""

    def close(self) -> None:
        """The run is over: release whatever `expect` started."""

    def submit(self, launch: Launch) -> Any:
        raise NotImplementedError

    def poll(self, handle: Any) -> int | None:
        raise NotImplementedError

    def cancel(self, handle: Any) -> None:
        raise NotImplementedError

    def logs(self, handle: Any, since: int = 0) -> tuple[str, int]:
        try:
            with open(handle.launch.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return "", since
        return data.decode("utf-8", errors="replace"), since + len(data)


def worker_argv(step_json: Path, python: str | None = None) -> list[str]:
    """The command every executor eventually runs for a step."""
    return [python or sys.executable, "-m", "tunepipe.runtime.worker", str(step_json)]


# The executor modules of this version; `base` and `preflight` live beside them but are not executors.
EXECUTORS = ("local", "torchrun", "slurm")


def executor_problem(kind: str) -> str | None:
    """Why `kind` is not an executor of this version, or None when it is one."""
    if kind in EXECUTORS:
        return None
    return f"unknown executor {kind!r} (known: {', '.join(EXECUTORS)})"


def get_executor(kind: str) -> Executor:
    problem = executor_problem(kind)
    if problem is not None:
        raise UserError(problem)
    module = importlib.import_module(f"tunepipe.executors.{kind}")
    return module.EXECUTOR()
