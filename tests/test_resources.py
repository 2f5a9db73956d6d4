"""Resource failures say what happened in one line — a full disk, a permission, an out-of-memory
kill — the summary still names the failed step, and nothing half-built is kept."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
from pathlib import Path

import pytest
from fake_stages import compile_project, make_project, worker_env
from rich.console import Console

from tunepipe.errors import StepFailed
from tunepipe.resources import describe_exit, describe_os_error
from tunepipe.runner import print_summary, run_plan
from tunepipe.store import open_store


def test_resource_errors_are_one_line_with_what_to_do(tmp_path):
    line = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/cache/tmp/x"))
    assert line.startswith("no space left on the device: /cache/tmp/x") and "TUNEPIPE_CACHE" in line
    assert "permission denied" in describe_os_error(PermissionError(errno.EACCES, "denied", "/c"))
    assert describe_os_error(FileNotFoundError(errno.ENOENT, "missing")) is None  # not a resource: a real error
    assert "out-of-memory killer" in describe_exit(-signal.SIGKILL, tmp_path)
    assert describe_exit(1, tmp_path) is None  # a plain failure: its log says why


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MB filesystem (root only): a disk that fills."""
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs root and mount -t tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def full_disk_plan(tmp_path, tmpfs, monkeypatch):
    """A plan whose train step writes 3 MB into a cache on the 1 MB filesystem."""
    root = tmp_path / "project"
    make_project(root, quantize=[], export=[], merge=None)
    for name, value in worker_env({"FAKE_BIG": "train:3000000"}).items():
        monkeypatch.setenv(name, value)
    return compile_project(root, cache_dir=tmpfs / "cache")


def test_a_full_disk_names_the_step_the_resource_and_keeps_nothing(full_disk_plan):
    plan = full_disk_plan
    console = Console(file=io.StringIO(), width=200)
    with pytest.raises(StepFailed) as failed:
        run_plan(plan, console=console)
    text = failed.value.log_tail + console.file.getvalue()
    assert failed.value.step_id == "train"
    assert "no space left on the device" in text or "the cache's disk is full" in text, text[-2000:]
    assert "Traceback" not in failed.value.log_tail
    store = open_store(plan.cache_dir)
    assert not store.has(plan.step("train").key)
    assert list((Path(plan.cache_dir) / "tmp").iterdir()) == []  # the partial artifact is gone


def test_the_summary_names_a_step_that_failed_for_a_resource(full_disk_plan):
    plan = full_disk_plan
    console = Console(file=io.StringIO(), width=200)
    result = run_plan(plan, console=console, keep_going=True)
    print_summary(result, console)
    out = console.file.getvalue()
    assert "✗ train failed" in out and ("no space left" in out or "disk is full" in out), out[-2000:]


def test_a_disk_that_fills_before_the_run_record_is_written_fails_the_step_not_the_run(full_disk_plan, monkeypatch):
    """The step's worker can fill the disk before the runner records its job: the run goes on, and the
    step fails for the full disk as above (found under load, when the worker wrote first)."""
    import tunepipe.runner as runner

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "write_run_record", full)
    console = Console(file=io.StringIO(), width=200)
    result = run_plan(full_disk_plan, console=console, keep_going=True)
    print_summary(result, console)
    out = console.file.getvalue()
    assert "could not record job" in out and "✗ train failed" in out, out[-2000:]
