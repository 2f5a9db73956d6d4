"""Run a plan: skip what is cached, build the rest through executors, deliver results, write the lock.

For each step whose dependencies are done, in plan order and at most `jobs` at a time:

1. cached (its key is in the store, not forced): done, nothing to run;
2. otherwise take the store's lock for the key without blocking; when another run holds it, wait
   (polling, so other steps keep going) and then find the artifact that run built;
3. write STEP.json, `executor.prepare` → `submit`, stream the step's log with a progress line;
4. exit status 0 and the key committed: done; otherwise the step failed: with `keep_going` its
   dependents are skipped, the other branches go on and `run_plan` returns the result with the
   failed outcomes (the caller exits 1); else every running step is cancelled and StepFailed raised.

A done step with `output_dir`/`export_dir` is copied there from the store. tunepipe.lock is written
after a run with no failure (never in a dry run or with `--frozen`). Imports no stage code: a fully
cached run starts no process and never imports torch.
"""

from __future__ import annotations

import difflib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from .compiler.lockfile import keys_in_lock, output_digest, read_lock, write_lock
from .compiler.plan import Plan, Step
from .compiler.render import render_text
from .compiler.status import CACHED, STALE, StepStatus, annotate, frozen_violations
from .errors import FrozenPlanError, StepFailed, UserError
from .executors.base import Executor, get_executor
from .resources import describe_exit
from .stage_table import stage
from .store import LocalStore, open_store
from .store.remote import RemoteCorrupt, RemoteError, RemoteReadOnly, RemoteUnavailable

if TYPE_CHECKING:
    from rich.console import Console  # the caller's (`tunepipe plan` needs none without a remote)

PULLED, REMOTE = "pulled", "remote"  # outcomes of steps the remote cache had
POLL_S = 0.1
LOG_TAIL_LINES = 30
# The worker's own INFO/DEBUG log lines (logging's default time format): kept in the step log, shown with -v.
CHATTER = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|DEBUG) ")


@dataclass
class StepOutcome:
    id: str
    kind: str
    key: str
    status: str  # cached | built | failed | skipped | would-build (dry run)
    wall_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    answer: str | None = None  # an infer step's answer.txt
    command: str | None = None  # what the executor runs (or would run, in a dry run)
    reason: str = ""
    returncode: int | None = None  # a failed step's exit status
    log: str | None = None  # a failed step's log file


@dataclass
class RunResult:
    plan: Plan
    outcomes: list[StepOutcome]
    wall_s: float
    lock_written: bool = False

    def with_status(self, status: str) -> list[StepOutcome]:
        return [o for o in self.outcomes if o.status == status]


@dataclass
class _Running:
    step: Step
    executor: Executor
    handle: Any
    lock: Any  # the store's FileLock for the key, held until the step ends
    task: Any
    started: float
    command: str
    launch_log: Path | None = None
    counter: str = ""
    offset: int = 0
    partial: str = ""


