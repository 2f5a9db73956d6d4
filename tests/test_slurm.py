"""The SLURM executor: its sbatch script, and real jobs on the one-node cluster of tests/slurm_cluster.py.

The jobs run the fake stages of tests/fake_stages.py (sbatch exports the test's environment, so the
workers find them): submit/poll/logs, an afterok chain, a failure with its exit code, cancel, a
requeue on the warning signal, re-attaching after the job has left the queue, and a whole plan
through the runner giving the same keys and output digests as the local executor.
"""

from __future__ import annotations

import io
import itertools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_stages import compile_project, make_project, worker_env
from rich.console import Console
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

from tunepipe.errors import UserError
from tunepipe.executors import slurm as slurm_module
from tunepipe.executors.slurm import (
    NO_EXIT_STATUS,
    SlurmExecutor,
    job_state,
    parse_squeue,
    sbatch_argv,
)
from tunepipe.runner import run_plan, step_payload
from tunepipe.store import open_store

KEY = "0123456789abcdef" * 4
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def fake_step(kind="train", **executor):
    return SimpleNamespace(id=kind, kind=kind, key=KEY, executor={"kind": "slurm", **executor})


def script_for(step, tmp_path: Path) -> str:
    launch = SlurmExecutor().prepare(step, tmp_path / "run" / "STEP.json", tmp_path / "run" / "step.log")
    assert str(launch) == f"sbatch --parsable {tmp_path / 'run' / 'step.sbatch'}\n{launch.script}"
    return launch.script


# -- the script, no cluster needed ----------------------------------------------------------------
def test_two_node_eight_gpu_train_script(tmp_path):
    step = fake_step(nnodes=2, nproc_per_node=8, gpus_per_node=8, cpus_per_task=32, partition="gpu",
                     account="llm", time="1-00:00:00", mem="480G", signal="USR1@120", requeue=True,
                     setup=["module load cuda/12.4", "source /opt/venv/bin/activate"],
                     sbatch_args=["--mail-type=END"])  # fmt: skip
    script = script_for(step, tmp_path)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        f"#SBATCH --job-name=tunepipe-train-{KEY[:8]}",
        f"#SBATCH --output={tmp_path / 'run' / 'step.log'}",
        "#SBATCH --open-mode=append",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=llm",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --mem=480G",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --mail-type=END",
    ]
    assert "module load cuda/12.4\nsource /opt/venv/bin/activate\n" in script
    # The rendezvous endpoint: the first host of the allocation, on a port derived from the job id.
    assert ('export TUNEPIPE_RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
            ':$((20000 + SLURM_JOB_ID % 20000))"') in lines  # fmt: skip
    srun = next(line for line in lines if line.startswith("srun "))
    words = shlex.split(srun.removesuffix(" &"))
    assert words[:5] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=32", "bash"]
    assert words[5] == "-c"
    # Expanded by each task's own shell, on its node: node count, node rank, endpoint.
    assert shlex.split(words[6]) == [
        "exec", TORCHRUN, "--nnodes", "$SLURM_NNODES", "--node-rank", "$SLURM_NODEID", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "$TUNEPIPE_RDZV_ENDPOINT", "--rdzv-id", KEY[:16],
        "--max-restarts", "0", "-m", "tunepipe.runtime.worker", str(tmp_path / "run" / "STEP.json"),
    ]  # fmt: skip
    assert '"$SLURM_NNODES"' in words[6] and '"$SLURM_NODEID"' in words[6]
    # On the warning signal: the step's own processes get SIGTERM, then the job requeues itself.
    assert "trap on_warning USR1" in lines and '  scancel --signal=TERM "$SLURM_JOB_ID"' in lines
    assert '  scontrol requeue "$SLURM_JOB_ID" && exit 0' in lines
    assert lines[-2:] == ['echo "$SLURM_JOB_ID $status" > "$exit_file"', 'exit "$status"']
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_one_process_steps_run_the_worker_on_one_node(tmp_path):
    # nnodes and nproc_per_node are a train step's: a data step from the same section stays on one node.
    script = script_for(fake_step("data", nnodes=4, nproc_per_node=8, partition="cpu"), tmp_path)
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks=1\n#SBATCH --partition=cpu\n" in script
    worker = shlex.join([sys.executable, "-m", "tunepipe.runtime.worker", str(tmp_path / "run" / "STEP.json")])
    assert f"\n{worker} &\n" in script and "srun" not in script and "trap on_warning" not in script
    # One node with several processes still goes through srun + torchrun.
    script = script_for(fake_step(nproc_per_node=2, master_port=29611, signal="USR2@60"), tmp_path)
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n" in script and ':29611"' in script
    assert "#SBATCH --signal=B:USR2@60\n" in script and "trap on_warning USR2" in script
    assert "#SBATCH --requeue" not in script and "scontrol requeue" not in script  # the signal only stops the step
    # A log path with a space or a % is carried literally.
    spaced = SlurmExecutor().prepare(fake_step("data"), tmp_path / "S.json", tmp_path / "my runs" / "50%.log")
    assert f'#SBATCH --output="{tmp_path / "my runs" / "50%%.log"}"' in spaced.script
    subprocess.run(["bash", "-n"], input=spaced.script, text=True, check=True)


