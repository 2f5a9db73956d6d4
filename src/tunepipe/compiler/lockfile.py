"""tunepipe.lock: what the last successful run built, per spec file and step. Sorted JSON, one value per line.

One file beside the specs, one section per spec file of that directory, so that running one spec
never rewrites what another one locked:

    {"version": 2, "specs": {"<spec file name>": {"name": ..., "steps": {"<step id>": {
        "kind", "key", "stage_version", "params" (key params), "inputs" ({role: {name: sha256}}),
        "upstream" ({role: {"step", "key"}}), "outputs" ({"digest", "files", "bytes"}), "versions"}}}}}

A version 1 file (`{"version": 1, "name", "steps"}`, one spec) reads as the section of whichever
spec asks, and is rewritten in the version 2 form by the next write.

No timestamps or absolute paths: the same build gives the same file on any machine, so a diff of it
in review shows exactly what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..store import STEP_LOG, ArtifactStore, tree_digest
from .plan import Plan, Step

LOCK_VERSION = 2


def read_lock_file(path: Path) -> dict[str, Any] | None:
    """The whole lock file, as `{"version", "specs": {spec file: section}}` (a version 1 file under
    the key None), or None when there is none."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        lock = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path}: not a valid lock file ({e}); delete it to start afresh") from None
    if isinstance(lock, dict) and isinstance(lock.get("steps"), dict) and "specs" not in lock:
        return {"version": lock.get("version"), "specs": {None: lock}}  # version 1: one spec's steps
    if (
        not isinstance(lock, dict)
        or not isinstance(lock.get("specs"), dict)
        or not all(
            isinstance(section, dict) and isinstance(section.get("steps"), dict) for section in lock["specs"].values()
        )
    ):
        raise UserError(f"{path}: not a valid lock file (no specs with steps); delete it to start afresh")
    return lock


def read_lock(path: Path, spec_file: str) -> dict[str, Any] | None:
    """The section of `spec_file` (a spec's file name) in the lock file: `{"name", "steps"}`, or None."""
    lock = read_lock_file(path)
    if lock is None:
        return None
    specs = lock["specs"]
    return specs.get(spec_file) or specs.get(None)


def keys_in_lock(path: Path, spec_file: str | None = None) -> set[str]:
    """Keys the lock file names: of one spec's section, or (None) of every spec in it."""
    lock = read_lock_file(path) or {"specs": {}}
    sections = lock["specs"].values() if spec_file is None else [read_lock(path, spec_file) or {"steps": {}}]
    return {entry["key"] for section in sections for entry in section["steps"].values() if "key" in entry}


def output_digest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a step produced, as one digest. The step's log is left out: it holds timestamps."""
    files = {name: info for name, info in manifest.get("files", {}).items() if name != STEP_LOG}
    return {
        "digest": tree_digest({name: info["sha256"] for name, info in files.items()}),
        "files": len(files),
        "bytes": sum(info["size"] for info in files.values()),
    }


def step_entry(plan: Plan, step: Step, manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": step.kind,
        "key": step.key,
        "stage_version": step.stage_version,
        "params": step.key_params,
        "inputs": step.digests,
        "upstream": {role: {"step": dep, "key": plan.step(dep).key} for role, dep in step.key_inputs.items()},
        "outputs": output_digest(manifest),
        "versions": manifest.get("versions", {}),
    }


def write_lock(plan: Plan, store: ArtifactStore, remote: ArtifactStore | None = None) -> bool:
    """Record every plan step whose artifact is in the store (or, not pulled, on the remote); a step
    not built now keeps its old entry.

    Returns whether the file changed (it is not rewritten when identical).
    """
    lock = read_lock_file(plan.lock_path) or {"specs": {}}
    if lock.get("version") == LOCK_VERSION and lock["specs"].get(plan.spec_path.name) == _section(
        plan, store, remote, lock
    ):
        return False  # unchanged (a cached run): nothing to write, no file lock to take
    # Two specs of one directory may finish at once: the read-modify-write of the file is serialised,
    # by a lock in the temp directory (the cache may be read-only: a team cache, a login node).
    from filelock import FileLock

    name = hashlib.sha256(str(plan.lock_path).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"tunepipe-lockfile-{name}.lock")):
        return _write_lock(plan, store, remote)


def _section(plan: Plan, store: ArtifactStore, remote: ArtifactStore | None, lock: dict[str, Any]) -> dict[str, Any]:
    """The plan's section of the lock file `lock` (as read) once this run is recorded."""
    previous = (lock["specs"].get(plan.spec_path.name) or lock["specs"].get(None) or {}).get("steps", {})
    steps = {}
    for step in plan.steps:
        manifest = store.manifest(step.key)
        if manifest is None and remote is not None:  # left on the remote: nothing downstream needed it here
            manifest = remote.manifest(step.key)
        if manifest is not None:
            steps[step.id] = step_entry(plan, step, manifest)
        elif step.id in previous:
            steps[step.id] = previous[step.id]
    return {"name": plan.name, "steps": steps}


def _write_lock(plan: Plan, store: ArtifactStore, remote: ArtifactStore | None = None) -> bool:
    lock = read_lock_file(plan.lock_path) or {"specs": {}}  # again, under the file lock
    specs = {name: other for name, other in lock["specs"].items() if name is not None}  # the others' sections stay
    specs[plan.spec_path.name] = _section(plan, store, remote, lock)
    text = json.dumps({"version": LOCK_VERSION, "specs": specs}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        if plan.lock_path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = plan.lock_path.with_name(f".{plan.lock_path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, plan.lock_path)
    return True
