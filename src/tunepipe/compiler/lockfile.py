"""tunepipe.lock: what the last successful run built, per step. Sorted JSON, one value per line.

    {"version": 1, "name": ..., "steps": {"<step id>": {
        "kind", "key", "stage_version", "params" (key params), "inputs" ({role: {name: sha256}}),
        "upstream" ({role: {"step", "key"}}), "outputs" ({"digest", "files", "bytes"}), "versions"}}}

No timestamps or absolute paths: the same build gives the same file on any machine, so a diff of it
in review shows exactly what changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..runtime.store import STEP_LOG, Store, tree_digest
from .plan import Plan, Step

LOCK_VERSION = 1


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock file's content, or None when there is none."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        lock = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path}: not a valid lock file ({e}); delete it to start afresh") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("steps"), dict):
        raise UserError(f"{path}: not a valid lock file (no steps); delete it to start afresh")
    return lock


def keys_in_lock(path: Path) -> set[str]:
    lock = read_lock(path) or {"steps": {}}
    return {entry["key"] for entry in lock["steps"].values() if "key" in entry}


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
        "upstream": {role: {"step": dep, "key": plan.step(dep).key} for role, dep in step.inputs.items()},
        "outputs": output_digest(manifest),
        "versions": manifest.get("versions", {}),
    }


def write_lock(plan: Plan, store: Store) -> bool:
    """Record every plan step whose artifact is in the store; a step not built now keeps its old entry.

    Returns whether the file changed (it is not rewritten when identical).
    """
    previous = (read_lock(plan.lock_path) or {}).get("steps", {})
    steps = {}
    for step in plan.steps:
        manifest = store.manifest(step.key)
        if manifest is not None:
            steps[step.id] = step_entry(plan, step, manifest)
        elif step.id in previous:
            steps[step.id] = previous[step.id]
    text = json.dumps({"version": LOCK_VERSION, "name": plan.name, "steps": steps}, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    try:
        if plan.lock_path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = plan.lock_path.with_name(f".{plan.lock_path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, plan.lock_path)
    return True