@pytest.mark.parametrize("options, message", [
    ({"partition": "$PARTITION"}, "must be a literal value: SLURM expands nothing"),
    ({"sbatch_args": ["--nodes=$NUM_NODES"]}, "must be a literal value"),
    ({"sbatch_args": ["mail-type=END"]}, "is not an sbatch option"),
    ({"partiton": "gpu"}, "did you mean partition"),
    ({"rdzv_endpoint": "node0:29400"}, "is not an option of the slurm executor"),
    ({"nnodes": "2"}, "executor.nnodes must be a int"),
    ({"exclusive": "yes"}, "executor.exclusive must be a bool"),
    ({"partition": True}, "executor.partition must be a str"),
    ({"nnodes": 0}, "must be at least 1"),
    ({"gres": "gpu:8", "gpus_per_node": 8}, "gpus_per_node or gres, not both"),
    ({"signal": "USR9@120"}, "is not SIGNAL"),
    ({"signal": "KILL@10"}, "is not SIGNAL"),
])  # fmt: skip
def test_option_mistakes_are_user_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        script_for(fake_step(**options), tmp_path)


def test_states_from_squeue_rows_and_exit_records():
    rows = parse_squeue("17|RUNNING|0|None|\n18|FAILED|768|NonZeroExitCode|\n19|TIMEOUT|15|TimeLimit|\n")
    assert rows == {
        "17": ("RUNNING", "None", 0),
        "18": ("FAILED", "NonZeroExitCode", 3),
        "19": ("TIMEOUT", "TimeLimit", 143),
    }
    assert not job_state(rows["17"], None, None).finished
    assert job_state(rows["18"], 3, None).exit_code == 3 and job_state(rows["19"], None, None).exit_code == 143
    cancelled_pending = job_state(("CANCELLED", "DependencyNeverSatisfied", 0), None, None)
    assert cancelled_pending.finished and cancelled_pending.exit_code is None  # never ran: no status of its own
    preempted = job_state(("PREEMPTED", "None", 15), None, None)
    assert not preempted.finished  # SLURM requeues it; final only once it has left the queue
    gone = job_state(None, None, preempted)
    assert gone.finished and gone.state == "PREEMPTED"
    assert job_state(None, 0, None).state == "COMPLETED" and job_state(None, 2, None).state == "FAILED"
    assert job_state(None, None, job_state(rows["17"], None, None)).state == "LOST"
    assert sbatch_argv(Path("s.sbatch"), ["4", "5"]) == [
        "sbatch",
        "--parsable",
        "--dependency=afterok:4:5",
        "--kill-on-invalid-dep=yes",
        "s.sbatch",
    ]


# -- real jobs --------------------------------------------------------------------------------------
class _Ahead:
    """The store as a queued job will find it: upstream artifacts at their documented place."""

    def __init__(self, store):
        self.root = store.root

    def fetch(self, key: str) -> Path:
        return self.root / key[:2] / key


@pytest.fixture
def project(tmp_path, monkeypatch, slurm_cluster):  # noqa: F811
    root = tmp_path / "project"
    make_project(root)
    for name, value in worker_env({}).items():  # sbatch exports them to the jobs
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FAKE_BUILDS", str(tmp_path / "builds.log"))
    monkeypatch.setattr(SlurmExecutor, "query_interval_s", 0.3)
    return root


