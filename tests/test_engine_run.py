"""The runner, the worker and the local executor, with the fake stages of tests/fake_stages.py.

Each step runs in its own worker process, as in real use; these tests check what a user relies on:
cached steps never run again, failures name the step, a killed run never leaves a trusted partial
artifact, two runs on one cache build once, and a fully cached run never imports torch.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_stages import HERE, PROJECT_STEPS, compile_project, make_project, read_spec, worker_env, write_spec
from rich.console import Console

from tunepipe.errors import StepFailed, UserError
from tunepipe.runner import cache_verify, run_plan
from tunepipe.stage_table import OPTIONAL_IMPORTS
from tunepipe.store import open_store

ALL = PROJECT_STEPS


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    make_project(root)
    for name, value in worker_env({}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FAKE_BUILDS", str(tmp_path / "builds.log"))
    return root


def run(root: Path, **kwargs):
    console = Console(file=io.StringIO(), width=200)
    result = run_plan(compile_project(root), console=console, **kwargs)
    result.output = console.file.getvalue()
    return result


def builds(root: Path) -> list[str]:
    log = root.parent / "builds.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def statuses(result) -> dict[str, str]:
    return {o.id: o.status for o in result.outcomes}


def artifact_bytes(store, key: str) -> dict[str, bytes]:
    base = store.fetch(key)
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "step.log")
    }


def test_first_run_builds_second_run_is_all_cached(project):
    first = run(project)
    assert statuses(first) == dict.fromkeys(ALL, "built")
    assert builds(project) == ALL
    assert first.lock_written and (project / "tunepipe.lock").exists()
    plan = compile_project(project)
    store = open_store(plan.cache_dir)
    train = plan.step("train")
    # delivered where the user asked, with the artifact's bytes; the log stays in the store
    assert (project / "out" / "model" / "train.txt").read_bytes() == (store.fetch(train.key) / "train.txt").read_bytes()
    assert "fake train running train" in (store.fetch(train.key) / "step.log").read_text()
    manifest = store.manifest(train.key)
    assert manifest["upstream"] == {"template": plan.step("template").key}
    assert manifest["params"]["logging_steps"] == 5 and manifest["wall_s"] >= 0 and manifest["peak_rss_bytes"] > 0
    assert manifest["versions"]["tunepipe"] and "torch" not in manifest["versions"]
    assert first.outcomes[-1].answer.startswith("answer ")

    started = time.monotonic()
    second = run(project)
    assert time.monotonic() - started < 1.0
    assert statuses(second) == dict.fromkeys(ALL, "cached")
    assert builds(project) == ALL  # no worker started
    assert second.lock_written is False
    assert second.outcomes[-1].answer == first.outcomes[-1].answer
    assert second.outcomes[2].metrics == first.outcomes[2].metrics


def test_an_export_flag_rebuilds_only_that_export_and_its_verify(project):
    run(project)
    spec = read_spec(project)
    spec["export"][1]["onnx_opset"] = 18
    write_spec(project, spec)
    result = run(project)
    assert [o.id for o in result.outcomes if o.status == "built"] == ["export.onnx", "verify.onnx"]
    lock = json.loads((project / "tunepipe.lock").read_text())["specs"]["spec.json"]
    assert lock["steps"]["export.onnx"]["params"]["onnx_opset"] == 18


def test_a_failed_step_names_itself_with_its_exit_status_and_log(project, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "merge")
    with pytest.raises(StepFailed) as failure:
        run(project)
    assert failure.value.step_id == "merge" and failure.value.returncode == 1
    assert "fake merge is failing on purpose" in failure.value.log_tail
    assert "RuntimeError: fake failure in merge" in failure.value.log_tail
    assert not (project / "tunepipe.lock").exists()
    plan = compile_project(project)
    store = open_store(plan.cache_dir)
    assert [store.has(s.key) for s in plan.steps][:4] == [True, True, True, False]
    assert list((store.root / "tmp").iterdir()) == []  # the failed step cleaned its temporary dir


def test_keep_going_builds_the_other_branches_and_returns_the_failures(project, monkeypatch):
    from tunepipe.runner import print_summary

    monkeypatch.setenv("FAKE_FAIL", "export")
    result = run(project, keep_going=True)  # no StepFailed: the caller gets the result and prints the summary
    assert statuses(result)["export.gguf"] == "failed" and statuses(result)["export.onnx"] == "failed"
    assert statuses(result)["verify.gguf"] == "skipped" and statuses(result)["infer"] == "built"
    assert [o.returncode for o in result.with_status("failed")] == [1, 1]
    assert "infer" in builds(project)  # a branch that does not need an export went on
    assert "verify.gguf" not in builds(project) and "verify.onnx" not in builds(project)
    assert not result.lock_written and not (project / "tunepipe.lock").exists()
    console = Console(file=io.StringIO(), width=200)
    print_summary(result, console)
    summary = console.file.getvalue()
    assert "export.gguf failed (exit status 1)" in summary and "export.onnx failed (exit status 1)" in summary
    assert "step.log" in summary


def test_until_only_force(project):
    result = run(project, until="train")
    assert [o.id for o in result.outcomes] == ["data", "template", "train"]
    assert set(json.loads((project / "tunepipe.lock").read_text())["specs"]["spec.json"]["steps"]) == {
        "data",
        "template",
        "train",
    }
    with pytest.raises(UserError, match="quantize needs merge, which is not built"):
        run(project, only="quantize")
    assert statuses(run(project, only="merge")) == {"merge": "built"}
    with pytest.raises(UserError, match="did you mean merge"):
        run(project, only="mrege")
    before = len(builds(project))
    result = run(project, until="merge", force="train")
    assert statuses(result) == {"data": "cached", "template": "cached", "train": "built", "merge": "cached"}
    assert builds(project)[before:] == ["train"]


def test_only_rank_0_commits(project, monkeypatch):
    from tunepipe.runner import step_payload
    from tunepipe.runtime.worker import run_step

    run(project, until="template")
    plan = compile_project(project)
    store = open_store(plan.cache_dir)
    train = plan.step("train")
    payload = step_payload(plan, train, store, store.scratch.run_dir(train.key) / "step.log", force=False)
    monkeypatch.setenv("RANK", "1")
    run_step(payload)
    assert builds(project)[-1] == "train"  # the stage ran on rank 1 ...
    assert not store.has(train.key)  # ... which committed nothing
    assert list((store.root / "tmp").iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    run_step(payload)
    assert store.has(train.key) and store.verify(train.key) == []


def test_dry_run_builds_nothing_and_shows_commands(project):
    result = run(project, dry_run=True)
    assert builds(project) == []
    assert {o.status for o in result.outcomes} == {"would-build"}
    command = result.outcomes[0].command
    assert "-m tunepipe.runtime.worker" in command and command.endswith("STEP.json")
    assert "$ " + command in result.output
    assert not (project / "tunepipe.lock").exists()
    assert not (project / ".tunepipe" / "cache" / "runs").exists()


def test_parallel_siblings(project, monkeypatch):
    monkeypatch.setenv("FAKE_SLOW", "export:0.2")
    run(project, jobs=2, until=["export.gguf", "export.onnx"])
    plan = compile_project(project)
    store = open_store(plan.cache_dir)
    log = (project.parent / "builds.log").read_text().splitlines()
    started = {line.split()[0]: float(line.split()[2]) for line in log}
    first, second = sorted(["export.gguf", "export.onnx"], key=started.get)
    first_ends = started[first] + store.manifest(plan.step(first).key)["wall_s"]
    assert started[second] < first_ends  # the second export started while the first was running


def test_a_tampered_artifact_is_caught_by_verify_and_rebuilt(project):
    run(project)
    plan = compile_project(project)
    store = open_store(plan.cache_dir)
    merge = plan.step("merge")
    good = artifact_bytes(store, merge.key)
    target = store.fetch(merge.key) / "merge.txt"
    target.write_bytes(target.read_bytes().replace(b"a", b"b", 1).replace(b"0", b"1", 1))
    assert list(cache_verify(store)) == [merge.key]
    before = len(builds(project))
    result = run(project)
    assert [o.id for o in result.outcomes if o.status == "built"] == ["merge"]  # downstream keys are unchanged
    assert builds(project)[before:] == ["merge"]
    assert artifact_bytes(store, merge.key) == good


def test_ctrl_c_cancels_the_running_step_cleanly(project, tmp_path):
    env = {**os.environ, "FAKE_SLOW": "train:1"}
    runner = subprocess.Popen(
        [sys.executable, str(HERE / "fake_stages.py"), "run", str(project)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker_pid = wait_for_build(project, "train")
    runner.send_signal(signal.SIGINT)
    runner.wait(30)
    assert runner.returncode != 0
    assert not alive(worker_pid)
    store = open_store(compile_project(project).cache_dir)
    assert not store.has(compile_project(project).step("train").key)
    assert list((store.root / "tmp").iterdir()) == []  # the worker removed its temporary dir on SIGTERM


def wait_for_build(project: Path, step_id: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    log = project.parent / "builds.log"
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text().splitlines():
                if line.split()[0] == step_id:
                    return int(line.split()[1])
        time.sleep(0.02)
    raise AssertionError(f"{step_id} never started")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours would still answer: only our runner's children can be, and it is gone
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} outlived its runner"
        time.sleep(0.05)


def assert_nothing_untrustworthy(store) -> int:
    """Every directory at a key's place is a complete, verified artifact; returns how many there are."""
    committed = 0
    if not store.root.exists():  # killed before the first step created the store
        return committed
    for shard in store.root.iterdir():
        if len(shard.name) == 2 and shard.is_dir():
            for artifact in shard.iterdir():
                assert store.verify(artifact.name) == [], f"untrustworthy artifact {artifact}"
                committed += 1
    return committed