def select_steps(plan: Plan, names: str | list[str] | None) -> list[str]:
    """Step ids named by `names`: an exact id, or a kind (every step of it), e.g. `export`."""
    if names is None:
        return []
    ids = [step.id for step in plan.steps]
    selected: list[str] = []
    for name in [names] if isinstance(names, str) else names:
        matches = [i for i in ids if i == name] or [s.id for s in plan.steps if s.kind == name]
        if not matches:
            close = difflib.get_close_matches(name, ids, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; steps: {', '.join(ids)}"
            raise UserError(f"no step named {name!r}{hint}")
        selected += [m for m in matches if m not in selected]
    return selected


RUN_RECORD = "run.json"


def write_run_record(run_dir: Path, executor: str, handle: Any) -> None:
    """`runs/<key>/run.json`: which executor runs the step and its handle (a pid, a SLURM job id)."""
    record = {"executor": executor, "handle": str(handle), "submitted": time.time()}
    (run_dir / RUN_RECORD).write_text(json.dumps(record, sort_keys=True))


def read_run_record(run_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"executor", "handle"} <= set(record) else None


def step_payload(plan: Plan, step: Step, store: LocalStore, log_path: Path, force: bool) -> dict[str, Any]:
    """The STEP.json a worker receives (docs/internals.md)."""
    return {
        "id": step.id,
        "kind": step.kind,
        "key": step.key,
        "stage_version": step.stage_version,
        "params": step.params,
        "upstream": step.upstream,  # input artifacts by role: the worker fetches them when it starts
        "files": {role: str(path) for role, path in step.files.items()},
        "seed": plan.seed,
        "spec_dir": str(plan.spec_dir),
        "cache_dir": str(store.root),
        "log": str(log_path),
        "force": force,
        "without": list(step.without),  # packages the worker hides (stage_table.unused_imports)
    }


def run_plan(
    plan: Plan,
    *,
    dry_run: bool = False,
    frozen: bool = False,
    force: str | list[str] | None = None,
    until: str | list[str] | None = None,
    only: str | list[str] | None = None,
    keep_going: bool = False,
    jobs: int = 1,
    console: Console | None = None,
    verbose: bool = False,
    detach: bool = False,
    remote: str | None = None,
    push: str = "on-success",
) -> RunResult:
    started = time.monotonic()
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    store = open_store(plan.cache_dir)
    lock = read_lock(plan.lock_path, plan.spec_path.name)
    if frozen:
        violations = frozen_violations(plan, lock)
        if violations:
            details = [f"{step_id}: {reason}" for step_id, reasons in violations.items() for reason in reasons]
            raise FrozenPlanError(
                f"--frozen: {len(violations)} step(s) differ from {plan.lock_path.name}; nothing was run", details
            )
    if only and until:
        raise UserError("use --only or --until, not both")
    if only:
        selected = select_steps(plan, only)
    elif until:
        targets = select_steps(plan, until)
        wanted = set(targets).union(*(plan.ancestors(t) for t in targets))
        selected = [s.id for s in plan.steps if s.id in wanted]
    else:
        selected = [s.id for s in plan.steps]
    forced = set(selected) if force in ("all", ["all"]) else set(select_steps(plan, force))
    # overwrite_cache (a runtime flag: it never changes the bytes) forces the data stages to rebuild.
    forced |= {s.id for s in plan.steps if s.id in selected and s.params.get("overwrite_cache")}
    for step_id in selected:
        for dep in plan.step(step_id).deps:
            if dep not in selected and not store.has(plan.step(dep).key):
                raise UserError(
                    f"{step_id} needs {dep}, which is not built: run without --only, or with --until {step_id}"
                )

    runner = _Runner(
        plan,
        store,
        console,
        jobs=max(1, jobs),
        keep_going=keep_going,
        frozen_lock=lock if frozen else None,
        verbose=verbose,
        detach=detach,
    )
    steps = [plan.step(step_id) for step_id in selected]
    runner.remote = open_remote_cache(remote, console)
    runner.push_policy = "never" if runner.remote is None else push
    runner.plan_pulls(steps, forced)
    to_build = [s for s in steps if (s.id in forced or not store.has(s.key)) and s.id not in runner.from_remote]
    if to_build and not dry_run and not store.writable():
        raise UserError(
            f"the cache {store.location} is read-only, and {len(to_build)} step(s) need building: "
            f"{', '.join(s.id for s in to_build)}",
            ["point TUNEPIPE_CACHE at a writable directory to build them"],
        )
    check_preflight(to_build, plan)
    if dry_run:
        outcomes = runner.dry_run(steps, annotate(plan, store, lock), forced)
        return RunResult(plan, outcomes, time.monotonic() - started)
    outcomes = runner.run(steps, forced)  # raises StepFailed on a failure, unless keep_going
    if any(outcome.status == "queued" for outcome in outcomes):  # --detach: nothing more to do here now
        return RunResult(plan, outcomes, time.monotonic() - started)
    failed = any(outcome.status == "failed" for outcome in outcomes)
    from .modelcard import write_cards

    write_cards(plan, store)  # after verify: a delivered export's card carries its verify report
    if runner.push_policy == "on-success" and not failed:
        runner.push_built()
    lock_written = False if frozen or failed else write_lock(plan, store, runner.remote)
    return RunResult(plan, outcomes, time.monotonic() - started, lock_written)


def open_remote_cache(url: str | None, console: Console):
    """The remote cache at `url` (None without one); an unreachable one is a warning: build locally."""
    if not url:
        return None
    from .store.remote import open_remote

    try:
        return open_remote(url)
    except RemoteUnavailable as exc:
        console.print(Text(f"warning: remote cache unavailable ({exc.reason}); building locally", style="yellow"))
        return None


def remote_url(plan: Plan, override: str | None = None) -> str | None:
    """--remote, else $TUNEPIPE_REMOTE, else the spec's cache.remote (a plain path: relative to the spec)."""
    import os

    url = override or os.environ.get("TUNEPIPE_REMOTE") or plan.remote
    if url and "://" not in url and not Path(url).expanduser().is_absolute():
        url = str((plan.spec_dir / url).resolve())
    return url


def check_preflight(steps: list[Step], plan: Plan) -> None:
    """Host and stack problems of every step about to run, all at once, before any of them starts."""
    if not steps:
        return
    from .executors.preflight import preflight

    problems = []
    for step in steps:
        problems += [
            f"{step.id}: {problem}" for problem in preflight(step.kind, step.params, step.executor, plan.spec_dir)
        ]
    if problems:
        raise UserError(f"preflight: {len(problems)} problem(s) on this host; nothing was run", problems)


def print_summary(result: RunResult, console: Console) -> None:
    """The end of `tunepipe run`: counts and time; per model-producing step its loss and where it is; the answer."""
    counts: dict[str, int] = {}
    for outcome in result.outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in counts.items())
    console.print(
        Text(f"\n{result.plan.name}: {len(result.outcomes)} steps ({parts}) in {result.wall_s:.2f}s", style="bold")
    )
    store = open_store(result.plan.cache_dir)
    for outcome in result.outcomes:
        if stage(outcome.kind).summary not in ("model", "report") or outcome.status not in ("built", CACHED):
            continue
        m = outcome.metrics
        if stage(outcome.kind).summary == "report":
            console.print(Text.assemble(f"  {outcome.id}: ", (_report(m), "bold")))
            continue
        found = [" ".join(str(m[k]) for k in ("finetuning_type", "stage", "format", "type") if m.get(k))]
        found += (
            [f"{m['method']} merge of {m.get('adapters', '?')} adapter(s)"]
            if outcome.kind == "merge" and "method" in m
            else []
        )
        found += [f"{m['method']} {m['bits']}-bit"] if outcome.kind == "quantize" and "bits" in m else []
        found += [f"train loss {_short(m['train_loss'])}"] if "train_loss" in m else []
        found += [f"eval loss {_short(m['eval_loss'])}"] if "eval_loss" in m else []
        found += [f"{m['steps']} steps"] if "steps" in m else []
        path = store.fetch(outcome.key)
        pictures = ", ".join(p.name for p in sorted(path.glob("*.png")))
        console.print(Text.assemble(f"  {outcome.id}: ", (" · ".join(f for f in found if f), "bold")))
        console.print(
            Text(f"    {_relative(path)}/" + (f"  ({pictures})" if pictures else ""), style="dim"), soft_wrap=True
        )
        deliver = result.plan.step(outcome.id).deliver
        if deliver is not None:
            console.print(Text.assemble("    copied to ", (f"{_relative(deliver)}/", "bold")), soft_wrap=True)
    final = [o for o in result.outcomes if o.kind in ("train", "merge", "quantize") and o.status in ("built", CACHED)]
    if final:
        step = result.plan.step(final[-1].id)
        where = store.fetch(step.key)
        model = where / "model" if (where / "model").is_dir() else where
        console.print(Text.assemble("  final model: ", (f"{_relative(model)}", "bold")), soft_wrap=True)
    for outcome in result.with_status("failed"):
        status = outcome.reason or (f"exit status {outcome.returncode}" if outcome.returncode is not None else "failed")
        console.print(Text.assemble(("  ✗ ", "bold red"), (outcome.id, "bold"), f" failed ({status})"))
        if outcome.log:
            console.print(Text(f"    log: {_relative(Path(outcome.log))}", style="dim"), soft_wrap=True)
    queued = result.with_status("queued")
    if queued:
        console.print(Text(f"  queued {len(queued)} job(s): " + ", ".join(f"{o.id} ({o.reason})" for o in queued)))
        console.print(Text(f"  follow them with: tunepipe status {result.plan.spec_path.name}", style="dim"))
    for outcome in result.with_status("skipped"):
        console.print(Text(f"  - {outcome.id} skipped: {outcome.reason}", style="dim"))
    for outcome in result.outcomes:
        if outcome.answer is not None:
            prompt = result.plan.step(outcome.id).params.get("prompt")
            console.print(
                Text.assemble(("\n> ", "dim"), (str(prompt), "bold"), "\n", (outcome.answer.strip(), "bold green"))
            )
    if result.plan.points:
        print_sweep(result, store, console)
    if result.lock_written:
        console.print(Text(f"wrote {_relative(result.plan.lock_path)}", style="dim"))


