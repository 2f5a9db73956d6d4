"""`tunepipe status`, `logs` and `cancel`: the steps of a spec as jobs, for local and SLURM steps alike.

A step that is not cached may have a run record (`runs/<key>/run.json`, written by the runner when
it submits: the executor kind and the handle — a pid, a SLURM job id). These commands read it, so a
job queued by `tunepipe run --detach` (or by a client that died) is followed without resubmitting.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .compiler.plan import Plan, Step
from .compiler.status import CACHED, annotate
from .errors import UserError
from .executors.base import get_executor
from .runner import read_run_record, select_steps
from .store import STEP_LOG, LocalStore

FOLLOW_POLL_S = 1.0


def _job(store: LocalStore, step: Step) -> tuple[Any, Any] | None:
    """(executor, handle) of the step's run record, or None."""
    run_dir = store.scratch.run_dir(step.key)
    record = read_run_record(run_dir)
    if record is None:
        return None
    executor = get_executor(record["executor"])
    if hasattr(executor, "attach"):
        launch = executor.prepare(step, run_dir / "STEP.json", run_dir / STEP_LOG)
        return executor, executor.attach(record["handle"], launch)
    return executor, record["handle"]


def _pid_state(pid: str) -> str:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return "ended"
    except PermissionError:
        pass
    return "RUNNING"


def job_state(store: LocalStore, step: Step) -> str | None:
    """The state of the step's last submitted job: PENDING, RUNNING, COMPLETED, FAILED, … or None."""
    job = _job(store, step)
    if job is None:
        return None
    executor, handle = job
    if hasattr(executor, "state"):
        state = executor.state(handle)
        return f"{state.state}" + (f" ({state.reason})" if getattr(state, "reason", None) else "")
    return _pid_state(str(handle)) + f" (pid {handle})"


def status_rows(plan: Plan, store: LocalStore) -> list[dict[str, str]]:
    rows = []
    statuses = annotate(plan, store)
    for step in plan.steps:
        status = statuses[step.id]
        row = {"id": step.id, "key": step.key[:12], "state": status.state, "detail": status.reason}
        if status.state != CACHED:
            job = job_state(store, step)
            if job is not None:
                row["state"], row["detail"] = "job", job
        rows.append(row)
    return rows


def log_path(store: LocalStore, step: Step) -> Path:
    """A cached step's log is in its artifact; a running or failed one's in its run directory."""
    if store.has(step.key) and (store.fetch(step.key) / STEP_LOG).is_file():
        return store.fetch(step.key) / STEP_LOG
    return store.scratch.run_dir(step.key) / STEP_LOG


def follow_log(plan: Plan, store: LocalStore, step_id: str, follow: bool, write) -> None:
    step = plan.step(select_steps(plan, step_id)[0])
    path = log_path(store, step)
    if not path.is_file():
        raise UserError(f"{step.id} has no log yet: it has not been run (tunepipe run {plan.spec_path.name})")
    offset = 0
    while True:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
        offset += len(data)
        if data:
            write(data.decode("utf-8", errors="replace"))
        if not follow:
            return
        state = job_state(store, step)
        if (
            store.has(step.key)
            or state is None
            or not state.startswith(("RUNNING", "PENDING", "CONFIGURING", "COMPLETING"))
        ):
            return
        time.sleep(FOLLOW_POLL_S)


def cancel_steps(plan: Plan, store: LocalStore, names: list[str] | None) -> list[str]:
    """Cancel the live jobs of the named steps (default: every step); returns the ids cancelled."""
    import signal

    cancelled = []
    for step_id in select_steps(plan, names) if names else [s.id for s in plan.steps]:
        step = plan.step(step_id)
        job = _job(store, step)
        if job is None or store.has(step.key):
            continue
        executor, handle = job
        if hasattr(executor, "state"):
            if executor.state(handle).finished:
                continue
            executor.cancel(handle)
        elif _pid_state(str(handle)) == "RUNNING":
            os.killpg(int(handle), signal.SIGTERM)  # the worker unwinds: nothing half-built is kept
        else:
            continue
        cancelled.append(step.id)
    return cancelled