def test_kill_9_at_random_moments_never_leaves_a_trusted_partial_artifact(project, tmp_path, monkeypatch):
    rounds = int(os.environ.get("TUNEPIPE_KILL_ROUNDS", "20"))
    rng = random.Random(int(os.environ.get("TUNEPIPE_KILL_SEED", "7")))
    monkeypatch.setenv("FAKE_SLOW", "train:0.04,merge:0.04,export:0.02")  # artifacts written file by file
    env = dict(os.environ)
    store = open_store(compile_project(project).cache_dir)
    kills = {"runner": 0, "worker": 0, "both": 0}
    for _ in range(rounds):
        runner = subprocess.Popen(
            [sys.executable, str(HERE / "fake_stages.py"), "run", str(project)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.2, 1.0))
        log = project.parent / "builds.log"
        lines = log.read_text().splitlines() if log.exists() else []
        worker = int(lines[-1].split()[1]) if lines else None
        victim = rng.choice(["runner", "worker", "both"]) if worker else "runner"
        kills[victim] += 1
        if victim in ("worker", "both") and alive(worker):
            os.kill(worker, signal.SIGKILL)
        if victim in ("runner", "both"):
            runner.kill()
        runner.wait(30)
        if worker:
            wait_gone(worker)  # a worker whose runner died must not go on
        assert_nothing_untrustworthy(store)
        if runner.returncode == 0:  # it finished before the kill: start over for the next round
            shutil.rmtree(store.root)
    assert kills["worker"] + kills["both"] > 0 and kills["runner"] + kills["both"] > 0

    final = run(project)
    assert {o.status for o in final.outcomes} <= {"built", "cached"}
    reference = tmp_path / "reference"
    make_project(reference)
    reference_plan = compile_project(reference)
    run(reference)
    plan = compile_project(project)
    assert [s.key for s in plan.steps] == [s.key for s in reference_plan.steps]
    for step in plan.steps:
        assert artifact_bytes(store, step.key) == artifact_bytes(open_store(reference_plan.cache_dir), step.key), (
            step.id
        )
    store.gc({s.key for s in plan.steps})
    assert list((store.root / "tmp").iterdir()) == []