def sweep_rows(plan: Plan, store: LocalStore) -> list[dict[str, Any]]:
    """One row per sweep point: its values, its last train step's losses and its verify figures,
    best first by the spec's metric_for_best_model (eval_loss, else train_loss, when it is `loss`)."""
    rows = []
    for point, ids in plan.points:
        row: dict[str, Any] = {"point": point.name, "values": point.label}
        for own_id, step_id in ids.items():
            step = plan.step(step_id)
            manifest = store.manifest(step.key) if store.has(step.key) else None
            metrics = (manifest or {}).get("metrics", {})
            if step.kind == "train":
                row.update(
                    train_loss=metrics.get("train_loss"),
                    eval_loss=metrics.get("eval_loss"),
                    train=step_id,
                    metric=step.params.get("metric_for_best_model") or "loss",
                    greater=bool(step.params.get("greater_is_better")),
                )
            elif step.kind == "verify" and metrics:
                row[f"{own_id} agreement"] = metrics.get("greedy_agreement")
        rows.append(row)

    def score(row):
        name = row.get("metric", "loss")
        value = (
            row.get("eval_loss")
            if name in ("loss", "eval_loss") and row.get("eval_loss") is not None
            else (row.get(name) if name not in ("loss", "eval_loss") else row.get("train_loss"))
        )
        if value is None:
            return (1, 0.0)
        return (0, -value if row.get("greater") else value)

    return sorted(rows, key=score)


