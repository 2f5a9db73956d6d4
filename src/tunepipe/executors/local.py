"""Run a step as a subprocess on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .base import Executor, Launch, worker_argv

# How long a cancelled step gets to clean up after SIGTERM before SIGKILL.
CANCEL_GRACE_S = 10.0


@dataclass
class LocalHandle:
    launch: Launch
    process: subprocess.Popen

    def __str__(self) -> str:  # the handle as a run record stores it: the process id
        return str(self.process.pid)


class LocalExecutor(Executor):
    kind = "local"

    def prepare(self, step, step_json: Path, log_path: Path) -> Launch:
        return Launch(step.id, worker_argv(step_json, step.executor.get("python")), log_path)

    def submit(self, launch: Launch) -> LocalHandle:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(launch.log_path, "wb") as log:
            # Its own session: a terminal's Ctrl-C reaches the runner only, which cancels the step
            # (and everything the step started) as one process group.
            process = subprocess.Popen(
                launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=launch.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **launch.env},
                start_new_session=True,
            )
        return LocalHandle(launch, process)

    def poll(self, handle: LocalHandle) -> int | None:
        return handle.process.poll()

    def cancel(self, handle: LocalHandle) -> None:
        if handle.process.poll() is not None:
            return
        _signal_group(handle.process.pid, signal.SIGTERM)
        try:
            handle.process.wait(CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(handle.process.pid, signal.SIGKILL)
            handle.process.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


EXECUTOR = LocalExecutor