def test_two_concurrent_runs_build_once(project):
    env = {**os.environ, "FAKE_SLOW": "train:0.1,merge:0.05"}
    command = [sys.executable, str(HERE / "fake_stages.py"), "run", str(project)]
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [r.communicate(60) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    assert sorted(builds(project)) == sorted(ALL)  # each step built by exactly one of them
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    for step_id in ALL:  # one run built it, the other waited for it and reused it
        assert sorted(r[step_id] for r in results) == ["built", "cached"], step_id


NO_TORCH_CHECK = """
import sys, json
sys.path.insert(0, {tests!r})
from pathlib import Path
from fake_stages import compile_project
from tunepipe.compiler.status import annotate
from tunepipe.compiler.render import render
from tunepipe.runner import run_plan
plan = compile_project(Path({root!r}))
render(plan, annotate(plan), "text")
result = run_plan(plan)
heavy = sorted(m for m in ("torch", "transformers", "peft", "numpy", "datasets") if m in sys.modules)
print(json.dumps({{"heavy": heavy, "statuses": sorted({{o.status for o in result.outcomes}})}}))
"""


def test_plan_and_a_fully_cached_run_never_import_torch(project):
    run(project)
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHECK.format(tests=str(HERE), root=str(project))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"heavy": [], "statuses": ["cached"]}