def print_sweep(result: RunResult, store: LocalStore, console: Console) -> None:
    from rich.table import Table

    rows = sweep_rows(result.plan, store)
    extra = sorted({k for row in rows for k in row if k.endswith(" agreement")})
    table = Table(title=f"sweep: {len(rows)} points, best first")
    for column in ("point", "values", "train loss", "eval loss", *extra):
        table.add_column(column)
    for row in rows:
        cells = [
            row["point"],
            row["values"],
            _short(row.get("train_loss") or "—"),
            _short(row.get("eval_loss") or "—"),
            *(_short(row.get(k) if row.get(k) is not None else "—") for k in extra),
        ]
        table.add_row(*map(Text, cells))  # as text: a value's [brackets] are no markup (and rich skips parsing)
    console.print(table)
    picture = sweep_plot(result.plan, store, rows)
    if picture is not None:
        console.print(Text(f"  loss curves: {_relative(picture)}", style="dim"))


def sweep_plot(plan: Plan, store: LocalStore, rows: list[dict[str, Any]]) -> Path | None:
    """`<spec>.sweep.png` beside the spec: every point's training loss curve, overlaid. Drawn in a
    subprocess (matplotlib imports numpy, which a cached run never does here), only when it is missing
    or older than the newest train artifact."""
    import subprocess
    import sys

    curves = {}
    for row in rows:
        step = plan.step(row["train"]) if row.get("train") else None
        if step is not None and store.has(step.key) and (store.fetch(step.key) / "trainer_state.json").is_file():
            curves[f"{row['point']}: {row['values']}"] = str(store.fetch(step.key) / "trainer_state.json")
    if not curves:
        return None
    picture = plan.spec_dir / f"{plan.spec_path.stem}.sweep.png"
    newest = max(Path(p).stat().st_mtime for p in curves.values())
    if not picture.is_file() or picture.stat().st_mtime < newest:
        subprocess.run(
            [sys.executable, "-m", "tunepipe.runtime.plots", "sweep", str(picture), json.dumps(curves)],
            check=True,
            capture_output=True,
        )
    return picture


