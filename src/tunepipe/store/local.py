"""The local artifact store: one directory per cache key, committed by atomic rename. Light: no torch.

Layout under the root (`.tunepipe/cache` next to the spec, or $TUNEPIPE_CACHE) — known to this
module alone; everyone else asks `LocalStore` (committed artifacts) or `Scratch` (the rest):

    <root>/ab/<key>/         a committed artifact; `manifest.json` lists its files with sha256, size, mtime_ns
    <root>/tmp/<key>.<host>.<pid>.<rand>  an artifact being written; never read; `gc` removes it once
                             its writer is dead (or, written on another host, a day old)
    <root>/work/<key>/       persistent scratch of a step (checkpoints); survives a crash, gone after commit
    <root>/runs/<key>/       STEP.json and step.log of the latest attempt
    <root>/locks/<name>.lock file locks (never deleted: a waiter must keep the inode it waits on)

Trust rule: a key is built when `<root>/ab/<key>/manifest.json` exists and names that key, and every
file it lists is there with its size; a file whose mtime_ns differs from the manifest's was touched,
and is trusted only after its sha256 is checked again. The manifest is written last inside the
temporary directory, and the directory appears at its final name by one `os.rename` on the same
filesystem, so a crash at any moment leaves either nothing or a complete artifact. Who may commit:
the process that holds `Scratch.lock(key)` (the runner) or a worker it started; a second commit of
the same key finds the first in place and discards its own copy. Committed files get the user's
umask (a shared cache stays readable by the group).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import MANIFEST, STEP_LOG, ArtifactStore, Entry, sha256_file

if TYPE_CHECKING:
    from filelock import FileLock


# manifest.json path -> (its inode, size, mtime_ns; its parsed content), for every store of this process:
# a run asks for each manifest several times (cached?, metrics, lock, summary, model cards); a manifest
# is parsed again only once it was replaced.
_MANIFESTS: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def default_cache_dir(spec_dir: Path) -> Path:
    env = os.environ.get("TUNEPIPE_CACHE")
    return Path(env).expanduser().resolve() if env else (spec_dir / ".tunepipe" / "cache").resolve()


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _share(tmp: Path) -> None:
    """Give an artifact's files and directories the modes the user's umask allows (libraries
    such as tempfile write 0600/0700)."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(tmp):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def writable(path: Path) -> bool:
    """Whether this process may create files under `path` (its nearest existing ancestor)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def ensure_root(root: Path) -> None:
    """Create the cache directory, with a `.gitignore` of `*` in it — and in the `.tunepipe/` above it
    when that is where it lives — so that `git add -A` in a user's repository never commits the cache."""
    root.mkdir(parents=True, exist_ok=True)
    for directory in (root, root.parent) if root.parent.name == ".tunepipe" else (root,):
        ignore = directory / ".gitignore"
        if not ignore.exists():
            try:
                ignore.write_text("*\n")
            except OSError:  # a read-only cache: nothing will be written to commit by mistake either
                pass


class Scratch:
    """The store's non-artifact side: per-key work and run directories, locks. Never trusted."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def lock(self, name: str) -> FileLock:
        """The file lock `name` (a key: held by the runner while it builds it), blocking by default."""
        from filelock import FileLock  # imported on first use: a fully cached run takes no lock

        ensure_root(self.root)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / "locks" / f"{name}.lock"))

    def work_dir(self, key: str) -> Path:
        path = self.root / "work" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_dir(self, key: str) -> Path:
        """Where the runner puts a step's STEP.json and log (not created here: a dry run only names it)."""
        return self.root / "runs" / key

    def busy(self, key: str) -> bool:
        """Whether a runner holds the key's lock, i.e. is building it now."""
        lock = self.lock(key)
        try:
            lock.acquire(blocking=False)
        except TimeoutError:
            return True
        lock.release()
        return False