def test_a_stage_this_version_lacks_fails_preflight_before_anything_runs(project, monkeypatch):
    from tunepipe.executors import preflight

    installed = preflight._installed
    monkeypatch.setattr(
        preflight, "_installed", lambda module: module != "tunepipe.runtime.stages.quantize" and installed(module)
    )
    monkeypatch.setenv(
        "TUNEPIPE_STAGE_MODULES",
        "data=fake_stages,template=fake_stages,train=fake_stages,infer=fake_stages,"
        "merge=fake_stages,export=fake_stages,verify=fake_stages",
    )
    with pytest.raises(UserError) as error:
        run(project)
    assert "nothing was run" in error.value.message
    assert (
        "quantize: this version of tunepipe has no quantize stage yet; remove the quantize section"
        in error.value.details
    )
    assert builds(project) == []


# -- trust: damaged inputs, --frozen output digests, read-only caches ------------------------------


def damage_in_place(path: Path) -> None:
    """Overwrite a file's bytes, keeping its size and putting its mtime back: only a re-hash can tell."""
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_damaged_input_is_never_read(project):
    run(project)
    plan = compile_project(project)
    store = open_store(plan.cache_dir)
    merged = store.fetch(plan.step("merge").key)
    victim = next(p for p in sorted(merged.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "step.log"))
    damage_in_place(victim)
    assert store.has(plan.step("merge").key)  # the cheap check cannot see it
    with pytest.raises(StepFailed) as failed:
        run(project, force="infer")
    assert "is damaged" in failed.value.log_tail and victim.name in failed.value.log_tail


def test_frozen_fails_when_an_output_differs_from_the_lock(project):
    run(project)
    lock_path = project / "tunepipe.lock"
    lock = json.loads(lock_path.read_text())
    lock["specs"]["spec.json"]["steps"]["train"]["outputs"]["digest"] = "0" * 64
    lock_path.write_text(json.dumps(lock))
    with pytest.raises(UserError) as error:
        run(project, frozen=True)
    assert error.value.exit_code == 3 and "train: its output differs from tunepipe.lock" in error.value.message