def _report(m: dict[str, Any]) -> str:
    """A verify step's figures against its thresholds, in one line."""
    parts = ["passed" if m.get("passed") else "FAILED"]
    if "max_rel_logit_error" in m:
        limit = m.get("threshold_max_rel_logit_error")
        parts.append(
            f"max rel logit error {m['max_rel_logit_error']:.2g}" + (f" (≤ {limit:.2g})" if limit is not None else "")
        )
    if "greedy_agreement" in m:
        limit = m.get("threshold_min_greedy_agreement")
        parts.append(
            f"greedy agreement {m['greedy_agreement']:.3f}" + (f" (≥ {limit:.2f})" if limit is not None else "")
        )
    if "chat_template_tokens_match" in m:
        parts.append("chat template tokens " + ("match" if m["chat_template_tokens_match"] else "DIFFER"))
    return " · ".join(parts)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Runner:
    def __init__(
        self,
        plan: Plan,
        store: LocalStore,
        console: Console,
        *,
        jobs: int,
        keep_going: bool,
        frozen_lock: dict | None,
        verbose: bool = False,
        detach: bool = False,
    ):
        self.plan, self.store, self.console = plan, store, console
        self.remote, self.push_policy, self.repair = None, "never", set()
        self.from_remote, self.left_remote, self.built = set(), set(), []
        self.verbose, self.detach = verbose, detach
        self.jobs, self.keep_going = jobs, keep_going
        self.frozen_lock = frozen_lock
        self.executors: dict[str, Executor] = {}
        self.outcomes: dict[str, StepOutcome] = {}

    def executor(self, step: Step) -> Executor:
        kind = step.executor.get("kind") or "local"
        if kind not in self.executors:
            self.executors[kind] = get_executor(kind)
        return self.executors[kind]

    def prepare(self, step: Step):
        run_dir = self.store.scratch.run_dir(step.key)
        return self.executor(step).prepare(step, run_dir / "STEP.json", run_dir / "step.log")

    # -- dry run -------------------------------------------------------------------------------
    def dry_run(self, steps: list[Step], statuses, forced: set[str]) -> list[StepOutcome]:
        outcomes, commands = [], {}
        for step_id in forced:  # a forced step is rebuilt: the header counts it as stale
            statuses[step_id] = StepStatus(statuses[step_id].step, STALE, ["forced"])
        for step in steps:
            if step.id in forced or statuses[step.id].state != CACHED:
                commands[step.id] = str(self.prepare(step))
                outcomes.append(
                    StepOutcome(
                        step.id,
                        step.kind,
                        step.key,
                        "would-build",
                        command=commands[step.id],
                        reason="forced" if step.id in forced else statuses[step.id].reason,
                    )
                )
            else:
                outcomes.append(StepOutcome(step.id, step.kind, step.key, CACHED))
        self.console.print(Text(render_text(self.plan, statuses, commands)), soft_wrap=True)
        return outcomes

    # -- the real thing ------------------------------------------------------------------------
    def run(self, steps: list[Step], forced: set[str]) -> list[StepOutcome]:
        self.selected = {step.id for step in steps}
        self.forced = forced
        self.running: dict[str, _Running] = {}
        self.waiting: set[str] = set()  # steps whose key another run is building
        self.failures: list[StepFailed] = []
        self.progress = None  # created when the first step starts: a fully cached run needs none
        self.started_count = 0
        stale = [step for step in steps if step.id in forced or not self.store.has(step.key)]
        self.to_build = len(stale)
        # Each executor hears what it will run, in order (the local one starts workers ahead); a step
        # the remote cache holds is pulled, not run.
        expected: dict[Executor, list[Step]] = {}
        for step in stale:
            if step.id not in self.from_remote:
                expected.setdefault(self.executor(step), []).append(step)
        for executor, its_steps in expected.items():
            executor.expect(its_steps)
        pending = list(steps)
        try:
            while pending or self.running:
                for step in list(pending):
                    if self.local_slots() <= 0 and not self.executor(step).queues:
                        continue  # --jobs bounds the processes of this machine; a batch system queues the rest
                    if self.advance(step):
                        pending.remove(step)
                if self.detach and not pending:
                    return self.detached(steps)
                for job in list(self.running.values()):
                    self.follow(job)
                if self.running or self.waiting:
                    time.sleep(POLL_S)
        except BaseException:  # a failure without --keep-going, Ctrl-C, or a bug: stop everything we started
            for job in self.running.values():
                job.executor.cancel(job.handle)
                job.lock.release()
                self.finish(job.step, "cancelled", command=job.command)
            raise
        finally:
            for executor in self.executors.values():
                executor.close()
            if self.progress is not None:
                self.progress.stop()
        if self.failures and not self.keep_going:
            raise self.failures[0]
        # With keep_going the failures are outcomes: the caller prints the summary and decides the exit status.
        return [self.outcomes[step.id] for step in steps]

    def local_slots(self) -> int:
        return self.jobs - sum(1 for job in self.running.values() if not job.executor.queues)

    def detached(self, steps: list[Step]) -> list[StepOutcome]:
        """--detach: every stale step is queued; leave them to the batch system (status re-attaches)."""
        for job in self.running.values():
            self.finish(job.step, "queued", command=job.command, reason=f"job {job.handle}")
            job.lock.release()
        self.running = {}
        return [self.outcomes[step.id] for step in steps]

    def queued_behind(self, step: Step, deps: dict[str, str | None]) -> list[str] | None:
        """The jobs `step` can be queued behind now (a batch system runs it once they succeed), or None
        when it must wait: its executor queues, and every unfinished dependency is a job of it."""
        waiting = [d for d, state in deps.items() if state != "done"]
        if not waiting or not self.executor(step).queues:
            return None if waiting else []
        jobs = [self.running.get(d) for d in waiting]
        if any(job is None or job.executor is not self.executor(step) for job in jobs):
            return None
        return [job.handle for job in jobs]

    def advance(self, step: Step) -> bool:
        """Skip, reuse or start `step` if its dependencies allow; returns whether it left the queue."""
        deps = {d: self.status(d) for d in step.deps if d in self.selected}
        broken = [d for d, state in deps.items() if state in ("failed", "skipped")]
        if broken:
            self.finish(step, "skipped", reason=f"{broken[0]} did not build")
            return True
        behind = self.queued_behind(step, deps)
        if behind is None:
            return False
        if step.id not in self.forced and self.store.has(step.key):
            self.done(step, CACHED)
            return True
        key_lock = self.store.scratch.lock(step.key)
        try:
            key_lock.acquire(blocking=False)
        except TimeoutError:  # filelock.Timeout
            if step.id not in self.waiting:
                self.waiting.add(step.id)
                self.console.print(Text(f"{step.id}: another run is building {step.key[:12]}; waiting for it"))
            return False
        self.waiting.discard(step.id)
        if step.id not in self.forced and self.store.has(step.key):  # the run we waited for built it
            key_lock.release()
            self.done(step, CACHED)
            return True
        if step.id in self.from_remote:
            if self.pull(step):
                key_lock.release()
                self.done(step, PULLED)
                return True
            if step.id in self.outcomes:  # left on the remote
                key_lock.release()
                return True
        self.running[step.id] = self.start(step, key_lock, behind)
        return True

    # -- the remote cache ----------------------------------------------------------------------
    def plan_pulls(self, steps: list[Step], forced: set[str]) -> None:
        """Which missing steps come from the remote: `from_remote` (pulled, or left there) and
        `left_remote` (nothing here needs their bytes: a later step is on the remote too)."""
        self.from_remote: set[str] = set()
        self.left_remote: set[str] = set()
        self.built: list[Step] = []
        if self.remote is None:
            return
        try:
            there = {s.id for s in steps if s.id not in forced and not self.store.has(s.key) and self.remote.has(s.key)}
        except RemoteUnavailable as exc:
            self.warn(f"remote cache {self.remote.location} unavailable ({exc.reason}); building locally")
            self.remote = None
            return
        selected = {s.id for s in steps}
        needed: set[str] = set()  # steps whose bytes must be here: built here, delivered, or read by such a step
        for step in reversed(steps):
            dependents = [s for s in steps if step.id in s.deps]
            if (
                step.id not in there
                or not dependents
                or step.deliver is not None
                or stage(step.kind).summary == "answer"
                or any(d.id in needed and d.id not in there for d in dependents)
            ):
                needed.add(step.id)
        self.from_remote = there
        self.left_remote = {i for i in there if i not in needed and i in selected}

    def pull(self, step: Step) -> bool:
        """Download `step` from the remote (every file checked while it streams); False to build it here."""
        if step.id in self.left_remote:
            self.finish(step, REMOTE, metrics=(self.remote.manifest(step.key) or {}).get("metrics", {}))
            self.console.print(
                Text.assemble(("• ", "green"), f"{step.id} ", ("on the remote (not needed here)", "dim"))
            )
            return False  # finished: advance() must not mark it done again
        try:
            moved = self.remote.pull(step.key, self.store)
        except RemoteCorrupt as exc:
            self.warn(f"{step.id}: the remote's copy is damaged ({exc}); building it here")
            self.repair.add(step.key)
            self.pull_inputs(step)
            return False
        except RemoteUnavailable as exc:
            self.warn(f"remote cache unavailable ({exc.reason}); building locally")
            self.remote, self.from_remote = None, set()
            return False
        except FileNotFoundError:
            return False
        self.console.print(Text.assemble(("↓ ", "green"), f"{step.id} ", (f"pulled {moved / 1e6:.2f} MB", "dim")))
        return True

    def pull_inputs(self, step: Step) -> None:
        """A step to build after all: the inputs left on the remote must be here now."""
        for dep in step.deps:
            if self.status(dep) == "done" and self.outcomes[dep].status == REMOTE:
                dep_step = self.plan.step(dep)
                try:
                    moved = self.remote.pull(dep_step.key, self.store)
                except RemoteError as exc:  # the step's worker then reports the missing input
                    self.warn(f"{dep}: cannot pull it from the remote ({exc})")
                    continue
                self.outcomes[dep].status = PULLED
                self.console.print(Text.assemble(("↓ ", "green"), f"{dep} ", (f"pulled {moved / 1e6:.2f} MB", "dim")))

    def push_built(self) -> None:
        for step in self.built:
            self.push(step)

    def push(self, step: Step) -> None:
        if self.remote is None or not self.store.has(step.key):
            return
        try:
            moved = self.remote.push(
                step.key, self.store.fetch(step.key), self.store.manifest(step.key), replace=step.key in self.repair
            )
        except RemoteReadOnly:
            self.warn(f"the remote {self.remote.location} is read-only: nothing is pushed (cache pull works)")
            self.push_policy, self.built = "never", []
            return
        except RemoteUnavailable as exc:
            self.warn(f"remote cache unavailable ({exc.reason}); not pushing")
            self.remote, self.push_policy, self.built = None, "never", []
            return
        except RemoteError as exc:
            self.warn(f"{step.id}: not pushed: {exc}")
            return
        if moved:
            self.console.print(Text.assemble(("↑ ", "green"), f"{step.id} ", (f"pushed {moved / 1e6:.2f} MB", "dim")))

    def warn(self, message: str) -> None:
        self.console.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)

    def follow(self, job: _Running) -> None:
        """Stream a running step's log; when it has ended, record it as built or failed."""
        self.stream(job)
        returncode = job.executor.poll(job.handle)
        if returncode is None:
            return
        self.stream(job, final=True)
        del self.running[job.step.id]
        job.lock.release()
        self.progress.remove_task(job.task)
        wall_s = time.monotonic() - job.started
        if returncode == 0 and self.store.has(job.step.key):
            self.done(job.step, "built", wall_s=wall_s, command=job.command)
            self.built.append(job.step)
            if self.push_policy == "always":
                self.push(job.step)
            return
        why = describe_exit(returncode, self.store.root)
        failure = StepFailed(job.step.id, returncode, self.log_tail(job) + (f"\n{why}" if why else ""))
        self.finish(
            job.step,
            "failed",
            wall_s=wall_s,
            command=job.command,
            reason=f"exit status {returncode}" + (f": {why}" if why else ""),
            returncode=returncode,
            log=str(job.launch_log) if job.launch_log else None,
        )
        self.console.print(
            Text(
                f"✗ {job.step.id} failed with exit status {returncode}" + (f": {why}" if why else ""), style="bold red"
            )
        )
        self.failures.append(failure)
        if not self.keep_going:
            raise failure

    def status(self, step_id: str) -> str | None:
        outcome = self.outcomes.get(step_id)
        if outcome is None:
            return None
        return "done" if outcome.status in (CACHED, "built", PULLED, REMOTE) else outcome.status

    def start(self, step: Step, key_lock, behind: list[str] | None = None) -> _Running:
        """Submit `step` (behind the jobs it waits for, on a queueing executor) — or re-attach to the
        job a run record names, when an earlier client queued it and it is still alive."""
        executor = self.executor(step)
        try:
            launch = self.prepare(step)
            run_dir = self.store.scratch.run_dir(step.key)
            handle = self.reattach(step, executor, launch) if step.id not in self.forced else None
            if handle is None:
                run_dir.mkdir(parents=True, exist_ok=True)
                payload = step_payload(self.plan, step, self.store, launch.log_path, step.id in self.forced)
                (run_dir / "STEP.json").write_text(json.dumps(payload, indent=2, sort_keys=True))
                handle = executor.submit(launch, dependencies=behind) if behind else executor.submit(launch)
                try:
                    write_run_record(run_dir, executor.kind, handle)
                except OSError as e:  # the disk filled since (the step's own writes?): the job runs all the same
                    self.console.print(
                        Text(
                            f"{step.id}: could not record job {handle} ({e.strerror}): a later run cannot re-attach to it"
                        )
                    )
            else:
                self.console.print(Text(f"{step.id}: re-attached to job {handle} (queued by an earlier run)"))
        except BaseException:
            key_lock.release()
            raise
        if self.progress is None:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
        self.started_count += 1
        counter = f"[{self.started_count}/{self.to_build}]"
        task = self.progress.add_task(f"{counter} {step.id} [dim]{step.key[:12]}[/dim]", total=None)
        return _Running(
            step, self.executor(step), handle, key_lock, task, time.monotonic(), str(launch), launch.log_path, counter
        )

    def reattach(self, step: Step, executor: Executor, launch) -> Any:
        """The live job of this step's run record, if its executor can re-attach (batch systems)."""
        record = read_run_record(self.store.scratch.run_dir(step.key))
        if record is None or record["executor"] != executor.kind or not hasattr(executor, "attach"):
            return None
        handle = executor.attach(record["handle"], launch)
        return handle if executor.poll(handle) is None else None

    def stream(self, job: _Running, final: bool = False) -> None:
        text, job.offset = job.executor.logs(job.handle, job.offset)
        lines = (job.partial + text).split("\n")
        job.partial = "" if final else lines.pop()
        for line in lines:
            if (line or not final) and (self.verbose or not CHATTER.match(line)):
                self.console.print(
                    Text.assemble((f"{job.step.id} │ ", "dim"), line.rsplit("\r", 1)[-1]), soft_wrap=True
                )
        # A progress bar redraws one line with \r (tqdm: loss, tokens/s): show its latest state live.
        live = job.partial.rsplit("\r", 1)[-1].strip()
        if live and self.progress is not None:
            self.progress.update(
                job.task, description=Text.assemble(f"{job.counter} {job.step.id} ", (live[-100:], "cyan"))
            )

    def log_tail(self, job: _Running) -> str:
        text, _ = job.executor.logs(job.handle, 0)
        return "\n".join(text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:])

    def done(self, step: Step, status: str, wall_s: float | None = None, command: str | None = None) -> None:
        manifest = self.store.manifest(step.key) or {}
        answer = None
        if stage(step.kind).summary == "answer":
            answer_file = self.store.fetch(step.key) / "answer.txt"
            answer = answer_file.read_text() if answer_file.is_file() else None
        if step.deliver is not None:
            self.store.materialise(step.key, step.deliver)
        if self.frozen_lock is not None:
            locked = self.frozen_lock["steps"][step.id].get("outputs", {}).get("digest")
            if locked != output_digest(manifest)["digest"]:
                # Stages write no timings into artifacts: the same key must give the same bytes.
                raise FrozenPlanError(
                    f"--frozen: {step.id}: its output differs from {self.plan.lock_path.name} "
                    f"(same key {step.key[:12]}, other bytes)",
                    [f"locked digest {str(locked)[:12]}, built {output_digest(manifest)['digest'][:12]}"],
                )
        self.finish(step, status, wall_s=wall_s, metrics=manifest.get("metrics", {}), answer=answer, command=command)
        if status == PULLED:
            return  # pull() printed what it moved
        label = "cached" if status == CACHED else f"built in {wall_s:.1f}s"
        self.console.print(Text.assemble(("✓ " if status != CACHED else "• ", "green"), f"{step.id} ", (label, "dim")))

    def finish(self, step: Step, status: str, **fields: Any) -> None:
        self.outcomes[step.id] = StepOutcome(step.id, step.kind, step.key, status, **fields)


