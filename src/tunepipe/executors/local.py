"""Run a step as a subprocess on this machine.

Workers start ahead of their step (a standby): when a run begins, the runner tells the executor which
steps it will submit, in order (`expect`), and the executor starts `python -m tunepipe.runtime.worker
--standby KIND` for the next `STANDBY_AHEAD` of them. Each imports its stage's libraries (torch,
transformers, peft: seconds) while the steps before it run, then waits on its stdin. `submit` hands
the step to its standby — one line, STEP.json and the log path — or, when there is none or it died,
starts a fresh worker as before. Either way the step runs in its own process, started for it alone:
a standby only imported modules early. Standbys left when the run ends are stopped (`close`), and
one whose runner dies sees EOF on its stdin and exits. TUNEPIPE_STANDBY=0 turns them off.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .base import Executor, Launch, worker_argv

# How long a cancelled step gets to clean up after SIGTERM before SIGKILL.
CANCEL_GRACE_S = 10.0
# Workers importing ahead of their step: the next two cover a light step followed by a heavy one.
STANDBY_AHEAD = 2


@dataclass
class LocalHandle:
    launch: Launch
    process: subprocess.Popen

    def __str__(self) -> str:  # the handle as a run record stores it: the process id
        return str(self.process.pid)


@dataclass
class Standby:
    process: subprocess.Popen
    command: list[str]  # the worker command it stands in for, up to STEP.json


class LocalExecutor(Executor):
    kind = "local"
    standby_ahead = STANDBY_AHEAD

    def __init__(self) -> None:
        self.upcoming: list = []  # steps expected, not yet given a standby
        self.standbys: dict[str, Standby] = {}  # step id → its waiting worker

    def prepare(self, step, step_json: Path, log_path: Path) -> Launch:
        return Launch(step.id, worker_argv(step_json, step.executor.get("python")), log_path)

    def expect(self, steps: list) -> None:
        # TUNEPIPE_STANDBY=0: no worker ahead, a fresh process per step (bench/cold_job.py compares both)
        self.upcoming = list(steps) if os.environ.get("TUNEPIPE_STANDBY", "1") != "0" else []
        self._start_standbys()

    def submit(self, launch: Launch) -> LocalHandle:
        launch.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.upcoming = [step for step in self.upcoming if step.id != launch.step_id]
        standby = self.standbys.pop(launch.step_id, None)
        self._start_standbys()  # before the step starts: nothing may come between its start and the runner's record of it
        handle = self._hand_over(standby, launch) if standby else None
        return handle or LocalHandle(launch, self._start(launch))

    def poll(self, handle: LocalHandle) -> int | None:
        return handle.process.poll()

    def cancel(self, handle: LocalHandle) -> None:
        _stop(handle.process)

    def close(self) -> None:
        self.upcoming = []
        for standby in self.standbys.values():
            _stop(standby.process)
        self.standbys.clear()

    # -- internals ---------------------------------------------------------------------------------
    def _start(self, launch: Launch) -> subprocess.Popen:
        with open(launch.log_path, "wb") as log:
            # Its own session: a terminal's Ctrl-C reaches the runner only, which cancels the step
            # (and everything the step started) as one process group.
            return subprocess.Popen(
                launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=launch.cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **launch.env},
                start_new_session=True,
            )

    def _start_standbys(self) -> None:
        while self.upcoming and len(self.standbys) < self.standby_ahead:
            step = self.upcoming.pop(0)
            command = worker_argv(Path("STEP.json"), step.executor.get("python"))[:-1]
            without = ("--without", ",".join(step.without)) if step.without else ()
            process = subprocess.Popen(
                [*command, "--standby", step.kind, *without],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
            self.standbys[step.id] = Standby(process, command)

    def _hand_over(self, standby: Standby, launch: Launch) -> LocalHandle | None:
        """The launch given to its standby; None (standby stopped) when the standby cannot run it as
        a fresh worker would: it died, or the launch is not the plain worker command it waits to be."""
        plain = launch.argv[:-1] == standby.command and not launch.env and launch.cwd is None
        if not plain or standby.process.poll() is not None:
            _stop(standby.process)
            return None
        launch.log_path.write_bytes(b"")
        try:
            standby.process.stdin.write(f"{launch.argv[-1]}\t{launch.log_path}\n".encode())
            standby.process.stdin.close()
        except BrokenPipeError:
            _stop(standby.process)
            return None
        return LocalHandle(launch, standby.process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after the grace period; returns once it is gone."""
    if process.poll() is not None:
        return
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(CANCEL_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


EXECUTOR = LocalExecutor
