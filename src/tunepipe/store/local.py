"""The artifact store: one directory per cache key, committed by atomic rename. Light: no torch.

Layout under the root (`.tunepipe/cache` next to the spec, or $TUNEPIPE_CACHE):

    <root>/ab/<key>/         a committed artifact; `manifest.json` lists its files with sha256 and size
    <root>/tmp/<key>.<host>.<pid>.<rand>  an artifact being written; never read; `gc` removes it once
                             its writer is dead (or, written on another host, a day old)
    <root>/work/<key>/       persistent scratch of a step (checkpoints); survives a crash, gone after commit
    <root>/runs/<key>/       STEP.json and step.log of the latest attempt
    <root>/locks/<key>.lock  file locks (never deleted: a waiter must keep the inode it waits on)

Trust rule: a key is built when `<root>/ab/<key>/manifest.json` exists and names that key. The
manifest is written last inside the temporary directory, and the directory appears at its final
name by one `os.rename` on the same filesystem, so a crash at any moment leaves either nothing or a
complete artifact. Who may commit: the process that holds `lock(key)` (the runner) or a worker it
started; a second commit of the same key finds the first in place and discards its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from filelock import FileLock

MANIFEST = "manifest.json"
STEP_LOG = "step.log"  # the step's output, copied into its artifact by the worker
CHUNK = 1 << 20


def default_cache_dir(spec_dir: Path) -> Path:
    env = os.environ.get("TUNEPIPE_CACHE")
    return Path(env).expanduser().resolve() if env else (spec_dir / ".tunepipe" / "cache").resolve()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(files: dict[str, str]) -> str:
    """One digest for a set of files given as {relative name: sha256}."""
    return hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()


def _list_files(root: Path) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            names.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(names)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _children(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.get("files", {}).values())


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of a committed key, or None when the key is not (validly) built."""
        try:
            manifest = json.loads((self.path(key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and manifest.get("key") == key else None

    def has(self, key: str) -> bool:
        """Built and intact by a cheap check: manifest valid, every file present with its size.

        Content hashes are checked by `verify` (a full read), not here: a cached run stays instant.
        """
        manifest = self.manifest(key)
        if manifest is None:
            return False
        base = self.path(key)
        for name, info in manifest.get("files", {}).items():
            try:
                if (base / name).stat().st_size != info["size"]:
                    return False
            except OSError:
                return False
        return True

    def verify(self, key: str) -> list[str]:
        """Re-hash a committed artifact; returns its problems (empty list = intact)."""
        manifest = self.manifest(key)
        if manifest is None:
            return ["manifest.json missing or unreadable"]
        base = self.path(key)
        problems = []
        listed = manifest.get("files", {})
        for name, info in sorted(listed.items()):
            file = base / name
            if not file.is_file():
                problems.append(f"{name}: missing")
            elif file.stat().st_size != info["size"]:
                problems.append(f"{name}: size {file.stat().st_size} != {info['size']}")
            elif sha256_file(file) != info["sha256"]:
                problems.append(f"{name}: content changed (sha256 mismatch)")
        extra = set(_list_files(base)) - set(listed) - {MANIFEST}
        problems += [f"{name}: not in manifest" for name in sorted(extra)]
        return problems

    def ls(self) -> list[Entry]:
        entries = []
        if not self.root.is_dir():
            return entries
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != 2 or not shard.is_dir():
                continue
            for artifact in sorted(shard.iterdir()):
                manifest = self.manifest(artifact.name)
                if manifest is not None:
                    entries.append(Entry(artifact.name, artifact, manifest))
        return entries

    # -- writing -------------------------------------------------------------------------------
    def lock(self, key: str) -> FileLock:
        """The per-key lock a runner holds while it builds `key` (blocking by default)."""
        from filelock import FileLock  # imported on first use: a fully cached run takes no lock

        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def work_dir(self, key: str) -> Path:
        path = self.root / "work" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_dir(self, key: str) -> Path:
        """Where the runner puts a step's STEP.json and log (not created here: a dry run only names it)."""
        return self.root / "runs" / key

    def begin(self, key: str) -> Path:
        """A fresh temporary directory, on the store's filesystem, to write `key`'s artifact into."""
        tmp = self.root / "tmp" / f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, key: str, manifest: dict[str, Any], replace: bool = False) -> Path:
        """Hash `tmp`'s files into `manifest`, write it last, and rename `tmp` to the key's place.

        An intact artifact already there is kept (another process built the same key) unless
        `replace` (a forced rebuild); a damaged one is always replaced.
        """
        names = [name for name in _list_files(tmp) if name != MANIFEST]
        files = {name: {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size} for name in names}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({**manifest, "key": key, "files": files}, f, indent=2, sort_keys=True)
        # On disk before the rename makes them trusted: a power cut must not leave a named, empty file.
        for name in [*names, MANIFEST]:
            _fsync(tmp / name)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and (replace or not self.has(key)):
            self._discard(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not self.has(key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process committed the same key first
        _fsync(final.parent)
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def rm(self, key: str) -> bool:
        path = self.path(key)
        if not path.exists():
            return False
        self._discard(path)
        shutil.rmtree(self.root / "runs" / key, ignore_errors=True)
        return True

    def _discard(self, path: Path) -> None:
        # Rename first so no reader ever sees a half-deleted artifact under a trusted name.
        doomed = self.root / "tmp" / f"{path.name}.rm.{uuid.uuid4().hex[:8]}"
        doomed.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def gc(self, keep: set[str]) -> list[str]:
        """Remove artifacts not in `keep` and leftovers of dead processes; keys being built are skipped.

        An artifact that a run in progress reads as an input is not protected: gc what no running
        spec uses (`cache_gc` keeps the spec's plan).
        """
        removed = []
        for entry in self.ls():
            if entry.key not in keep and not self._busy(entry.key):
                self.rm(entry.key)
                removed.append(entry.key)
        for tmp in _children(self.root / "tmp"):
            if not self._writer_alive(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        for scratch in [*_children(self.root / "work"), *_children(self.root / "runs")]:
            if scratch.name not in keep and not self._busy(scratch.name):
                shutil.rmtree(scratch, ignore_errors=True)
        return removed

    @staticmethod
    def _writer_alive(tmp: Path) -> bool:
        """Whether the process owning a tmp dir (`<key>.<host>.<pid>.<rand>`) may still be writing it."""
        parts = tmp.name.split(".", 1)[-1].rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return False  # a discarded artifact whose deletion was interrupted
        host, pid = parts[0], int(parts[1])
        if host != socket.gethostname():  # written on another node of a shared filesystem: go by age
            return time.time() - tmp.stat().st_mtime < 24 * 3600
        return _pid_alive(pid)

    def _busy(self, key: str) -> bool:
        """Whether a runner holds the key's lock, i.e. is building it now."""
        lock = self.lock(key)
        try:
            lock.acquire(blocking=False)
        except TimeoutError:
            return True
        lock.release()
        return False

    # -- delivering results ----------------------------------------------------------------------
    def materialise(self, key: str, dest: Path) -> None:
        """Copy an artifact's files to `dest` (the user's output_dir / export_dir).

        Copies, never links, so that editing a delivered file cannot corrupt the store. The step's log
        stays in the store. A file whose size and mtime already match is left alone, which keeps a
        fully cached run instant. Files in `dest` that the artifact lacks are left alone too.
        """
        manifest = self.manifest(key)
        if manifest is None:
            raise FileNotFoundError(f"artifact {key} is not in the store {self.root}")
        base = self.path(key)
        for name in manifest["files"]:
            if name == STEP_LOG:
                continue
            source, target = base / name, dest / name
            stat = source.stat()
            try:
                existing = target.stat()
                if existing.st_size == stat.st_size and existing.st_mtime_ns == stat.st_mtime_ns:
                    continue
            except OSError:
                pass
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")  # runs may race here
            shutil.copy2(source, partial)
            os.replace(partial, target)