# -- `tunepipe cache …`: the store seen from the command line ------------------------------------
def cache_ls(store: LocalStore) -> list[dict[str, Any]]:
    """One row per committed artifact: key, step id and kind it was built as, bytes, files, created, wall_s."""
    return [
        {
            "key": e.key,
            "id": e.manifest.get("id"),
            "kind": e.manifest.get("kind"),
            "bytes": e.size,
            "files": len(e.manifest.get("files", {})),
            "created": e.manifest.get("created"),
            "wall_s": e.manifest.get("wall_s"),
        }
        for e in store.ls()
    ]


def cache_verify(store: LocalStore, evict: bool = True) -> dict[str, list[str]]:
    """Re-hash every artifact: {key: problems} for the damaged ones, which are evicted (the next run rebuilds them)."""
    damaged = {}
    for entry in store.ls():
        problems = store.verify(entry.key)
        if problems:
            damaged[entry.key] = problems
            if evict:
                store.rm(entry.key)
    return damaged


def cache_gc(store: LocalStore, plan: Plan | None = None, keep_lock: bool = False) -> list[str]:
    """Remove every artifact but those of `plan` (and, with keep_lock, those its tunepipe.lock names); returns removed keys."""
    keep = {step.key for step in plan.steps} if plan is not None else set()
    if keep_lock and plan is not None:
        keep |= keys_in_lock(plan.lock_path)
    return store.gc(keep)


