"""Content digests of a step's local inputs, memoised so that re-planning over a big model is instant.

A file's sha256 is remembered under its (absolute path, size, mtime_ns, inode), as DVC does: an
unchanged stat means an unchanged file, and a re-hash happens only when one of them moves. The memo
is a small JSON file in the cache directory; it is only an accelerator, so a missing, corrupt or
read-only memo just means hashing again. Within one memo's life (one plan, or every point of a
sweep) a directory is walked once: its inputs are a snapshot taken when planning.

What enters a cache key is `{relative name: sha256}` per input role: never an absolute path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..store import ensure_root, sha256_file

MEMO_NAME = "digests.json"


class DigestMemo:
    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        self.trees: dict[tuple, dict[str, str]] = {}  # (root, names) -> tree(): each directory walked once
        self.located: dict[str, tuple[Path, bool] | None] = {}  # locate(): each input path resolved once
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def locate(self, path: Path) -> tuple[Path, bool] | None:
        """(its real path, whether it is a file) for an input path that exists, else None."""
        if str(path) not in self.located:
            self.located[str(path)] = (path.resolve(), path.is_file()) if path.exists() else None
        return self.located[str(path)]

    def file(self, path: Path) -> str:
        """sha256 of a file's content."""
        path = path.resolve()
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        cached = self.entries.get(str(path))
        if cached is not None and cached[:3] == signature:
            return cached[3]
        sha = sha256_file(path)
        self.entries[str(path)] = [*signature, sha]
        self.dirty = True
        return sha

    def tree(self, root: Path, names: list[str] | None = None) -> dict[str, str]:
        """{relative posix name: sha256} for the files under `root` (all but hidden ones, or `names`).

        A name may be a directory, whose files are all included. Hidden names (`.tunepipe/`, `.git`) and
        lock files (`*.lock`: tunepipe.lock is the spec's own output) are never digested. A symlink loop
        is walked once; a dangling link or an unreadable file is a UserError naming it.
        """
        signature = (str(root), None if names is None else tuple(names))
        if signature not in self.trees:
            self.trees[signature] = self._walk(root, names)
        return dict(self.trees[signature])

    def dataset_tree(self, dataset_dir: Path, datasets) -> dict[str, str]:
        """tree() of what the data stage reads in `dataset_dir` for `data.dataset` (dataset_files)."""
        signature = ("datasets", str(dataset_dir), tuple(dataset_names(datasets)))
        if signature not in self.trees:
            self.trees[signature] = self.tree(dataset_dir, dataset_files(dataset_dir, datasets))
        return dict(self.trees[signature])

    def _walk(self, root: Path, names: list[str] | None) -> dict[str, str]:
        digests: dict[str, str] = {}
        for name in names if names is not None else [""]:
            start = file = root / name
            try:
                if start.is_file():
                    digests[Path(name).as_posix()] = self.file(start)
                    continue
                if not start.is_dir():
                    raise UserError(f"input not found: {start}")
                file = start
                visited = {os.path.realpath(start)}
                for dirpath, dirnames, filenames in os.walk(start, followlinks=True, onerror=_raise):
                    kept = []
                    for d in sorted(dirnames):
                        real = os.path.realpath(os.path.join(dirpath, d))
                        if not d.startswith(".") and real not in visited:  # a link back up would loop forever
                            visited.add(real)
                            kept.append(d)
                    dirnames[:] = kept
                    for filename in filenames:
                        if not _skipped(filename):
                            file = Path(dirpath, filename)
                            digests[file.relative_to(root).as_posix()] = self.file(file)
            except (OSError, RuntimeError) as e:  # RuntimeError: Path.resolve on a symlink loop
                filename = getattr(e, "filename", None)
                also = f" ({filename})" if filename and str(filename) != str(file) else ""
                raise UserError(
                    f"cannot read input {file}: {getattr(e, 'strerror', None) or e}{also}",
                    ["a dangling symlink, a symlink loop or an unreadable file; fix or remove it"],
                ) from None
        return dict(sorted(digests.items()))

    def save(self) -> None:
        if not self.dirty or self.path is None:
            return
        try:
            ensure_root(self.path.parent)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, separators=(",", ":")))
            os.replace(tmp, self.path)  # concurrent planners: last writer wins, every version valid
        except OSError:
            pass
        self.dirty = False


def _skipped(name: str) -> bool:
    """Names never digested: hidden files, and lock files (the spec's own tunepipe.lock)."""
    return name.startswith(".") or name.endswith(".lock")


def _raise(error: OSError) -> None:
    raise error


def dataset_names(datasets) -> list[str]:
    """`data.dataset` as a list: a list, or a comma-separated string (as the data stage reads it)."""
    if not datasets:
        return []
    if isinstance(datasets, str):
        return [n.strip() for n in datasets.split(",") if n.strip()]
    return [str(n) for n in datasets]


def dataset_files(dataset_dir: Path, datasets) -> list[str]:
    """Names, relative to dataset_dir, of the files the data stage reads for `data.dataset`.

    `dataset_info.json` when it exists, and per dataset (runtime/datasets.py `resolve`): its registry
    entry's `file_name` (a file or a directory inside dataset_dir), else a bare file or directory of
    that name inside dataset_dir. A hub entry adds nothing but its registry entry; a name that resolves
    to nothing (the data stage will say so) or escapes dataset_dir adds nothing either. Never the
    whole directory: it may hold the spec, tunepipe.lock and .tunepipe/.
    """
    dataset_dir = Path(dataset_dir)
    names = []
    info: dict = {}
    info_path = dataset_dir / "dataset_info.json"
    if info_path.is_file():
        names.append("dataset_info.json")
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict):
            info = {}
    for dataset in dataset_names(datasets):
        entry = info.get(dataset)
        if entry is None:
            file_name = dataset  # a bare file (or directory) inside dataset_dir
        elif isinstance(entry, dict) and entry.get("file_name"):
            file_name = str(entry["file_name"])
        else:
            continue  # a hub dataset or a malformed entry: dataset_info.json is all there is to digest
        relative = _inside(dataset_dir, file_name)
        if relative is not None and relative != "." and (dataset_dir / relative).exists():
            names.append(relative)
    return sorted(set(names))


def _inside(dataset_dir: Path, file_name: str) -> str | None:
    """`file_name` relative to dataset_dir when it stays inside it (as runtime/datasets.py `inside`), else None."""
    root = dataset_dir.resolve()
    try:
        path = (root / file_name).resolve()
    except (OSError, RuntimeError):
        return None
    if path != root and root not in path.parents:
        return None
    return path.relative_to(root).as_posix()
