"""Run a step as a SLURM batch job: an sbatch script, submitted with `sbatch --parsable`.

`prepare` renders the script (`str(launch)` prints it: what `run --dry-run` shows). Every `#SBATCH`
value is literal — SLURM expands nothing in directives (a `$VAR` there would reach sbatch as those
characters), so a value holding `$` or a backquote is a user error. The body:

    setup lines (module load, venv activation), as given
    the step: `python -m tunepipe.runtime.worker STEP.json`, or, for a train step with
        nnodes > 1 or nproc_per_node > 1, one `srun` task per node running torchrun, whose node
        count, node rank and rendezvous endpoint (first host of $SLURM_JOB_NODELIST, on
        master_port, else a port derived from the job id) come from the job's environment at run time
    its exit status, written to `<log stem>.exit` as "JOBID STATUS" when the step ends (no accounting
        is assumed: once a job has left squeue, that record is the only trace of how it ended)

The step runs in the background so that the script's traps work while it runs. With `signal`
(e.g. `USR1@120`: `--signal=B:USR1@120`, SLURM signals the batch shell 120 s before the time
limit) the trap sends the step SIGTERM (`kill` to the worker; `scancel --signal=TERM` to the srun
step, whose processes are torchrun and its workers: srun itself would take SIGTERM as "kill the
step") — the signal the worker unwinds on and torchrun forwards, and the one SLURM sends on
preemption anyway — waits for it, and with `requeue` runs `scontrol requeue $SLURM_JOB_ID`: the job
starts again from the top (appending to its log) and the train stage resumes from the checkpoints
it keeps in the store's work dir. A SIGTERM reaching the shell (scancel, the time limit,
preemption: SLURM signals every process of the job, the step included) is only waited through, so
that the exit status is still written.

The handle is a `SlurmJob`: a str, the job id (what a run record stores), carrying its `Launch`.
States come from one `squeue` call for every job this executor follows, at most every
`query_interval_s`: PENDING, RUNNING, PREEMPTED, NODE_FAIL, TIMEOUT, FAILED, CANCELLED ... are
SLURM's own names; a job that has left the queue ends as its exit record says (COMPLETED or
FAILED), else as squeue last showed it, else LOST. PREEMPTED and NODE_FAIL are final only once the
job has left the queue, since SLURM requeues such jobs.
"""

from __future__ import annotations

import difflib
import re
import shlex
import shutil
import signal as signals
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .base import Executor, Launch, worker_argv
from .torchrun import WORKER_MODULE, torchrun_command

# name -> (catalog type, what it does). `kind`, `python`, `nproc_per_node`, `nnodes` and
# `master_port` are shared with the local and torchrun executors.
OPTIONS: dict[str, tuple[str, str]] = {
    "kind": ("enum", "the executor: slurm"),
    "python": ("path", "Python interpreter on the compute nodes (default: the one running tunepipe)"),
    "nnodes": ("int", "nodes of a train step (#SBATCH --nodes); other steps run on one node"),
    "nproc_per_node": ("int", "train processes per node (torchrun --nproc-per-node), usually one per GPU"),
    "master_port": ("int", "rendezvous port on the first node (default: 20000 + job id % 20000)"),
    "max_restarts": ("int", "torchrun --max-restarts of a distributed train step"),
    "partition": ("str", "#SBATCH --partition"),
    "account": ("str", "#SBATCH --account"),
    "qos": ("str", "#SBATCH --qos"),
    "time": ("str", "time limit, #SBATCH --time (e.g. 04:00:00 or 1-00:00:00)"),
    "gpus_per_node": ("int", "#SBATCH --gpus-per-node (0: none)"),
    "gres": ("str", "#SBATCH --gres (e.g. gpu:a100:8), instead of gpus_per_node"),
    "cpus_per_task": ("int", "#SBATCH --cpus-per-task (passed to srun too)"),
    "mem": ("str", "memory per node, #SBATCH --mem (e.g. 64G)"),
    "constraint": ("str", "#SBATCH --constraint (node features)"),
    "exclusive": ("bool", "#SBATCH --exclusive: whole nodes"),
    "sbatch_args": ("list", "extra #SBATCH lines, each an sbatch option (e.g. --mail-type=END)"),
    "setup": ("list", "shell lines run before the step (module load ..., source venv/bin/activate)"),
    "signal": ("str", "signal SLURM sends the batch shell before the time limit, SIG[@SECONDS] (e.g. USR1@120)"),
    "requeue": ("bool", "#SBATCH --requeue, and on `signal` stop the step and requeue the job"),
}
_TYPES = {"enum": str, "path": str, "str": (str, int), "int": int, "bool": bool, "list": (list, str)}

