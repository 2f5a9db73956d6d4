"""Content digests of a step's local inputs, memoised so that re-planning over a big model is instant.

A file's sha256 is remembered under its (absolute path, size, mtime_ns, inode), as DVC does: an
unchanged stat means an unchanged file, and a re-hash happens only when one of them moves. The memo
is a small JSON file in the cache directory; it is only an accelerator, so a missing, corrupt or
read-only memo just means hashing again.

What enters a cache key is `{relative name: sha256}` per input role: never an absolute path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..runtime.store import sha256_file

MEMO_NAME = "digests.json"


class DigestMemo:
    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

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

        A name may be a directory, whose files are all included.
        """
        digests: dict[str, str] = {}
        for name in names if names is not None else [""]:
            start = root / name
            if start.is_file():
                digests[Path(name).as_posix()] = self.file(start)
                continue
            if not start.is_dir():
                raise UserError(f"input not found: {start}")
            for dirpath, dirnames, filenames in os.walk(start, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in filenames:
                    if not filename.startswith("."):
                        file = Path(dirpath, filename)
                        digests[file.relative_to(root).as_posix()] = self.file(file)
        return dict(sorted(digests.items()))

    def save(self) -> None:
        if not self.dirty or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, separators=(",", ":")))
            os.replace(tmp, self.path)  # concurrent planners: last writer wins, every version valid
        except OSError:
            pass
        self.dirty = False


def dataset_files(dataset_dir: Path, datasets: list[str] | None) -> list[str] | None:
    """Names, relative to dataset_dir, of `dataset_info.json` and the files of the named datasets.

    None (= digest the whole directory) when the names cannot be resolved: no dataset_info.json,
    an unknown dataset, or one that does not name a local file.
    """
    info_path = dataset_dir / "dataset_info.json"
    if not datasets or not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
    except ValueError:
        return None
    names = ["dataset_info.json"]
    for dataset in datasets:
        entry = info.get(dataset) if isinstance(info, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not file_name or not (dataset_dir / file_name).exists():
            if isinstance(entry, dict) and any(k.endswith("_url") for k in entry):
                continue  # a hub dataset: its dataset_info.json entry is all we can digest
            return None
        names.append(file_name)
    return sorted(set(names))