MIN_KEY_PREFIX = 6


def cache_rm(store: LocalStore, names: list[str], plan: Plan | None = None) -> list[str]:
    """Remove artifacts named by step id (of `plan`), key, or unique key prefix (at least 6 hex
    characters); returns removed keys. Every name is resolved before anything is removed: one bad
    name removes nothing."""
    keys = [e.key for e in store.ls()]
    step_ids = {s.id for s in plan.steps} if plan is not None else set()
    resolved: list[str] = []
    for name in names:
        if name in step_ids:
            key = plan.step(name).key
            if key not in keys:
                raise UserError(f"{name}: its artifact {key[:12]} is not in {store.root}; nothing was removed")
            matches = [key]
        else:
            prefix = name.lower()
            if len(prefix) < MIN_KEY_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
                what = "a step id of the plan, or " if plan is not None else ""
                raise UserError(
                    f"{name!r}: name {what}a key or a key prefix of at least {MIN_KEY_PREFIX} hex characters; nothing was removed"
                )
            matches = [k for k in keys if k.startswith(prefix)]
        if len(matches) > 1:
            raise UserError(f"{name!r} matches {len(matches)} artifacts: give more of the key; nothing was removed")
        if not matches:
            raise UserError(f"no artifact {name!r} in {store.root}; nothing was removed")
        if matches[0] not in resolved:
            resolved.append(matches[0])
    return [key for key in resolved if store.rm(key)]