# How a job ended; any other state (PENDING, RUNNING, COMPLETING, REQUEUED, SUSPENDED, ...) may go on.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# SLURM requeues a --requeue job in these: final only once it has left the queue.
REQUEUED_BY_SLURM = {"PREEMPTED", "NODE_FAIL"}
LOST = "LOST"  # left the queue without an exit record and never seen ending
NO_EXIT_STATUS = 1  # what poll() reports for a job that ended without an exit status (cancelled while pending, ...)

QUERY_INTERVAL_S = 2.0  # at most one squeue call this often, for all jobs together
CANCEL_WAIT_S = 120.0
QUERY_FAILURE_GRACE_S = 300.0  # squeue failing this long (controller down) is an error, not "still running"


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's job state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) or LOST
    reason: str = ""  # squeue's reason: why it is pending, or why it ended
    exit_code: int | None = None  # the step's exit status, once it ended and one is known
    in_queue: bool = True

    @property
    def finished(self) -> bool:
        return (
            self.state in FINAL_STATES or self.state == LOST or (self.state in REQUEUED_BY_SLURM and not self.in_queue)
        )


class SlurmJob(str):
    """A submitted step: its SLURM job id, with the launch it runs (for its log and exit record)."""

    launch: Launch

    def __new__(cls, job_id: str, launch: Launch) -> SlurmJob:
        job = super().__new__(cls, job_id)
        job.launch = launch
        return job


