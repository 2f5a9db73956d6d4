"""The artifact store (interface in `base.py`, the local implementation in `local.py`). Light: no torch.

`open_store(root)` is the one way to open one; only the runner, the worker and the `cache` commands
do (the compiler asks it whether a key is built). Stage code gets local directories, never a store.
"""

from __future__ import annotations

from pathlib import Path

from .base import MANIFEST, STEP_LOG, ArtifactStore, Entry, sha256_file, tree_digest
from .local import LocalStore, Scratch, default_cache_dir, ensure_root

__all__ = [
    "MANIFEST",
    "STEP_LOG",
    "ArtifactStore",
    "Entry",
    "LocalStore",
    "Scratch",
    "default_cache_dir",
    "ensure_root",
    "open_store",
    "sha256_file",
    "tree_digest",
]


def open_store(root: Path) -> LocalStore:
    """The store at `root` (a directory; created on first commit)."""
    return LocalStore(Path(root))
