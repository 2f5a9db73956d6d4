"""The artifact store: atomic commits, what is trusted, verify, gc, rm, materialise. In-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunepipe.errors import UserError
from tunepipe.runner import cache_gc, cache_ls, cache_rm, cache_verify
from tunepipe.store import open_store

KEY_A = "a" * 64
KEY_B = "b" * 64


def commit(store, key: str, files: dict[str, bytes]):
    tmp = store.begin(key)
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    store.commit(tmp, key, {"id": "train", "kind": "train"})
    return store.fetch(key)


def test_commit_makes_a_verified_artifact_with_its_manifest(tmp_path):
    store = open_store(tmp_path / "cache")
    assert not store.has(KEY_A)
    path = commit(store, KEY_A, {"model/weights.bin": b"\x00" * 100, "train.json": b"{}"})
    assert path == tmp_path / "cache" / "aa" / KEY_A
    assert store.has(KEY_A) and store.verify(KEY_A) == []
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == KEY_A and manifest["files"]["model/weights.bin"]["size"] == 100
    assert [e.key for e in store.ls()] == [KEY_A]
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_an_uncommitted_or_manifestless_directory_is_never_trusted(tmp_path):
    store = open_store(tmp_path / "cache")
    tmp = store.begin(KEY_A)
    (tmp / "half.bin").write_bytes(b"partial")
    assert not store.has(KEY_A) and store.ls() == []
    store._path(KEY_B).mkdir(parents=True)  # a directory in the right place, without a manifest
    (store._path(KEY_B) / "weights.bin").write_bytes(b"?")
    assert not store.has(KEY_B) and store.ls() == []
    (store._path(KEY_B) / "manifest.json").write_text('{"key": "' + KEY_A + '"}')  # a manifest for another key
    assert not store.has(KEY_B)


def test_a_second_commit_of_a_key_keeps_the_first(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"x": b"first"})
    commit(store, KEY_A, {"x": b"second"})
    assert (store._path(KEY_A) / "x").read_bytes() == b"first"
    tmp = store.begin(KEY_A)
    (tmp / "x").write_bytes(b"forced")
    store.commit(tmp, KEY_A, {}, replace=True)
    assert (store._path(KEY_A) / "x").read_bytes() == b"forced"
    assert store.verify(KEY_A) == []


def test_a_touched_file_is_re_hashed_by_the_cheap_check(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"adapter.safetensors": b"\x01" * 64})
    weights = store._path(KEY_A) / "adapter.safetensors"
    weights.write_bytes(b"\x02" * 64)  # every value overwritten, size kept: the mtime tells
    assert not store.has(KEY_A)
    weights.write_bytes(b"\x01" * 64)  # put back: same bytes, another mtime: still trusted
    assert store.has(KEY_A)


def test_committed_files_follow_the_umask_and_the_cache_is_git_ignored(tmp_path):
    old = os.umask(0o022)
    try:
        store = open_store(tmp_path / ".tunepipe" / "cache")
        path = commit(store, KEY_A, {"model/weights.bin": b"w"})
    finally:
        os.umask(old)
    assert (path / "model" / "weights.bin").stat().st_mode & 0o777 == 0o644
    assert (path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / ".tunepipe" / ".gitignore").read_text() == "*\n"
    assert (tmp_path / ".tunepipe" / "cache" / ".gitignore").read_text() == "*\n"


def test_verify_catches_tampering_and_evicts(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"weights.bin": b"abcd", "config.json": b"{}"})
    commit(store, KEY_B, {"weights.bin": b"efgh"})
    weights = store._path(KEY_A) / "weights.bin"
    stat = weights.stat()
    weights.write_bytes(b"abce")  # same size, and the same mtime put back: only a re-hash sees it
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.has(KEY_A)
    assert store.verify(KEY_A) == ["weights.bin: content changed (sha256 mismatch)"]
    (store._path(KEY_B) / "extra.txt").write_text("planted")
    assert store.verify(KEY_B) == ["extra.txt: not in manifest"]
    (store._path(KEY_B) / "extra.txt").unlink()
    (store._path(KEY_B) / "weights.bin").write_bytes(b"ef")  # truncated: even `has` sees that
    assert not store.has(KEY_B)
    assert set(cache_verify(store)) == {KEY_A, KEY_B}
    assert store.ls() == []


def test_gc_keeps_what_it_is_told_and_removes_leftovers_of_dead_writers(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"x": b"1"})
    commit(store, KEY_B, {"x": b"2"})
    store.scratch.work_dir(KEY_B)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    stale_tmp = store.root / "tmp" / f"{KEY_B}.{host}.{dead.stdout.strip()}.deadbeef"
    stale_tmp.mkdir(parents=True)
    live_tmp = store.begin(KEY_A)  # this process is alive: its tmp must stay
    assert store.gc({KEY_A}) == [KEY_B]
    assert store.has(KEY_A) and not store.has(KEY_B)
    assert not stale_tmp.exists() and live_tmp.exists()
    assert not (store.root / "work" / KEY_B).exists()


def test_gc_skips_a_key_being_built(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"x": b"1"})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
from filelock import FileLock
import sys, time
lock = FileLock({str(store.root / "locks" / f"{KEY_A}.lock")!r}); lock.acquire()
print("locked", flush=True); time.sleep(30)""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert store.gc(set()) == []
    finally:
        holder.kill()
        holder.wait()
    assert store.gc(set()) == [KEY_A]


def test_materialise_copies_and_skips_unchanged_files(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"model/weights.bin": b"w" * 10, "step.log": b"log"})
    dest = tmp_path / "out"
    store.materialise(KEY_A, dest)
    assert (dest / "model" / "weights.bin").read_bytes() == b"w" * 10
    assert not (dest / "step.log").exists()
    assert (dest / "model" / "weights.bin").stat().st_ino != (
        store._path(KEY_A) / "model" / "weights.bin"
    ).stat().st_ino
    before = (dest / "model" / "weights.bin").stat().st_mtime_ns
    store.materialise(KEY_A, dest)
    assert (dest / "model" / "weights.bin").stat().st_mtime_ns == before
    (dest / "model" / "weights.bin").write_bytes(b"edited by the user")
    store.materialise(KEY_A, dest)
    assert (dest / "model" / "weights.bin").read_bytes() == b"w" * 10
    assert (store._path(KEY_A) / "model" / "weights.bin").read_bytes() == b"w" * 10


def test_cache_commands(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"x": b"12345"})
    commit(store, KEY_B, {"x": b"1"})
    rows = cache_ls(store)
    assert [(r["key"], r["id"], r["bytes"]) for r in rows] == [(KEY_A, "train", 5), (KEY_B, "train", 1)]
    assert cache_rm(store, ["bbbbbb"]) == [KEY_B]
    with pytest.raises(UserError, match="no artifact"):
        cache_rm(store, ["bbbbbb"])
    assert cache_gc(store) == [KEY_A]


def test_concurrent_materialise_of_one_artifact(tmp_path):
    """Two runs of one spec deliver the same output_dir at once: neither may trip over the other."""
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"model/weights.bin": os.urandom(1 << 20)})
    script = f"""
