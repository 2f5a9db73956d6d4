"""A remote artifact cache over fsspec: a shared directory, s3://, or anything fsspec reaches. Light: no torch.

`open_remote(url)` opens one: a plain path or `file://` URL is a shared directory (it must exist:
tunepipe never creates a mount point), `s3://bucket/prefix` goes through s3fs (the bucket must
exist), any other protocol through its fsspec implementation (gcsfs, adlfs, sshfs ...). The local
store stays the working copy: a remote is never written by a step, only filled by `push` from a
committed local artifact and read by `pull` into a local store. Layout under the URL:

    <prefix>/<key[:2]>/<key>/<files...>      the artifact's files, at their relative names
    <prefix>/<key[:2]>/<key>/manifest.json   uploaded last: the commit marker

Trust rule (the interface's): a key is on the remote iff its manifest is there, names the key, and
every file it lists is there with its size (`has`, one listing). The remote manifest is the local
one without the per-file mtime_ns (meaningless elsewhere). Nothing downloaded is trusted before its
sha256 and size match that manifest: `pull` hashes while streaming and, on any mismatch, raises
`RemoteCorrupt` naming the key and the file, and leaves nothing in the local store.

Writes are atomic per file: on a filesystem (local, NFS, sftp) a file is written beside its target
as `<name>.<rand>.partial` and renamed; on an object store it is a multipart upload completed only
once its bytes hashed right (fsspec's `autocommit=False`), so a reader never sees half a file. A
push that dies leaves files without a manifest: invisible, and removed by `gc` a day later. Two
machines pushing one key at once is harmless: same bytes land under the same names, the first
manifest written is kept. Should a build not be reproducible (other bytes under the same key) and
the other pusher finish first, the later one uploads all its files again before writing its
manifest, so the key ends consistent; in the remaining window (both manifests written in the same
instant) a mixed artifact fails every pull's check, is rebuilt and repaired by `push(replace=True)`.

Errors: an unreachable remote, missing credentials or a vanished directory/bucket raise
`RemoteUnavailable` (one line: the caller warns and builds locally); a refused write raises
`RemoteReadOnly`; a damaged artifact `RemoteCorrupt`; a bad URL or a missing fsspec implementation
`UserError`. Credentials come only from each filesystem's own environment and config files (AWS_*,
~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...); tunepipe never reads, stores or prints them, and
`location` and every message drop a URL's user:password@ and query string.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import UserError
from .base import CHUNK, MANIFEST, ArtifactStore, Entry
from .local import LocalStore

Progress = Callable[[int, int], None]  # (bytes done, bytes total), called as a transfer advances

PARTIAL = ".partial"  # suffix of a file being written beside its target on a filesystem remote
LEFTOVER_AGE_S = 24 * 3600  # a manifest-less upload this old belongs to a dead pusher
# fsspec protocols whose writes become visible only once complete (object stores: no rename, and
# no directories to create); every other filesystem gets a .partial file renamed into place.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci"})
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RemoteError(Exception):
    """Something about a remote cache that the runner reports and works around (builds locally)."""


class RemoteUnavailable(RemoteError):
    """The remote cannot be reached or read: offline, no credentials, directory or bucket gone."""

    def __init__(self, location: str, action: str, reason: str):
        self.reason = reason
        super().__init__(f"remote cache {location} unavailable ({action}): {reason}")


class RemoteReadOnly(RemoteError):
    """The remote refused a write (permissions): pull works, push does not."""


class RemoteCorrupt(RemoteError):
    """A remote artifact's bytes differ from its manifest: never trusted, nothing committed locally."""

    def __init__(self, location: str, key: str, name: str, problem: str):
        self.key, self.name, self.problem = key, name, problem
        super().__init__(f"remote artifact {key} at {location}: {name}: {problem}; not trusted, nothing was committed")


def open_remote(url: str, storage_options: dict[str, Any] | None = None) -> RemoteStore:
    """The remote cache at `url`, checked reachable (RemoteUnavailable otherwise).

    `storage_options` go to the fsspec filesystem as they are (tests point s3fs at a local server);
    the runner passes none, so each filesystem configures itself from its usual environment.
    """
    store = RemoteStore(url, storage_options)
    store.check()
    return store