class SlurmExecutor(Executor):
    kind = "slurm"
    queues = True
    query_interval_s = QUERY_INTERVAL_S

    def __init__(self) -> None:
        self._states: dict[str, JobState] = {}
        self._jobs: dict[str, SlurmJob] = {}
        self._queried_at = float("-inf")
        self._failing_since: float | None = None

    def prepare(self, step, step_json: Path, log_path: Path) -> Launch:
        script = sbatch_script(step.id, step.kind, step.key, step.executor, step_json, log_path)
        return Launch(step.id, sbatch_argv(script_path(log_path)), log_path, script=script)

    def submit(self, launch: Launch, dependencies: Iterable[str] = ()) -> SlurmJob:
        """Queue the job, after every job in `dependencies` has succeeded (afterok)."""
        path = script_path(launch.log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(launch.script)
        for stale in (launch.log_path, exit_path(launch.log_path)):  # the script appends to its log
            stale.unlink(missing_ok=True)
        # An upstream job known to have completed is no dependency (once purged, sbatch would refuse its id).
        done = {job for job, state in self._states.items() if state.state == "COMPLETED"}
        argv = sbatch_argv(path, [str(d) for d in dependencies if str(d) not in done])
        result = _slurm(argv)
        if result.returncode != 0:
            raise UserError(f"{launch.step_id}: sbatch refused the job", result.stderr.strip().splitlines())
        return self.attach(result.stdout.strip().split(";")[0], launch)

    def attach(self, job_id: str, launch: Launch) -> SlurmJob:
        """Follow a job submitted earlier (its id from a run record; `launch` re-prepared for its step)."""
        job = SlurmJob(str(job_id), launch)
        self._jobs[job] = job
        return job

    def poll(self, handle: SlurmJob) -> int | None:
        state = self.states([handle])[handle]
        if not state.finished:
            return None
        return NO_EXIT_STATUS if state.exit_code is None else state.exit_code

    def state(self, handle: SlurmJob) -> JobState:
        return self.states([handle])[handle]

    def states(self, handles: Iterable[SlurmJob], fresh: bool = False) -> dict[str, JobState]:
        """The state of each job; one squeue call for all followed jobs, at most every query_interval_s."""
        handles = [self.attach(h, h.launch) if h not in self._jobs else h for h in handles]
        stale = time.monotonic() - self._queried_at >= self.query_interval_s
        if fresh or stale or any(h not in self._states for h in handles):
            self._query()
        return {h: self._states[h] for h in handles}

    def cancel(self, handle: SlurmJob) -> None:
        """scancel, then wait until SLURM shows the job ended (or gone)."""
        result = _slurm(["scancel", str(handle)])
        if result.returncode != 0 and not self.states([handle], fresh=True)[handle].finished:
            raise RuntimeError(f"scancel {handle}: {result.stderr.strip()}")
        deadline = time.monotonic() + CANCEL_WAIT_S
        while not self.states([handle], fresh=True)[handle].finished:
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {handle} still in the queue {CANCEL_WAIT_S:.0f}s after scancel")
            time.sleep(0.5)

    def _query(self) -> None:
        following = [job for job in self._jobs.values() if not self._states.get(job, JobState("")).finished]
        if not following:
            return
        rows = self._squeue(following)
        self._queried_at = time.monotonic()
        if rows is None:  # squeue failed: keep the last known states
            for job in following:
                self._states.setdefault(job, JobState("UNKNOWN", "squeue failed"))
            return
        for job in following:
            record = read_exit_record(exit_path(job.launch.log_path), job)
            self._states[job] = job_state(rows.get(job), record, self._states.get(job))

    def _squeue(self, jobs: list[SlurmJob]) -> dict[str, tuple[str, str, int | None]] | None:
        result = _slurm(squeue_argv(jobs))
        if result.returncode == 0 or "Invalid job id" in result.stderr:  # every one has left the queue
            self._failing_since = None
            return parse_squeue(result.stdout) if result.returncode == 0 else {}
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._failing_since > QUERY_FAILURE_GRACE_S:
            raise RuntimeError(f"squeue has failed for {QUERY_FAILURE_GRACE_S:.0f}s: {result.stderr.strip()}")
        return None


# -- pure functions: the script, the commands, the parsing ---------------------------------------
def sbatch_script(step_id: str, kind: str, key: str, options: dict, step_json: Path, log_path: Path) -> str:
    check_options(options)
    distributed = kind == "train" and (_count(options, "nnodes") > 1 or _count(options, "nproc_per_node") > 1)
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {d}" for d in directives(step_id, key, options, log_path, distributed)]
    lines += [f"# tunepipe step {step_id} (key {key}), written by tunepipe's slurm executor"]
    exit_file = shlex.quote(str(exit_path(log_path)))
    lines += [
        f"exit_file={exit_file}",
        'rm -f "$exit_file"',
        'echo "tunepipe: job $SLURM_JOB_ID on $(hostname), run $((${SLURM_RESTART_COUNT:-0} + 1))"',
    ]
    lines += _as_list(options.get("setup"))
    lines += ["export PYTHONUNBUFFERED=1"]
    if distributed:
        port = str(int(options["master_port"])) if options.get("master_port") else "$((20000 + SLURM_JOB_ID % 20000))"
        lines += [f'export TUNEPIPE_RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1):{port}"']
        command = srun_torchrun_command(options, key, step_json)
    else:
        command = shlex.join(worker_argv(step_json, options.get("python")))
    lines += _trap_lines(options, distributed)
    lines += [f"{command} &", "step_pid=$!", *_WAIT_LINES]
    if options.get("signal") and options.get("requeue"):
        lines += [
            'if [ "$warned" = 1 ] && [ "$status" != 0 ]; then',
            '  echo "tunepipe: step stopped (exit status $status); requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
            '  echo "tunepipe: scontrol requeue failed"',
            "fi",
        ]
    lines += ['echo "$SLURM_JOB_ID $status" > "$exit_file"', 'exit "$status"', ""]
    return "\n".join(lines)


_WAIT_LINES = [
    "# A trapped signal interrupts `wait`: wait again until the step itself has exited.",
    "while true; do",
    '  wait "$step_pid"; status=$?',
    '  kill -0 "$step_pid" 2>/dev/null || break',
    "done",
]


def _trap_lines(options: dict, distributed: bool) -> list[str]:
    lines = ["step_pid=", "warned=0", "trap 'echo \"tunepipe: got SIGTERM; waiting for the step to stop\"' TERM"]
    if not options.get("signal"):
        return lines
    # srun takes SIGTERM as "kill the step"; `scancel --signal` reaches the step's own processes
    # (torchrun and its workers), not the batch shell.
    stop = 'scancel --signal=TERM "$SLURM_JOB_ID"' if distributed else '[ -n "$step_pid" ] && kill -TERM "$step_pid"'
    action = "requeue" if options.get("requeue") else "stop"
    name = signal_name(options["signal"])
    return lines + [
        "on_warning() {",
        f'  echo "tunepipe: got SIG{name} before the time limit; stopping the step to {action} the job"',
        "  warned=1",
        f"  {stop}",
        "}",
        f"trap on_warning {name}",
    ]


def directives(step_id: str, key: str, options: dict, log_path: Path, distributed: bool) -> list[str]:
    """The #SBATCH options, each literal (validated: nothing for SLURM to expand)."""
    out = [
        f"--job-name=tunepipe-{step_id}-{key[:8]}",
        f"--output={_literal('the log path', str(log_path)).replace('%', '%%')}",  # sbatch expands %j etc. in --output
        "--open-mode=append",
    ]  # a requeued job appends to its log
    if distributed:
        out += [f"--nodes={_count(options, 'nnodes')}", "--ntasks-per-node=1"]
    else:
        out += ["--nodes=1", "--ntasks=1"]
    for name in ("partition", "account", "qos", "time", "cpus_per_task", "mem", "constraint", "gres"):
        if options.get(name) not in (None, ""):
            out.append(f"--{name.replace('_', '-')}={_literal(f'executor.{name}', str(options[name]))}")
    if options.get("gpus_per_node"):
        out.append(f"--gpus-per-node={int(options['gpus_per_node'])}")
    if options.get("exclusive"):
        out.append("--exclusive")
    if options.get("signal"):
        out.append(f"--signal=B:{signal_name(options['signal'])}{_signal_time(options['signal'])}")
    if options.get("requeue"):
        out.append("--requeue")
    for extra in _as_list(options.get("sbatch_args")):
        extra = _literal("executor.sbatch_args", extra.strip().removeprefix("#SBATCH").strip(), quote=False)
        if not extra.startswith("-"):
            raise UserError(f"executor.sbatch_args: {extra!r} is not an sbatch option (e.g. --mail-type=END)")
        out.append(extra)
    return out


def srun_torchrun_command(options: dict, key: str, step_json: Path) -> str:
    """One srun task per node, each running torchrun with the job's node count, node rank and endpoint.

    The inner command is single-quoted: the variables are expanded by each task's shell, on its node."""
    torchrun = shlex.join(torchrun_command(options.get("python")))
    inner = (
        f'exec {torchrun} --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID"'
        f" --nproc-per-node {_count(options, 'nproc_per_node')}"
        f' --rdzv-backend c10d --rdzv-endpoint "$TUNEPIPE_RDZV_ENDPOINT" --rdzv-id {key[:16]}'
        f" --max-restarts {int(options.get('max_restarts') or 0)}"
        f" -m {WORKER_MODULE} {shlex.quote(str(step_json))}"
    )
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if options.get("cpus_per_task"):  # since 22.05 srun no longer inherits it from the batch job
        srun.append(f"--cpus-per-task={int(options['cpus_per_task'])}")
    return f"{shlex.join(srun)} bash -c {shlex.quote(inner)}"


def sbatch_argv(script: Path, dependencies: list[str] | None = None) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if dependencies:
        # A failed upstream job cancels its dependents instead of leaving them pending forever.
        argv += [f"--dependency=afterok:{':'.join(dependencies)}", "--kill-on-invalid-dep=yes"]
    return [*argv, str(script)]


def squeue_argv(job_ids: Iterable[str]) -> list[str]:
    return [
        "squeue",
        "--noheader",
        "--states=all",
        f"--jobs={','.join(job_ids)}",
        "--Format=JobID:|,State:|,exit_code:|,Reason:|",
    ]


def parse_squeue(text: str) -> dict[str, tuple[str, str, int | None]]:
    """squeue rows → {job id: (state, reason, exit status or None)}."""
    rows = {}
    for line in text.splitlines():
        if line.count("|") < 4:
            continue
        job_id, state, raw_exit, reason = line.split("|", 3)
        raw = raw_exit.strip()
        rows[job_id.strip()] = (
            state.strip(),
            reason.rstrip("|").strip(),
            wait_status(int(raw)) if raw.isdigit() else None,
        )
    return rows


def wait_status(raw: int) -> int:
    """A wait(2) status (squeue's exit_code) as a shell exit status: the code, or 128 + the signal."""
    return 128 + (raw & 0x7F) if raw & 0x7F else raw >> 8


def job_state(row: tuple[str, str, int | None] | None, record: int | None, last: JobState | None) -> JobState:
    """A job's state from its squeue row (None: it has left the queue), its exit record and what was last seen."""
    if row is not None:
        state, reason, exit_code = row
        if state not in FINAL_STATES | REQUEUED_BY_SLURM:
            return JobState(state, reason)
        exit_code = record if record is not None else exit_code
        # A job SLURM ended before or around the script (cancelled while pending) has no status of its own.
        return JobState(state, reason, None if state != "COMPLETED" and not exit_code else exit_code)
    ended = last is not None and last.state in FINAL_STATES | REQUEUED_BY_SLURM
    if record is not None:
        state = "COMPLETED" if record == 0 else (last.state if ended else "FAILED")
        return JobState(state, last.reason if ended else "", record, in_queue=False)
    if ended:
        return JobState(last.state, last.reason, last.exit_code, in_queue=False)
    return JobState(LOST, "left the queue without an exit record", None, in_queue=False)


def read_exit_record(path: Path, job_id: str) -> int | None:
    """The exit status the script wrote for `job_id`, if it wrote one."""
    try:
        written_by, status = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return int(status) if written_by == str(job_id) else None


def script_path(log_path: Path) -> Path:
    return log_path.with_suffix(".sbatch")


def exit_path(log_path: Path) -> Path:
    return log_path.with_suffix(".exit")


def check_options(options: dict) -> None:
    """Every option is one this executor knows, of its type; a user error naming the fix otherwise."""
    for name, value in options.items():
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; slurm options: {', '.join(sorted(OPTIONS))}"
            raise UserError(f"executor.{name} is not an option of the slurm executor{hint}")
        kind = OPTIONS[name][0]
        if value is not None and (not isinstance(value, _TYPES[kind]) or (isinstance(value, bool) and kind != "bool")):
            raise UserError(f"executor.{name} must be a {kind} ({OPTIONS[name][1]}), got {value!r}")
    for name in ("nnodes", "nproc_per_node"):
        if options.get(name) is not None and int(options[name]) < 1:
            raise UserError(f"executor.{name} must be at least 1 (got {options[name]})")
    if options.get("gres") and options.get("gpus_per_node"):
        raise UserError("executor: give gpus_per_node or gres, not both")
    if options.get("signal"):
        signal_name(options["signal"])


def signal_name(value: str) -> str:
    """`USR1@120`, `SIGUSR1`, `B:USR1@120` → `USR1` (a user error for anything else)."""
    match = re.fullmatch(r"(?:B:)?(?:SIG)?([A-Z0-9]+)(@\d+)?", str(value).strip().upper())
    name = match.group(1) if match else ""
    if name.isdigit():
        name = (
            signals.Signals(int(name)).name.removeprefix("SIG")
            if int(name) in signals.Signals._value2member_map_
            else ""
        )
    if not name or f"SIG{name}" not in signals.Signals.__members__ or name in ("KILL", "STOP"):
        raise UserError(
            f"executor.signal: {value!r} is not SIGNAL[@SECONDS] (e.g. USR1@120: SIGUSR1 120 s before the time limit)"
        )
    return name


def _signal_time(value: str) -> str:
    match = re.search(r"@\d+$", str(value).strip())
    return match.group(0) if match else ""


def _literal(what: str, value: str, quote: bool = True) -> str:
    """`value` for an #SBATCH line: SLURM expands nothing there, so a `$VAR` would stay those characters."""
    if any(c in value for c in "$`\n\"'") or not value.strip():
        raise UserError(
            f"{what}: {value!r} must be a literal value: SLURM expands nothing in #SBATCH lines "
            "(no $VARIABLES, quotes or backquotes; compute values in the spec instead)"
        )
    return f'"{value}"' if quote and any(c.isspace() for c in value) else value


def _count(options: dict, name: str) -> int:
    return int(options.get(name) or 1)


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _slurm(argv: list[str]) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]} not found: the slurm executor needs SLURM's client commands on PATH")
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


EXECUTOR = SlurmExecutor