from pathlib import Path
from tunepipe.store import open_store
store, dest = open_store(Path({str(store.root)!r})), Path({str(tmp_path / "out")!r})
for _ in range(100):
    (dest / "model" / "weights.bin").unlink(missing_ok=True)  # so that every round copies
    store.materialise({KEY_A!r}, dest)
"""
    racers = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [r.communicate(60)[1] for r in racers]
    assert [r.returncode for r in racers] == [0, 0], errors


@pytest.mark.parametrize("name", ["", "a", "aaaaa", "not-a-key", "zzzzzzzz"])
def test_cache_rm_refuses_short_or_non_hex_prefixes(tmp_path, name):
    """An empty prefix matches every key: `cache rm ""` must remove nothing."""
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"x": b"1"})
    with pytest.raises(UserError, match="at least 6 hex characters"):
        cache_rm(store, [name])
    assert store.has(KEY_A)


def test_cache_rm_resolves_every_name_before_removing_any(tmp_path):
    store = open_store(tmp_path / "cache")
    commit(store, KEY_A, {"x": b"1"})
    commit(store, KEY_B, {"x": b"2"})
    with pytest.raises(UserError, match="nothing was removed"):
        cache_rm(store, ["aaaaaa", "cccccc"])
    assert store.has(KEY_A) and store.has(KEY_B)
    assert cache_rm(store, ["AAAAAA", KEY_B]) == [KEY_A, KEY_B]