def redact(text: str) -> str:
    """`text` with every URL's user:password@ and query string (signed URLs, SAS tokens) removed."""
    text = re.sub(r"([a-zA-Z][\w+.-]*://)[^/\s@\"']*@", r"\1", text)
    return re.sub(r"(://[^\s\"']*?)\?[^\s\"']*", r"\1", text)


def _clean_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # a plain path (or a Windows drive letter)
        return url
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning 'the remote did not answer properly', from whichever client libraries
    the filesystem loaded (s3fs raises botocore's and aiohttp's own)."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in [
        ("botocore.exceptions", "BotoCoreError"),
        ("botocore.exceptions", "ClientError"),
        ("aiohttp", "ClientError"),
        ("google.auth.exceptions", "GoogleAuthError"),
    ]:
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def _safe_name(name: str) -> bool:
    """A manifest file name that stays inside the artifact directory."""
    return (
        name != MANIFEST
        and "\\" not in name
        and not PurePosixPath(name).is_absolute()
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def _valid_manifest(manifest: Any, key: str) -> bool:
    if not isinstance(manifest, dict) or manifest.get("key") != key or not isinstance(manifest.get("files"), dict):
        return False
    for name, info in manifest["files"].items():
        if not (
            _safe_name(name)
            and isinstance(info, dict)
            and isinstance(info.get("sha256"), str)
            and _SHA256.fullmatch(info["sha256"])
            and type(info.get("size")) is int
            and info["size"] >= 0
        ):
            return False
    return True


def _digests(manifest: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {name: (info["sha256"], info["size"]) for name, info in manifest["files"].items()}


class _Ticker:
    """Counts transferred bytes and reports them to an optional progress callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def add(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


class RemoteStore(ArtifactStore):
    """Committed artifacts on a remote, reached through `push` and `pull` (not `fetch`/`begin`/`commit`)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.location = _clean_url(str(url))
        try:
            import fsspec  # here, not at the top: `tunepipe.store.remote` imports without it
        except ImportError as exc:
            raise UserError(
                f"remote cache {self.location}: fsspec is not installed",
                details=["pip install 'tunepipe[remote]' (fsspec, and s3fs for s3://)"],
            ) from exc
        try:
            self.fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        except ImportError as exc:  # fsspec names the package that implements the protocol
            raise UserError(
                f"remote cache {self.location}: {_reason(exc)}",
                details=["install the fsspec implementation it names into tunepipe's environment"],
            ) from exc
        except ValueError as exc:
            raise UserError(
                f"remote cache {self.location}: {_reason(exc)}",
                details=["use a directory, file://, s3://bucket/prefix or another fsspec URL"],
            ) from exc
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.object_store = bool(protocols & OBJECT_STORES)
        self.root = root.rstrip("/") or root

    # -- errors ----------------------------------------------------------------------------------
    @contextmanager
    def _reaching(self, action: str, writing: bool = False) -> Iterator[None]:
        """Turn the filesystem's transport errors into RemoteUnavailable (RemoteReadOnly for a refused write)."""
        try:
            yield
        except (RemoteError, UserError):
            raise
        except PermissionError as exc:
            if writing:
                raise RemoteReadOnly(
                    f"remote cache {self.location} refused a write ({action}): {_reason(exc)}; "
                    "pull from it, or push with credentials that may write"
                ) from exc
            raise RemoteUnavailable(self.location, action, _reason(exc)) from exc
        except FileNotFoundError:
            self.check()  # the directory or bucket itself vanished: unavailable
            raise
        except _transport_errors() as exc:
            raise RemoteUnavailable(self.location, action, _reason(exc)) from exc

    def check(self) -> None:
        """Raise RemoteUnavailable unless the remote answers: the directory exists (a filesystem) or
        the bucket does (an object store, whose prefixes need not exist before the first push)."""
        anchor = self.root.split("/", 1)[0] if self.object_store else self.root
        missing = f"{'bucket' if self.object_store else 'directory'} {redact(anchor)} does not exist"
        try:
            info = self.fs.info(anchor)
        except FileNotFoundError:
            raise RemoteUnavailable(self.location, "check", missing) from None
        except _transport_errors() as exc:
            raise RemoteUnavailable(self.location, "check", _reason(exc)) from exc
        if info.get("type") != "directory":
            raise RemoteUnavailable(self.location, "check", missing.replace("does not exist", "is not a directory"))

    # -- reading -------------------------------------------------------------------------------
    def _dir(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}"

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The remote manifest of `key` (None when absent or not a valid manifest of that key)."""
        with self._reaching("read manifest"):
            try:
                data = self.fs.cat_file(f"{self._dir(key)}/{MANIFEST}")
            except FileNotFoundError:
                if not self.object_store:
                    self.check()  # a vanished mount is an outage, not a miss
                return None
        try:
            manifest = json.loads(data)
        except ValueError:
            return None
        return manifest if _valid_manifest(manifest, key) else None

    def _sizes(self, key: str) -> dict[str, int]:
        """{relative name: size} of every file under the key's directory, from one listing."""
        base = self._dir(key)
        self.fs.invalidate_cache(base)
        with self._reaching("list"):
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
        return {path[len(base) + 1 :]: info["size"] for path, info in found.items() if path.startswith(base + "/")}

    def lookup(self, key: str) -> Entry | None:
        """The key's entry when it is on the remote by the cheap check (for `plan`: state and size)."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        sizes = self._sizes(key)
        if any(sizes.get(name) != info["size"] for name, info in manifest["files"].items()):
            return None
        return Entry(key, manifest)

    def has(self, key: str) -> bool:
        return self.lookup(key) is not None

    def ls(self) -> list[Entry]:
        """Every key with a valid manifest (files not checked: `has` or `verify` do)."""
        paths = [f"{self._dir(key)}/{MANIFEST}" for key, names in sorted(self._listing().items()) if MANIFEST in names]
        with self._reaching("read manifests"):
            contents = self.fs.cat(paths, on_error="return") if paths else {}
        entries = []
        for path in paths:
            key, data = path.split("/")[-2], contents.get(path)
            if isinstance(data, BaseException):
                if isinstance(data, FileNotFoundError):
                    continue  # removed since the listing
                raise RemoteUnavailable(self.location, "read manifests", _reason(data))
            with suppress(ValueError):
                manifest = json.loads(data)
                if _valid_manifest(manifest, key):
                    entries.append(Entry(key, manifest))
        return entries

    def _listing(self) -> dict[str, dict[str, dict[str, Any]]]:
        """{key: {relative name: file info}} for every file in the layout, from one recursive listing."""
        self.fs.invalidate_cache(self.root)
        with self._reaching("list"):
            try:
                found = self.fs.find(self.root, detail=True)
            except FileNotFoundError:
                found = {}
            if not found:
                self.check()  # nothing at all: maybe the directory or bucket vanished
        listing: dict[str, dict[str, dict[str, Any]]] = {}
        for path, info in found.items():
            parts = path[len(self.root) + 1 :].split("/", 2)
            if len(parts) == 3 and parts[1][:2] == parts[0] and path.startswith(self.root + "/"):
                listing.setdefault(parts[1], {})[parts[2]] = info
        return listing

    def _stream(
        self, key: str, name: str, info: dict[str, Any], sink: IO[bytes] | None = None, ticker: _Ticker | None = None
    ) -> str | None:
        """Read a remote file (into `sink`), hashing as it comes; the problem with it, or None when its
        size and sha256 are the manifest's. Stops reading once it is longer than the manifest says."""
        digest, done = hashlib.sha256(), 0
        try:
            with self.fs.open(f"{self._dir(key)}/{name}", "rb") as source:
                while chunk := source.read(CHUNK):
                    done += len(chunk)
                    if done > info["size"]:
                        return f"longer than the {info['size']} bytes its manifest lists"
                    digest.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
                    if ticker is not None:
                        ticker.add(len(chunk))
        except FileNotFoundError:
            return "missing"
        if done != info["size"]:
            return f"size {done} != {info['size']} (truncated)"
        if digest.hexdigest() != info["sha256"]:
            return "content changed (sha256 mismatch)"
        return None

    def verify(self, key: str) -> list[str]:
        """Download and re-hash every file of `key`; its problems (empty list = intact)."""
        manifest = self.manifest(key)
        if manifest is None:
            return ["manifest.json missing or unreadable"]
        problems = []
        with self._reaching("verify"):
            for name, info in sorted(manifest["files"].items()):
                if (problem := self._stream(key, name, info)) is not None:
                    problems.append(f"{name}: {problem}")
        extra = set(self._sizes(key)) - set(manifest["files"]) - {MANIFEST}
        problems += [f"{name}: not in manifest" for name in sorted(extra) if not name.endswith(PARTIAL)]
        return problems

    def pull(self, key: str, local: LocalStore, progress: Progress | None = None) -> int:
        """Download `key` into `local` and commit it there; the bytes moved (0 when `local` has it).

        Every file is checked against the remote manifest while it streams: a mismatch raises
        RemoteCorrupt and nothing is committed. FileNotFoundError when the key is not on the remote.
        The local store hashes the files again and writes its own manifest (local mtimes).
        """
        if local.has(key):
            return 0
        manifest = self.manifest(key)
        if manifest is None:
            raise FileNotFoundError(f"artifact {key} is not in the remote cache {self.location}")
        ticker = _Ticker(progress, sum(info["size"] for info in manifest["files"].values()))
        tmp = local.begin(key)
        try:
            with self._reaching("pull"):
                for name, info in sorted(manifest["files"].items()):
                    self._pull_file(key, name, info, tmp / name, ticker)
            local.commit(tmp, key, {field: value for field, value in manifest.items() if field not in ("key", "files")})
        except BaseException:
            local.abort(tmp)
            raise
        return ticker.done

    def _pull_file(self, key: str, name: str, info: dict[str, Any], target: Path, ticker: _Ticker) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as sink:
            problem = self._stream(key, name, info, sink, ticker)
        if problem is not None:
            raise RemoteCorrupt(self.location, key, name, problem)

    # -- the interface's local-directory side: not for a remote -----------------------------------
    def fetch(self, key: str) -> Path:
        raise NotImplementedError(
            "a remote cache has no local directories: pull the key into the local store, then fetch it there"
        )

    def begin(self, key: str) -> Path:
        raise NotImplementedError(
            "steps write into the local store; a remote is filled by push() after the local commit"
        )

    def commit(self, tmp: Path, key: str, manifest: dict[str, Any], replace: bool = False) -> None:
        raise NotImplementedError(
            "steps commit to the local store; a remote is filled by push() after the local commit"
        )

    def abort(self, tmp: Path) -> None:
        raise NotImplementedError("a remote cache hands out no temporary directories (see begin)")

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def _writing(self, target: str) -> Iterator[IO[bytes]]:
        """A file to write `target` through, visible under its name only if the block completes."""
        if self.object_store:  # close, then commit or discard: the order of fsspec's own transactions
            f = self.fs.open(target, "wb", autocommit=False)
            try:
                yield f
            except BaseException:
                with suppress(Exception):
                    f.close()
                    f.discard()
                raise
            f.close()
            f.commit()
            return
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        partial = f"{target}.{uuid.uuid4().hex[:8]}{PARTIAL}"
        try:
            with self.fs.open(partial, "wb") as f:
                yield f
            self.fs.mv(partial, target)
        except BaseException:
            with suppress(Exception):
                self.fs.rm_file(partial)
            raise

    def _upload(self, key: str, name: str, source: Path, info: dict[str, Any], ticker: _Ticker) -> None:
        """Stream one local file up, hashing it on the way: a local file that no longer matches its
        manifest is not pushed (the upload is discarded)."""
        with self._writing(f"{self._dir(key)}/{name}") as target, open(source, "rb") as f:
            digest, done = hashlib.sha256(), 0
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                target.write(chunk)
                done += len(chunk)
                ticker.add(len(chunk))
            if (digest.hexdigest(), done) != (info["sha256"], info["size"]):
                raise RemoteError(
                    f"local artifact {key}: {name} differs from its manifest; not pushed "
                    "(tunepipe cache verify names the damage)"
                )

    def push(
        self,
        key: str,
        local_dir: Path,
        manifest: dict[str, Any],
        progress: Progress | None = None,
        replace: bool = False,
    ) -> int:
        """Upload a committed local artifact (its directory and manifest); the bytes moved.

        Files first, the manifest last. A key already on the remote is left alone (0 bytes) unless
        `replace` (a remote copy found damaged on pull), which hides it (manifest removed) first.
        """
        files = {name: {"sha256": info["sha256"], "size": info["size"]} for name, info in manifest["files"].items()}
        ours = {**manifest, "key": key, "files": files}
        ticker = _Ticker(progress, sum(info["size"] for info in files.values()))
        with self._reaching("push", writing=True):
            if replace:
                with suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self._dir(key)}/{MANIFEST}")
            elif self.has(key):
                return 0
            self._upload_all(key, Path(local_dir), files, ticker)
            theirs = self.lookup(key)
            if theirs is not None and _digests(theirs.manifest) == _digests(ours):
                return ticker.done  # another pusher committed the same bytes first
            if theirs is not None:  # other bytes, committed while we uploaded: ours may be mixed in
                ticker.total += ticker.total
                self._upload_all(key, Path(local_dir), files, ticker)
            with self._writing(f"{self._dir(key)}/{MANIFEST}") as f:
                f.write(json.dumps(ours, indent=2, sort_keys=True).encode())
        return ticker.done

    def _upload_all(self, key: str, local_dir: Path, files: dict[str, Any], ticker: _Ticker) -> None:
        for name, info in sorted(files.items()):
            self._upload(key, name, local_dir / name, info, ticker)

    def writable(self) -> bool:
        """Whether this remote accepts writes (probes by writing and removing a small file)."""
        probe = f"{self.root}/.tunepipe-write-probe.{uuid.uuid4().hex[:8]}"
        with self._reaching("write probe"):
            try:
                with self._writing(probe) as f:
                    f.write(b"tunepipe")
            except PermissionError:
                return False
            self.fs.rm_file(probe)
        return True

    def rm(self, key: str) -> bool:
        """Remove `key` from the remote, manifest first (so it is never half visible); whether it was there."""
        names = self._sizes(key)
        if not names:
            return False
        base = self._dir(key)
        with self._reaching("rm", writing=True):
            if MANIFEST in names:
                self.fs.rm_file(f"{base}/{MANIFEST}")
            with suppress(FileNotFoundError):  # another gc may be removing it too
                self.fs.rm(base, recursive=True)
            self.fs.invalidate_cache(base)
        return True

    def gc(self, keep: set[str], older_than_days: float | None = None) -> list[str]:
        """Remove the keys not in `keep` (and, with `older_than_days`, only those pushed longer ago);
        the removed keys. Leftovers of dead pushes (no manifest, or .partial files, a day old) go too.

        A pull in progress of a key removed here fails its check and builds locally instead.
        """
        removed = []
        for key, files in sorted(self._listing().items()):
            if MANIFEST in files:
                if key not in keep and self._old_enough(key, [MANIFEST], older_than_days):
                    self.rm(key)
                    removed.append(key)
                else:
                    self._remove_old_partials(key, [name for name in files if name.endswith(PARTIAL)])
            elif self._old_enough(key, list(files), LEFTOVER_AGE_S / 86400):
                self.rm(key)
        return removed

    def _remove_old_partials(self, key: str, names: list[str]) -> None:
        for name in names:
            if self._old_enough(key, [name], LEFTOVER_AGE_S / 86400):
                with self._reaching("gc", writing=True), suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self._dir(key)}/{name}")

    def _old_enough(self, key: str, names: list[str], days: float | None) -> bool:
        """Whether every named file of `key` was last written more than `days` ago (always, for None;
        never, when the filesystem cannot tell)."""
        if days is None:
            return True
        with self._reaching("gc"):
            for name in names:
                try:
                    modified = self.fs.modified(f"{self._dir(key)}/{name}")
                except (NotImplementedError, FileNotFoundError):
                    return False
                if modified.tzinfo is None:  # fsspec's naive datetimes are UTC
                    modified = modified.replace(tzinfo=timezone.utc)
                if time.time() - modified.timestamp() < days * 86400:
                    return False
        return True
