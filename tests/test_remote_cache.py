"""The remote artifact cache (store/remote.py) against a shared directory and a real S3 protocol server.

Every behavioural test runs twice: on a local directory standing in for a shared filesystem, and on
moto's S3 server through s3fs (tests/s3_server.py). Two local stores play two machines. Damage is
done with the filesystem's raw writes, never through the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fsspec", reason="the remote cache needs fsspec (pip install fsspec)")

from tunepipe.errors import UserError
from tunepipe.store import MANIFEST, LocalStore, tree_digest
from tunepipe.store.base import CHUNK
from tunepipe.store.remote import (
    PARTIAL,
    RemoteCorrupt,
    RemoteError,
    RemoteReadOnly,
    RemoteUnavailable,
    open_remote,
    redact,
)

pytest_plugins = ["s3_server"]  # the s3_server session fixture: moto's S3 server on 127.0.0.1

WEIGHTS = "model/weights.bin"


def unique_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def key_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def make_artifact(store: LocalStore, key: str, seed: int = 0) -> str:
    """Commit an artifact: a multi-chunk binary, a nested JSON, an empty file and a step log."""
    tmp = store.begin(key)
    (tmp / "model").mkdir()
    (tmp / WEIGHTS).write_bytes(hashlib.sha256(str(seed).encode()).digest() * ((CHUNK * 5 // 2) // 32))
    (tmp / "model" / "config.json").write_text(json.dumps({"seed": seed, "hidden_size": 64}))
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "step.log").write_text(f"built with seed {seed}\n")
    store.commit(tmp, key, {"kind": "test", "params": {"seed": seed}})
    return key


def shas(manifest: dict) -> dict[str, str]:
    return {name: info["sha256"] for name, info in manifest["files"].items()}


def total_size(manifest: dict) -> int:
    return sum(info["size"] for info in manifest["files"].values())


def remote_path(remote, key: str, name: str) -> str:
    """Where the documented layout puts a file of `key`."""
    return f"{remote.root}/{key[:2]}/{key}/{name}"


def push(remote, store: LocalStore, key: str, **kwargs) -> int:
    return remote.push(key, store.fetch(key), store.manifest(key), **kwargs)


def assert_nothing_committed(store: LocalStore, key: str) -> None:
    assert not store.has(key) and store.ls() == []
    assert not (store.root / key[:2] / key).exists()
    assert list((store.root / "tmp").glob("*")) == []  # the download was discarded


@pytest.fixture(params=["dir", "s3"])
def remote_url(request, tmp_path) -> str:
    if request.param == "dir":
        (tmp_path / "remote").mkdir()
        return (tmp_path / "remote").as_uri()  # file://; a plain path is tested below
    return request.getfixturevalue("s3_server").url(unique_prefix())


@pytest.fixture
def remote(remote_url):
    return open_remote(remote_url)


@pytest.fixture
def machines(tmp_path) -> tuple[LocalStore, LocalStore]:
    return LocalStore(tmp_path / "machine-a" / "cache"), LocalStore(tmp_path / "machine-b" / "cache")


def test_push_then_pull_gives_the_same_artifact(remote, machines):
    a, b = machines
    key = make_artifact(a, key_of("round trip"))
    local = a.manifest(key)
    assert not remote.has(key) and remote.lookup(key) is None and remote.ls() == []

    pushed = []
    assert push(remote, a, key, progress=lambda done, total: pushed.append((done, total))) == total_size(local)
    assert pushed[-1] == (total_size(local), total_size(local)) and len(pushed) > 3
    assert [done for done, _ in pushed] == sorted(done for done, _ in pushed)
    entry = remote.lookup(key)
    assert remote.has(key) and entry.size == total_size(local) and [e.key for e in remote.ls()] == [key]
    assert shas(entry.manifest) == shas(local) and entry.manifest["params"] == {"seed": 0}
    assert all(set(info) == {"sha256", "size"} for info in entry.manifest["files"].values())  # no local mtimes
    assert remote.verify(key) == []
    assert push(remote, a, key) == 0  # already there: nothing moves

    pulled = []
    assert remote.pull(key, b, progress=lambda done, total: pulled.append(done)) == total_size(local)
    assert pulled[-1] == total_size(local)
    assert b.has(key) and b.verify(key) == []
    assert tree_digest(shas(b.manifest(key))) == tree_digest(shas(local))
    assert b.manifest(key)["params"] == local["params"] and b.manifest(key)["kind"] == "test"
    for name in local["files"]:
        assert (b.fetch(key) / name).read_bytes() == (a.fetch(key) / name).read_bytes()
    assert remote.pull(key, b) == 0  # the local store has it


def test_a_plain_directory_path_is_a_remote(tmp_path, machines):
    a, b = machines
    (tmp_path / "shared").mkdir()
    remote = open_remote(str(tmp_path / "shared"))
    key = make_artifact(a, key_of("plain path"))
    push(remote, a, key)
    assert (tmp_path / "shared" / key[:2] / key / MANIFEST).is_file()
    assert remote.pull(key, b) > 0 and b.verify(key) == []


def truncate(data: bytes) -> bytes:
    return data[: len(data) - CHUNK // 2]


def flip(data: bytes) -> bytes:
    return data[:1000] + bytes([data[1000] ^ 0x01]) + data[1001:]


def extend(data: bytes) -> bytes:
    return data + b"\0" * 10


@pytest.mark.parametrize(
    "damage, problem, cheap_check_sees_it",
    [
        (truncate, "truncated", True),
        (flip, "sha256 mismatch", False),
        (extend, "longer than", True),
    ],
)
def test_a_damaged_remote_file_is_never_trusted(remote, machines, damage, problem, cheap_check_sees_it):
    a, b = machines
    key = make_artifact(a, key_of(f"damage {damage.__name__}"))
    push(remote, a, key)
    target = remote_path(remote, key, WEIGHTS)
    remote.fs.pipe_file(target, damage(remote.fs.cat_file(target)))

    assert remote.has(key) is not cheap_check_sees_it
    assert any(line.startswith(WEIGHTS) and problem in line for line in remote.verify(key))
    with pytest.raises(RemoteCorrupt) as caught:
        remote.pull(key, b)
    assert caught.value.key == key and caught.value.name == WEIGHTS
    assert key in str(caught.value) and WEIGHTS in str(caught.value) and problem in str(caught.value)
    assert_nothing_committed(b, key)

    # The machine that rejected it builds locally and repairs the remote copy.
    make_artifact(b, key)
    assert (push(remote, b, key) == 0) is not cheap_check_sees_it  # a same-size flip passes the cheap check
    assert push(remote, b, key, replace=True) == total_size(b.manifest(key))
    assert remote.verify(key) == []
    c = LocalStore(b.root.parent / "machine-c")
    assert remote.pull(key, c) > 0 and c.verify(key) == []


def test_a_missing_remote_file_is_reported(remote, machines):
    a, b = machines
    key = make_artifact(a, key_of("missing"))
    push(remote, a, key)
    remote.fs.rm_file(remote_path(remote, key, "model/config.json"))
    assert not remote.has(key)
    with pytest.raises(RemoteCorrupt, match="model/config.json: missing"):
        remote.pull(key, b)
    assert_nothing_committed(b, key)


def test_a_push_that_dies_is_invisible(remote, machines):
    a, b = machines
    key = make_artifact(a, key_of("dies"))

    def killed(done, total):
        if done > CHUNK:
            raise KeyboardInterrupt("the pushing machine went away")

    with pytest.raises(KeyboardInterrupt):
        push(remote, a, key, progress=killed)
    # A pusher killed between its files and its manifest: every file there, no manifest.
    for name in a.manifest(key)["files"]:
        remote.fs.pipe_file(remote_path(remote, key, name), (a.fetch(key) / name).read_bytes())

    assert not remote.has(key) and remote.manifest(key) is None and remote.ls() == []
    with pytest.raises(FileNotFoundError, match=key):
        remote.pull(key, b)
    assert_nothing_committed(b, key)
    assert push(remote, a, key) == total_size(a.manifest(key)) and remote.verify(key) == []
    assert [name for name in remote.fs.find(remote.root) if name.endswith(PARTIAL)] == []


def test_a_local_file_that_changed_is_not_pushed(remote, machines):
    a, _ = machines
    key = make_artifact(a, key_of("local damage"))
    directory, manifest = a.fetch(key), a.manifest(key)
    (directory / WEIGHTS).write_bytes(flip((directory / WEIGHTS).read_bytes()))
    with pytest.raises(RemoteError, match=f"{key}: {WEIGHTS} differs from its manifest"):
        remote.push(key, directory, manifest)
    assert not remote.has(key)
    assert not remote.fs.exists(remote_path(remote, key, WEIGHTS))  # the upload was discarded


def test_a_manifest_naming_files_outside_the_artifact_is_not_trusted(remote, machines, tmp_path):
    a, b = machines
    key = make_artifact(a, key_of("escape"))
    push(remote, a, key)
    manifest = remote.manifest(key)
    manifest["files"]["../../../escaped.txt"] = {"sha256": "0" * 64, "size": 0}
    remote.fs.pipe_file(remote_path(remote, key, MANIFEST), json.dumps(manifest).encode())
    assert not remote.has(key) and remote.ls() == []
    with pytest.raises(FileNotFoundError):
        remote.pull(key, b)
    assert not list(tmp_path.rglob("escaped.txt"))


def two_pushers(remote_url: str, first: LocalStore, second: LocalStore, key: str, second_waits: bool) -> list[int]:
    """Two machines push `key` at once: both are past their 'is it there?' check and mid-upload
    before either goes on; with `second_waits` the second one finishes only after the first."""
    both_uploading = threading.Barrier(2, timeout=60)
    first_done = threading.Event()

    def pusher(store: LocalStore, waits: bool) -> int:
        remote, started = open_remote(remote_url), []

        def progress(done, total):
            if not started:
                started.append(done)
                both_uploading.wait()
                if waits:
                    assert first_done.wait(timeout=60)

        try:
            return push(remote, store, key, progress=progress)
        finally:
            if not waits:
                first_done.set()

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(pusher, first, False), pool.submit(pusher, second, second_waits)]
        return [future.result() for future in futures]


def test_two_concurrent_pushes_of_one_key_are_harmless(remote_url, machines, tmp_path):
    a, b = machines
    key = make_artifact(a, key_of("concurrent"))
    make_artifact(b, key)  # the same build on the second machine: the same bytes
    moved = two_pushers(remote_url, a, b, key, second_waits=False)
    assert moved[0] > 0 and moved[1] > 0  # both uploaded: neither found the other's artifact first
    remote = open_remote(remote_url)
    assert remote.verify(key) == [] and shas(remote.manifest(key)) == shas(a.manifest(key))
    c = LocalStore(tmp_path / "machine-c")
    assert remote.pull(key, c) > 0 and (c.fetch(key) / WEIGHTS).read_bytes() == (a.fetch(key) / WEIGHTS).read_bytes()


def test_a_non_reproducible_build_pushed_concurrently_ends_consistent(remote_url, machines, tmp_path):
    a, b = machines
    key = make_artifact(a, key_of("two builds"), seed=1)
    make_artifact(b, key, seed=2)  # same key, other bytes
    moved = two_pushers(remote_url, a, b, key, second_waits=True)
    assert moved[1] == 2 * total_size(b.manifest(key))  # found a's manifest at the end: uploaded again
    remote = open_remote(remote_url)
    assert remote.verify(key) == [] and shas(remote.manifest(key)) == shas(b.manifest(key))
    c = LocalStore(tmp_path / "machine-c")
    remote.pull(key, c)
    assert shas(c.manifest(key)) == shas(b.manifest(key))


PUSH_SCRIPT = """
import sys
from pathlib import Path
from tunepipe.store import LocalStore
from tunepipe.store.remote import open_remote
store, key = LocalStore(Path(sys.argv[2])), sys.argv[3]
print(open_remote(sys.argv[1]).push(key, store.fetch(key), store.manifest(key)))
"""


def test_two_processes_push_one_key(remote_url, machines, tmp_path):
    a, b = machines
    key = make_artifact(a, key_of("processes"))
    make_artifact(b, key)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUSH_SCRIPT, remote_url, str(store.root), key],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for store in (a, b)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert int(out) in (0, total_size(a.manifest(key)))
    remote = open_remote(remote_url)
    assert remote.verify(key) == []
    c = LocalStore(tmp_path / "machine-c")
    assert remote.pull(key, c) > 0 and tree_digest(shas(c.manifest(key))) == tree_digest(shas(a.manifest(key)))


def test_gc_keeps_what_it_is_told(remote, machines):
    a, _ = machines
    keys = [make_artifact(a, key_of(f"gc {i}"), seed=i) for i in range(3)]
    for key in keys:
        push(remote, a, key)
    assert remote.gc(set(keys)) == []
    assert remote.gc({keys[0]}, older_than_days=1) == []  # all pushed just now
    assert remote.gc({keys[0]}) == sorted(keys[1:])
    assert [entry.key for entry in remote.ls()] == [keys[0]] and remote.verify(keys[0]) == []
    for key in keys[1:]:
        assert not remote.has(key) and remote.fs.find(f"{remote.root}/{key[:2]}/{key}") == []


def test_gc_by_age_and_leftovers_of_dead_pushes(tmp_path, machines):
    a, _ = machines
    root = tmp_path / "shared"
    root.mkdir()
    remote = open_remote(str(root))
    old, young, dead_old, dead_young = (key_of(f"age {i}") for i in range(4))
    for key in (old, young, dead_old, dead_young):
        make_artifact(a, key)
        push(remote, a, key)
    for key in (dead_old, dead_young):
        (root / key[:2] / key / MANIFEST).unlink()  # pushes that died before their manifest
    stray = root / young[:2] / young / f"step.log.0badc0de{PARTIAL}"
    stray.write_text("half a file")
    two_days_ago = time.time() - 2 * 86400
    for path in [root / old[:2] / old / MANIFEST, stray, *(root / dead_old[:2] / dead_old).rglob("*")]:
        os.utime(path, (two_days_ago, two_days_ago))

    assert remote.gc(set(), older_than_days=1) == [old]
    assert [entry.key for entry in remote.ls()] == [young] and remote.verify(young) == []
    assert not (root / dead_old[:2] / dead_old).exists() and not stray.exists()
    assert (root / dead_young[:2] / dead_young / WEIGHTS).is_file()  # may still be uploading


def test_rm_removes_the_manifest_and_the_files(remote, machines):
    a, _ = machines
    key = make_artifact(a, key_of("rm"))
    push(remote, a, key)
    assert remote.rm(key) is True
    assert not remote.has(key) and remote.fs.find(f"{remote.root}/{key[:2]}/{key}") == []
    assert remote.rm(key) is False


def test_a_missing_directory_is_unavailable(tmp_path, machines):
    a, b = machines
    with pytest.raises(RemoteUnavailable, match="does not exist"):
        open_remote(str(tmp_path / "not-mounted"))
    root = tmp_path / "shared"
    root.mkdir()
    remote = open_remote(root.as_uri())
    key = make_artifact(a, key_of("vanishing dir"))
    push(remote, a, key)
    shutil.rmtree(root)  # the share went away mid-run
    for call in (lambda: remote.has(key), lambda: remote.pull(key, b), lambda: push(remote, a, key), remote.ls):
        with pytest.raises(RemoteUnavailable, match="does not exist"):
            call()
    assert_nothing_committed(b, key)


def test_a_missing_bucket_is_unavailable(s3_server):
    with pytest.raises(RemoteUnavailable, match="bucket no-such-bucket-tp does not exist"):
        open_remote("s3://no-such-bucket-tp/cache")


def test_a_stopped_server_is_unavailable_and_no_credential_is_shown(s3_server, machines):
    a, b = machines
    server = s3_server.another()
    # One attempt per request (botocore retries a refused connection with backoff otherwise: ~13 s here).
    remote = open_remote(
        s3_server.url(unique_prefix()),
        {"endpoint_url": server.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}},
    )
    key = make_artifact(a, key_of("stopped server"))
    push(remote, a, key)
    server.stop()
    with pytest.raises(RemoteUnavailable) as caught:
        remote.pull(key, b)
    message = str(caught.value)
    assert "Could not connect" in message and "\n" not in message and caught.value.reason in message
    assert s3_server.secret not in message and s3_server.key_id not in message
    assert_nothing_committed(b, key)


def test_missing_credentials_are_unavailable(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteUnavailable, match="credentials"):
        open_remote(s3_server.url("cache"), {"skip_instance_cache": True})


def test_credentials_never_appear_in_messages_or_files(s3_server, machines):
    a, b = machines
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    url = f"https://tp-user:hunter2-secret@127.0.0.1:{port}/cache?sig=signed-token"
    with pytest.raises(RemoteUnavailable) as caught:
        open_remote(url)
    assert "hunter2" not in str(caught.value) and "signed-token" not in str(caught.value)
    assert "https://127.0.0.1" in str(caught.value)
    assert redact(f"GET {url} failed") == f"GET https://127.0.0.1:{port}/cache failed"

    prefix = unique_prefix()
    remote = open_remote(s3_server.url(prefix))
    assert remote.location == f"s3://{s3_server.bucket}/{prefix}"
    key = make_artifact(a, key_of("no credentials in files"))
    push(remote, a, key)
    remote.pull(key, b)
    objects = s3_server.objects(prefix)
    assert f"{prefix}/{key[:2]}/{key}/{MANIFEST}" in objects
    written = [*objects.values(), *(p.read_bytes() for p in b.root.rglob("*") if p.is_file())]
    assert not any(secret.encode() in data for data in written for secret in (s3_server.secret, s3_server.key_id))


def unprivileged(fn):
    """fn()'s JSON-able result, computed with the effective uid of `nobody` in a forked child when
    this process is root (root ignores file modes), else computed here."""
    if os.geteuid() != 0:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only local filesystems and modules already imported
        os.close(read)
        try:
            os.setegid(65534)
            os.seteuid(65534)
            payload = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(payload).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        payload = json.loads(f.read())
    os.waitpid(pid, 0)
    assert "error" not in payload, payload
    return payload["ok"]


def test_a_read_only_remote_pulls_but_refuses_pushes():
    base = Path(tempfile.mkdtemp(prefix="tunepipe-ro-"))  # not under pytest's private 0700 tmp dirs
    try:
        base.chmod(0o755)
        a = LocalStore(base / "machine-a")
        pushed, other = make_artifact(a, key_of("read-only 1")), make_artifact(a, key_of("read-only 2"))
        (base / "shared").mkdir()
        push(open_remote(str(base / "shared")), a, pushed)
        for path in [base / "shared", *(base / "shared").rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        (base / "machine-b").mkdir(mode=0o777)
        (base / "machine-b").chmod(0o777)

        def as_ci():
            remote, b = open_remote(str(base / "shared")), LocalStore(base / "machine-b" / "cache")
            try:
                push(remote, a, other)
                refused = ""
            except RemoteReadOnly as exc:
                refused = str(exc)
            return {
                "writable": remote.writable(),
                "refused": refused,
                "pulled": remote.pull(pushed, b),
                "verified": b.verify(pushed),
            }

        result = unprivileged(as_ci)
        assert result["writable"] is False
        assert "refused a write (push)" in result["refused"] and "pull from it" in result["refused"]
        assert result["pulled"] == total_size(a.manifest(pushed)) and result["verified"] == []
        assert not (base / "shared" / other[:2]).exists()
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base)


def test_bad_urls_are_user_errors():
    with pytest.raises(UserError, match="Protocol not known: nosuchproto"):
        open_remote("nosuchproto://somewhere")
    if importlib.util.find_spec("gcsfs") is None:  # a known protocol whose implementation is missing
        with pytest.raises(UserError, match="install gcsfs"):
            open_remote("gcs://bucket/cache")


def test_a_remote_is_not_a_working_copy(remote):
    for call in (lambda: remote.fetch("ab"), lambda: remote.begin("ab"), lambda: remote.commit(Path("x"), "ab", {})):
        with pytest.raises(NotImplementedError, match="local store"):
            call()