def prepared(executor, plan, step_id: str, **options):
    step = plan.step(step_id)
    step.executor = {"kind": "slurm", **options}
    run_dir = Path(plan.cache_dir) / "test-runs" / step.key
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = executor.prepare(step, run_dir / "STEP.json", run_dir / "step.log")
    payload = step_payload(plan, step, _Ahead(open_store(plan.cache_dir)), launch.log_path, False)
    (run_dir / "STEP.json").write_text(json.dumps(payload))
    return launch


def wait(executor, jobs, timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while any(executor.poll(job) is None for job in jobs):
        assert time.monotonic() < deadline, {job: executor.state(job) for job in jobs}
        time.sleep(0.2)
    return {job: executor.state(job) for job in jobs}


def wait_for_log(job, text: str, timeout=30.0, count=1) -> None:
    deadline = time.monotonic() + timeout
    while (job.launch.log_path.read_text() if job.launch.log_path.exists() else "").count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not in the log of job {job}"
        time.sleep(0.2)


def builds(project: Path) -> list[str]:
    log = project.parent / "builds.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def squeue_knows(job) -> bool:
    result = subprocess.run(
        ["squeue", "-h", "--states=all", f"--jobs={job}"], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and bool(result.stdout.strip())


def test_submit_poll_logs(project):
    plan = compile_project(project)
    executor = SlurmExecutor()
    job = executor.submit(prepared(executor, plan, "data"))
    assert (
        job.isdigit() and json.dumps({"handle": job}) == f'{{"handle": "{job}"}}'
    )  # a job id, as a run record holds it
    assert executor.state(job).state in ("PENDING", "RUNNING", "COMPLETED")
    state = wait(executor, [job])[job]
    assert (state.state, state.exit_code, executor.poll(job)) == ("COMPLETED", 0, 0)
    text, offset = executor.logs(job)
    assert f"tunepipe: job {job} on " in text and "fake data running data" in text and "data committed as" in text
    assert executor.logs(job, offset) == ("", offset)
    assert (job.launch.log_path.parent / "step.exit").read_text() == f"{job} 0\n"
    store = open_store(plan.cache_dir)
    key = plan.step("data").key
    assert store.has(key) and "fake data running data" in (store.fetch(key) / "step.log").read_text()
    with pytest.raises(UserError, match="sbatch refused the job") as refused:
        executor.submit(prepared(executor, plan, "template", partition="nosuch"))
    assert any("invalid partition" in line.lower() for line in refused.value.details)


def test_afterok_chain_runs_in_order_followed_by_one_squeue_at_a_time(project, monkeypatch):
    plan = compile_project(project)
    executor = SlurmExecutor()
    data = executor.submit(prepared(executor, plan, "data"))
    template = executor.submit(prepared(executor, plan, "template"), dependencies=[data])
    train = executor.submit(prepared(executor, plan, "train"), dependencies=[template])
    pending = executor.state(train)
    assert pending.state == "PENDING" and pending.reason == "Dependency"
    calls = []
    real = slurm_module._slurm
    monkeypatch.setattr(slurm_module, "_slurm", lambda argv: calls.append((time.monotonic(), argv)) or real(argv))
    started = time.monotonic()
    states = wait(executor, [data, template, train])  # polls each job every 0.2 s
    elapsed = time.monotonic() - started
    assert all(argv[0] == "squeue" for _, argv in calls) and len(calls) <= elapsed / executor.query_interval_s + 1
    assert f"--jobs={data},{template},{train}" in calls[0][1]  # one call for all of them
    assert all(b - a >= executor.query_interval_s for (a, _), (b, _) in itertools.pairwise(calls))
    assert [states[j].state for j in (data, template, train)] == ["COMPLETED"] * 3
    assert builds(project) == ["data", "template", "train"]
    started = [float(line.split()[2]) for line in (project.parent / "builds.log").read_text().splitlines()]
    assert started == sorted(started)
    store = open_store(plan.cache_dir)
    assert all(store.has(plan.step(s).key) for s in ("data", "template", "train"))


def test_a_failed_job_gives_its_exit_code_cancels_its_dependents_and_is_found_after_it_left_the_queue(
    project, monkeypatch
):
    monkeypatch.setenv("FAKE_FAIL", "template")
    plan = compile_project(project)
    executor = SlurmExecutor()
    data = executor.submit(prepared(executor, plan, "data"))
    template = executor.submit(prepared(executor, plan, "template"), dependencies=[data])
    train = executor.submit(prepared(executor, plan, "train"), dependencies=[template])
    states = wait(executor, [data, template, train])
    assert (states[data].state, states[template].state, states[train].state) == ("COMPLETED", "FAILED", "CANCELLED")
    assert executor.poll(template) == 1 and states[template].exit_code == 1
    assert states[train].exit_code is None and executor.poll(train) == NO_EXIT_STATUS  # it never ran
    assert "RuntimeError: fake failure in template" in executor.logs(template)[0]
    assert builds(project) == ["data", "template"]
    # Once SLURM has forgotten the job (no accounting), a new client re-attaching reads its exit record.
    deadline = time.monotonic() + 40
    while squeue_knows(template):
        assert time.monotonic() < deadline, "squeue still lists the job"
        time.sleep(1)
    later = SlurmExecutor()
    attached = later.attach(str(template), prepared(later, plan, "template"))
    state = later.state(attached)
    assert (state.state, state.exit_code, state.in_queue, later.poll(attached)) == ("FAILED", 1, False, 1)
    assert open_store(plan.cache_dir).has(plan.step("template").key) is False


def test_cancel_a_running_job_leaves_nothing_committed(project, monkeypatch):
    monkeypatch.setenv("FAKE_SLOW", "data:3")
    plan = compile_project(project)
    executor = SlurmExecutor()
    job = executor.submit(prepared(executor, plan, "data"))
    wait_for_log(job, "fake data running data")
    assert executor.state(job).state == "RUNNING"
    executor.cancel(job)
    state = executor.state(job)
    assert (
        state.state == "CANCELLED" and state.exit_code == 143 and executor.poll(job) == 143
    )  # the worker's SIGTERM exit
    assert "tunepipe: got SIGTERM" in executor.logs(job)[0]
    store = open_store(plan.cache_dir)
    assert not store.has(plan.step("data").key)
    assert list((Path(plan.cache_dir) / "tmp").iterdir()) == []  # the worker removed its partial artifact


@pytest.mark.slow
def test_the_warning_signal_requeues_the_job_and_it_finishes(project, monkeypatch):
    monkeypatch.setenv("FAKE_SLOW", "data:0.5")
    plan = compile_project(project)
    executor = SlurmExecutor()
    job = executor.submit(prepared(executor, plan, "data", signal="USR1@60", requeue=True))
    wait_for_log(job, "fake data running data")
    # What SLURM does 60 s before the time limit: signal the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for_log(job, "requeueing job")
    assert not executor.states([job], fresh=True)[job].finished  # back in the queue, not ended
    state = wait(executor, [job], timeout=50)[job]
    assert (state.state, state.exit_code) == ("COMPLETED", 0)
    log = executor.logs(job)[0]
    assert "got SIGUSR1 before the time limit" in log and f"tunepipe: job {job} on" in log and ", run 2" in log
    assert builds(project) == ["data", "data"]
    # The same artifact as a build without interruption.
    reference = tmp_store_build(project.parent / "reference")
    store = open_store(plan.cache_dir)
    key = plan.step("data").key
    assert (store.fetch(key) / "data.txt").read_bytes() == (reference.fetch(key) / "data.txt").read_bytes()


@pytest.mark.slow
def test_a_distributed_train_step_runs_torchrun_under_srun_and_requeues(project, monkeypatch):
    """nproc_per_node 2 on the one node: srun starts torchrun, whose rendezvous comes from the job's
    environment; the warning signal stops torchrun's workers through `scancel --signal=TERM`."""
    monkeypatch.setenv("FAKE_SLOW", "train:1.2")
    plan = compile_project(project)
    run_plan(plan, until="template", console=Console(file=io.StringIO()))  # its inputs, built locally
    executor = SlurmExecutor()
    job = executor.submit(prepared(executor, plan, "train", nproc_per_node=2, signal="USR1@60", requeue=True))
    wait_for_log(job, "fake train running train", timeout=60, count=2)  # both ranks
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = wait(executor, [job], timeout=90)[job]
    log = executor.logs(job)[0]
    assert (state.state, state.exit_code) == ("COMPLETED", 0), log[-3000:]
    assert "requeueing job" in log and ", run 2" in log
    runs = [
        line.split() for line in (project.parent / "builds.log").read_text().splitlines() if line.startswith("train")
    ]
    assert len(runs) == 4 and len({pid for _, pid, *_ in runs}) == 4  # 2 ranks, twice
    store = open_store(plan.cache_dir)
    reference = tmp_store_build(project.parent / "reference", until="train")
    key = plan.step("train").key
    assert (store.fetch(key) / "train.txt").read_bytes() == (reference.fetch(key) / "train.txt").read_bytes()


def tmp_store_build(root: Path, until: str = "data"):
    make_project(root)
    plan = compile_project(root)
    run_plan(plan, until=until, console=Console(file=io.StringIO()))
    return open_store(plan.cache_dir)


@pytest.mark.slow
def test_a_plan_through_the_runner_matches_the_local_executor(project, tmp_path, monkeypatch):
    """The runner queues the plan on slurm (submit with afterok, poll, logs): same keys, same outputs."""
    local_root = tmp_path / "local"
    make_project(local_root)
    local = run_plan(compile_project(local_root), jobs=2, console=Console(file=io.StringIO()))
    slurm_plan = compile_project(project, executor_override="slurm")
    assert {s.executor["kind"] for s in slurm_plan.steps} == {"slurm"}
    dry = run_plan(slurm_plan, dry_run=True, console=Console(file=io.StringIO(), width=200))
    train = next(o for o in dry.outcomes if o.id == "train")
    assert (
        train.command.startswith("sbatch --parsable ")
        and f"#SBATCH --job-name=tunepipe-train-{train.key[:8]}" in train.command
    )
    slurm = run_plan(slurm_plan, jobs=2, console=Console(file=io.StringIO(), width=200))  # the node has 2 CPUs
    assert [(o.id, o.key, o.status) for o in slurm.outcomes] == [(o.id, o.key, "built") for o in local.outcomes]
    assert json.loads((project / "tunepipe.lock").read_text()) == json.loads((local_root / "tunepipe.lock").read_text())
    assert slurm.outcomes[-1].answer == local.outcomes[-1].answer


@pytest.mark.slow
def test_detach_queues_the_whole_dag_at_once_and_a_later_run_reattaches(project):
    from tunepipe.jobs import status_rows
    from tunepipe.runner import read_run_record

    plan = compile_project(project, executor_override="slurm")
    store = open_store(plan.cache_dir)
    detached = run_plan(plan, detach=True, console=Console(file=io.StringIO()))
    assert {o.status for o in detached.outcomes} == {"queued"}  # everything queued, nothing waited for
    records = {s.id: read_run_record(store.scratch.run_dir(s.key)) for s in plan.steps}
    assert {r["executor"] for r in records.values()} == {"slurm"} and all(
        r["handle"].isdigit() for r in records.values()
    )
    assert {row["state"] for row in status_rows(plan, store)} <= {"job", "cached"}
    # the client is gone; a new run finds the jobs by their run records and follows them
    again = run_plan(compile_project(project, executor_override="slurm"), console=Console(file=io.StringIO()))
    assert {o.status for o in again.outcomes} <= {"built", "cached"}
    assert {s.id: read_run_record(store.scratch.run_dir(s.key))["handle"] for s in plan.steps} == {
        k: r["handle"] for k, r in records.items()
    }  # never submitted twice
    assert sorted(builds(project)) == sorted(s.id for s in plan.steps)  # each step built once
    assert all(store.has(s.key) for s in plan.steps)


@pytest.mark.slow
def test_cancel_stops_a_queued_dag_and_nothing_is_committed(project):
    from tunepipe.jobs import cancel_steps
    from tunepipe.runner import read_run_record

    plan = compile_project(project, executor_override="slurm")
    store = open_store(plan.cache_dir)
    run_plan(plan, until="train", detach=True, console=Console(file=io.StringIO()))
    cancelled = cancel_steps(plan, store, None)
    assert cancelled and cancelled[0] == "data"  # its dependents, queued behind it, are cancelled by SLURM itself
    executor = SlurmExecutor()
    for step_id in ("data", "template", "train"):
        run_dir = store.scratch.run_dir(plan.step(step_id).key)
        launch = executor.prepare(plan.step(step_id), run_dir / "STEP.json", run_dir / "step.log")
        job = executor.attach(read_run_record(run_dir)["handle"], launch)
        wait(executor, [job], timeout=30)
        assert not store.has(plan.step(step_id).key), step_id
    assert cancel_steps(plan, store, None) == []  # nothing left to cancel
