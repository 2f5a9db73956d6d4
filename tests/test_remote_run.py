"""The remote cache through the runner: a second machine pulls instead of building, with the same
lock; a damaged remote copy is rebuilt here, never trusted; a remote that is gone means a local build."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import pytest
from fake_stages import compile_project, make_project, worker_env
from rich.console import Console

from tunepipe.runner import run_plan
from tunepipe.store import open_store

pytest.importorskip("fsspec", reason="the remote cache needs fsspec (pip install 'tunepipe[remote]')")
pytest_plugins = ["s3_server"]


@pytest.fixture
def machines(tmp_path, monkeypatch):
    """Two checkouts of one project, each with its own empty store and builds log."""
    for name, value in worker_env({}).items():
        monkeypatch.setenv(name, value)

    def machine(name: str) -> Path:
        root = tmp_path / name / "project"
        make_project(root, quantize=[], export=[{"format": "onnx", "export_dir": "out/onnx"}])
        return root

    return machine


def run(root: Path, remote: str | None, monkeypatch, **kwargs):
    monkeypatch.setenv("FAKE_BUILDS", str(root.parent / "builds.log"))
    console = Console(file=io.StringIO(), width=200)
    result = run_plan(compile_project(root), console=console, remote=remote, **kwargs)
    result.output = console.file.getvalue()
    return result


def builds(root: Path) -> list[str]:
    log = root.parent / "builds.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def remote_dir(tmp_path: Path) -> str:
    path = tmp_path / "shared" / "tunepipe"
    path.mkdir(parents=True)
    return str(path)


@pytest.fixture(params=["directory", "s3"])
def remote(request, tmp_path):
    if request.param == "directory":
        return remote_dir(tmp_path)
    server = request.getfixturevalue("s3_server")
    return server.url(f"run-{uuid.uuid4().hex[:8]}")


def test_a_second_machine_pulls_what_the_first_built_and_locks_the_same(machines, remote, monkeypatch):
    first, second = machines("a"), machines("b")
    built = run(first, remote, monkeypatch)
    assert {o.status for o in built.outcomes} == {"built"}
    pulled = run(second, remote, monkeypatch)
    assert builds(second) == []  # nothing built on the second machine
    statuses = {o.id: o.status for o in pulled.outcomes}
    assert statuses["export"] == "pulled" and statuses["infer"] == "pulled"  # delivered / answered: here
    assert "remote" in statuses.values()  # intermediate steps nobody here needs stay on the remote
    assert json.loads((second / "tunepipe.lock").read_text()) == json.loads((first / "tunepipe.lock").read_text())
    assert pulled.outcomes[-1].answer == built.outcomes[-1].answer
    assert (second / "out" / "onnx").is_dir()


def test_a_damaged_remote_copy_is_rebuilt_here_and_repaired(machines, tmp_path, monkeypatch):
    remote = remote_dir(tmp_path)
    first, second = machines("a"), machines("b")
    run(first, remote, monkeypatch)
    plan = compile_project(second)
    infer = plan.step("infer").key
    answer = Path(remote) / infer[:2] / infer / "answer.txt"
    answer.write_bytes(bytes(b ^ 1 for b in answer.read_bytes()))  # one flipped bit per byte, same size
    result = run(second, remote, monkeypatch)
    assert "damaged" in result.output and builds(second) == ["infer"]
    assert open_store(plan.cache_dir).verify(infer) == []
    third = machines("c")
    run(third, remote, monkeypatch)
    assert builds(third) == []  # the rebuilt copy replaced the damaged one


def test_a_remote_that_is_gone_means_a_local_build_with_a_warning(machines, tmp_path, monkeypatch):
    remote = remote_dir(tmp_path)
    shutil.rmtree(remote)
    root = machines("a")
    result = run(root, remote, monkeypatch)
    assert "remote cache unavailable" in result.output
    assert sorted(builds(root)) == sorted(o.id for o in result.outcomes)


def test_no_push_leaves_the_remote_as_it_was(machines, tmp_path, monkeypatch):
    remote = remote_dir(tmp_path)
    run(machines("a"), remote, monkeypatch, push="never")
    assert [p for p in Path(remote).rglob("manifest.json")] == []