class LocalStore(ArtifactStore):
    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)
        self.scratch = Scratch(self.root)

    # -- reading -------------------------------------------------------------------------------
    def _dir(self, key: str) -> str:
        """The artifact directory of `key` as a str: a cached run asks for each step's several times."""
        return os.path.join(self.location, key[:2], key)

    def _path(self, key: str) -> Path:
        return Path(self._dir(key))

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The committed manifest of `key`, or None. Shared between callers: read it, never change it."""
        path = os.path.join(self._dir(key), MANIFEST)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = _MANIFESTS.get(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            return None
        if not (isinstance(manifest, dict) and manifest.get("key") == key):
            return None
        _MANIFESTS[path] = (signature, manifest)
        return manifest

    def has(self, key: str) -> bool:
        """Built and intact by a cheap check: manifest valid, every file present with its size, and a
        file touched since the commit (another mtime_ns) re-hashed. A cached run stays instant."""
        manifest = self.manifest(key)
        if manifest is None:
            return False
        base = self._dir(key)
        for name, info in manifest.get("files", {}).items():
            path = os.path.join(base, name)
            try:
                stat = os.stat(path)
            except OSError:
                return False
            if stat.st_size != info["size"]:
                return False
            if stat.st_mtime_ns != info.get("mtime_ns", stat.st_mtime_ns) and sha256_file(Path(path)) != info["sha256"]:
                return False
        return True

    def fetch(self, key: str) -> Path:
        if not self.has(key):
            raise FileNotFoundError(f"artifact {key} is not in the store {self.location}")
        return self._path(key)

    def verify(self, key: str) -> list[str]:
        manifest = self.manifest(key)
        if manifest is None:
            return ["manifest.json missing or unreadable"]
        base = self._path(key)
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
                    entries.append(Entry(artifact.name, manifest))
        return entries

    def writable(self) -> bool:
        return writable(self.root)

    # -- writing -------------------------------------------------------------------------------
    def begin(self, key: str) -> Path:
        """A fresh temporary directory, on the store's filesystem, to write `key`'s artifact into."""
        ensure_root(self.root)
        tmp = self.root / "tmp" / f"{key}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, key: str, manifest: dict[str, Any], replace: bool = False) -> None:
        """Hash `tmp`'s files into `manifest`, write it last, and rename `tmp` to the key's place.

        An intact artifact already there is kept (another process built the same key) unless
        `replace` (a forced rebuild); a damaged one is always replaced.
        """
        _share(tmp)
        names = [name for name in _list_files(tmp) if name != MANIFEST]
        files = {}
        for name in names:
            stat = (tmp / name).stat()
            files[name] = {"sha256": sha256_file(tmp / name), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({**manifest, "key": key, "files": files}, f, indent=2, sort_keys=True)
        os.chmod(tmp / MANIFEST, 0o666 & ~_umask())
        # On disk before the rename makes them trusted: a power cut must not leave a named, empty file.
        for name in [*names, MANIFEST]:
            _fsync(tmp / name)
        final = self._path(key)
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

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def rm(self, key: str) -> bool:
        path = self._path(key)
        if not path.exists():
            return False
        self._discard(path)
        shutil.rmtree(self.scratch.run_dir(key), ignore_errors=True)
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
            if entry.key not in keep and not self.scratch.busy(entry.key):
                self.rm(entry.key)
                removed.append(entry.key)
        for tmp in _children(self.root / "tmp"):
            if not self._writer_alive(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        for scratch in [*_children(self.root / "work"), *_children(self.root / "runs")]:
            if scratch.name not in keep and not self.scratch.busy(scratch.name):
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

    # -- delivering results ----------------------------------------------------------------------
    def materialise(self, key: str, dest: Path) -> None:
        """Copy an artifact's files to `dest` (the user's output_dir / export_dir).

        Copies, never links, so that editing a delivered file cannot corrupt the store. The step's log
        stays in the store. A file whose size and mtime already match is left alone, which keeps a
        fully cached run instant. Files in `dest` that the artifact lacks are left alone too.
        """
        base = self.fetch(key)
        for name in self.manifest(key)["files"]:
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
            partial = target.with_name(
                f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
            )  # runs may race here
            shutil.copy2(source, partial)
            os.replace(partial, target)
