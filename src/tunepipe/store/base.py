"""What every artifact store offers: committed artifacts by key, each with its manifest. Light: no torch.

An artifact is a directory of files plus `manifest.json` (written last) listing every file with its
sha256 and size. The trust rule, for every implementation: a key is built iff its manifest exists,
names that key, and every listed file is there with its size (`has`, a cheap check); `verify`
re-hashes. Nothing but the runner, the worker and the `cache` commands touch a store; stage code
receives local directories (`fetch`) and never computes a store path.

The local implementation is `store/local.py` (`open_store` in `store/__init__.py` opens one); a
shared filesystem (SLURM) is the same local store on a shared path, and a remote cache (fsspec) is
another implementation of this interface.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STEP_LOG = "step.log"  # the step's output, copied into its artifact by the worker
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(files: dict[str, str]) -> str:
    """One digest for a set of files given as {relative name: sha256}."""
    return hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items())).encode()).hexdigest()


@dataclass
class Entry:
    key: str
    manifest: dict[str, Any]

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest.get("files", {}).values())


class ArtifactStore(ABC):
    """Committed artifacts by key. `location` names the store in messages (a path or URL)."""

    location: str

    @abstractmethod
    def manifest(self, key: str) -> dict[str, Any] | None:
        """The manifest of a committed key, or None when the key is not (validly) built."""

    @abstractmethod
    def has(self, key: str) -> bool:
        """Built and intact by a cheap check (manifest valid, every file present with its size)."""

    @abstractmethod
    def fetch(self, key: str) -> Path:
        """A local directory holding the artifact's files (FileNotFoundError when not built)."""

    @abstractmethod
    def begin(self, key: str) -> Path:
        """A fresh private directory to write `key`'s artifact into, then `commit` or `abort`."""

    @abstractmethod
    def commit(self, tmp: Path, key: str, manifest: dict[str, Any], replace: bool = False) -> None:
        """Hash `tmp`'s files into the manifest and make the artifact visible atomically."""

    @abstractmethod
    def abort(self, tmp: Path) -> None:
        """Discard a directory from `begin` (a no-op after a commit moved it away)."""

    @abstractmethod
    def ls(self) -> list[Entry]:
        """Every committed artifact."""

    @abstractmethod
    def verify(self, key: str) -> list[str]:
        """Re-hash a committed artifact; its problems (empty list = intact)."""

    @abstractmethod
    def rm(self, key: str) -> bool:
        """Remove an artifact; whether there was one."""