def test_a_read_only_cache_serves_a_cached_run_and_refuses_to_build(project, monkeypatch):
    from tunepipe.store.local import LocalStore, Scratch

    run(project)

    def no_writes(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(LocalStore, "writable", lambda self: False)
    monkeypatch.setattr(Scratch, "lock", no_writes)
    monkeypatch.setattr(LocalStore, "begin", no_writes)
    cached = run(project)
    assert set(statuses(cached).values()) == {"cached"}
    edit = read_spec(project)
    edit["train"][0]["learning_rate"] = 0.5
    write_spec(project, edit)
    with pytest.raises(UserError) as error:
        run(project)
    assert "is read-only" in error.value.message and "train" in error.value.message


def test_steps_run_in_workers_started_ahead(project, monkeypatch):
    """Every step of a run is handed to a worker the local executor started before the step was
    submitted (its standby, which imported the stage while earlier steps ran): one process per step
    still, and the same artifacts; a launch that is not the plain worker command gets a fresh one."""
    from tunepipe.executors import local

    standbys, real_popen = {}, subprocess.Popen

    def popen(argv, *args, **kwargs):
        process = real_popen(argv, *args, **kwargs)
        if "--standby" in argv:
            standbys[process.pid] = argv[argv.index("--standby") + 1]
        return process

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    run(project)
    ran = [line.split() for line in (project.parent / "builds.log").read_text().splitlines()]
    plan = compile_project(project)
    assert [step for step, *_ in ran] == ALL
    assert {int(pid): plan.step(step).kind for step, pid, *_ in ran}.items() <= standbys.items()
    assert len({pid for _, pid, *_ in ran}) == len(ALL)

    executor = local.LocalExecutor()
    executor.expect([plan.step("data")])
    [standby] = executor.standbys.values()
    run_dir = project.parent / "run"
    launch = executor.prepare(plan.step("data"), run_dir / "STEP.json", run_dir / "step.log")
    launch.env = {"EXTRA": "1"}  # the standby's environment would lack it: a fresh worker runs this launch
    (run_dir).mkdir()
    (run_dir / "STEP.json").write_text("{}")
    handle = executor.submit(launch)
    assert handle.process.pid != standby.process.pid and standby.process.wait(10) is not None
    handle.process.wait(30)
    executor.close()


# The fake project's steps by what their workers hide: the data step reads datasets; quantize,
# verify.quantize, export.gguf (quantized: bnb8) and verify.gguf (whose reference is that quantize
# artifact) load quantized models; the rest use none of the stage table's OPTIONAL_IMPORTS.
QUANTIZED = {"quantize", "verify.quantize", "export.gguf", "verify.gguf"}


def expected_hidden(step: str) -> tuple[str, ...]:
    return ("hqq", "bitsandbytes") if step == "data" else ("datasets",) if step in QUANTIZED else OPTIONAL_IMPORTS


@pytest.mark.parametrize("standby", ["1", "0"])
def test_workers_hide_the_libraries_their_step_never_uses(project, tmp_path, monkeypatch, standby):
    """transformers and peft import datasets, hqq and bitsandbytes (the last two with torch._inductor:
    seconds) whenever they are installed; a step that never uses one runs with it hidden, in a
    standby and in a fresh worker alike."""
    site = tmp_path / "site"
    for name in OPTIONAL_IMPORTS:  # installed, whatever this environment has
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("TUNEPIPE_STANDBY", standby)
    plan = compile_project(project)
    assert {step.id: step.without for step in plan.steps} == {step: expected_hidden(step) for step in ALL}
    run(project)
    seen = dict(line.split()[::3] for line in (tmp_path / "builds.log").read_text().splitlines())
    assert seen == {step: f"hidden:{','.join(expected_hidden(step))}" for step in ALL}


def test_a_worker_exits_without_teardown_but_joins_threads_runs_atexit_and_flushes(tmp_path):
    """exit_now skips the interpreter's teardown (seconds after a model step: no global is finalized) and
    keeps what an exit owes: a non-daemon thread finishes, atexit handlers run, buffered stdout reaches
    the pipe."""
    script = f"""
import atexit, threading, time
from pathlib import Path
from tunepipe.runtime.worker import exit_now
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("joined"))).start()
class Teardown:  # a global's finalizer: the interpreter's teardown would run it, exit_now does not
    def __del__(self):
        print(" torn down", end="")
kept = Teardown()
print("buffered", end="")
exit_now(3)
raise SystemExit("not reached")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "buffered", "")
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
