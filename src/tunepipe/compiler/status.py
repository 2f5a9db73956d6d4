"""Each step's status: cached (its key is in the store) or stale, and why, compared with tunepipe.lock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..store import ArtifactStore, open_store
from .lockfile import read_lock
from .plan import Plan, Step

CACHED, STALE, REMOTE = "cached", "stale", "remote"


@dataclass
class StepStatus:
    step: Step
    state: str  # CACHED | STALE
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def annotate(
    plan: Plan, store: ArtifactStore | None = None, lock: dict[str, Any] | None = None, remote=None
) -> dict[str, StepStatus]:
    """{step id: StepStatus}, in plan order. `lock` defaults to the plan's section of tunepipe.lock.
    With a remote cache, a step that only it holds (and whose inputs are there or here) is `remote`."""
    store = store or open_store(plan.cache_dir)
    if lock is None:
        lock = read_lock(plan.lock_path, plan.spec_path.name)
    statuses: dict[str, StepStatus] = {}
    for step in plan.steps:
        missing = [dep for dep in step.deps if statuses[dep].state not in (CACHED, REMOTE)]
        entry = remote.lookup(step.key) if remote is not None and not store.has(step.key) else None
        if entry is not None and not missing:
            statuses[step.id] = StepStatus(step, REMOTE, [f"on the remote ({entry.size / 1e6:.2f} MB)"])
        elif store.has(step.key) and not missing:
            statuses[step.id] = StepStatus(step, CACHED)
        elif store.has(step.key):
            # Built, but an artifact it reads is not: unusable until that one is rebuilt (same key, same bytes).
            statuses[step.id] = StepStatus(step, STALE, [f"needs {dep}, which is not built" for dep in missing])
        elif lock is None:
            statuses[step.id] = StepStatus(step, STALE, ["not built yet"])
        else:
            entry = lock["steps"].get(step.id)
            changes = lock_differences(plan, step, entry)
            statuses[step.id] = StepStatus(step, STALE, changes or ["not in the cache (unchanged since tunepipe.lock)"])
    return statuses


def frozen_violations(plan: Plan, lock: dict[str, Any] | None) -> dict[str, list[str]]:
    """{step id: reasons} for every step whose key differs from tunepipe.lock; empty when the plan is frozen."""
    if lock is None:
        return {"tunepipe.lock": [f"no entry for {plan.spec_path.name}: run without --frozen once and commit it"]}
    violations = {}
    for step in plan.steps:
        changes = lock_differences(plan, step, lock["steps"].get(step.id))
        if changes:
            violations[step.id] = changes
    for step_id in sorted(set(lock["steps"]) - {step.id for step in plan.steps}):
        violations[step_id] = ["removed from the spec"]
    return violations


def lock_differences(plan: Plan, step: Step, entry: dict[str, Any] | None) -> list[str]:
    """Why `step` differs from its lock entry, most specific first; empty when the key is the same."""
    if entry is None:
        return ["new step (not in tunepipe.lock)"]
    if entry.get("key") == step.key:
        return []
    reasons = []
    if entry.get("kind") != step.kind:
        reasons.append(f"kind {entry.get('kind')} → {step.kind}")
    if entry.get("stage_version") != step.stage_version:
        reasons.append(f"{step.kind} stage version {entry.get('stage_version')} → {step.stage_version}")
    old_params = entry.get("params", {})
    for name in sorted(set(old_params) | set(step.key_params)):
        old, new = old_params.get(name), step.key_params.get(name)
        if old != new:
            reasons.append(f"param {name}: {_show(old)} → {_show(new)}")
    old_inputs = entry.get("inputs", {})
    for role in sorted(set(old_inputs) | set(step.digests)):
        reasons += _input_changes(role, old_inputs.get(role), step.digests.get(role))
    old_upstream = entry.get("upstream", {})
    for role, dep in step.key_inputs.items():
        if old_upstream.get(role, {}).get("key") != step.upstream[role]:
            reasons.append(f"upstream {dep} changed")
    return reasons or ["cache key changed"]


def _input_changes(role: str, old: dict[str, str] | None, new: dict[str, str] | None) -> list[str]:
    if old == new:
        return []
    if old is None or new is None:
        return [f"input {role} {'added' if old is None else 'removed'}"]
    if "hub" in old or "hub" in new:
        return [f"input {role}: {old.get('hub', 'local files')} → {new.get('hub', 'local files')}"]
    names = sorted(set(old) | set(new))
    changed = [n for n in names if n in old and n in new and old[n] != new[n]]
    added = [n for n in names if n not in old]
    removed = [n for n in names if n not in new]
    parts = [
        f"{_few(changed)} changed" if changed else "",
        f"{_few(added)} added" if added else "",
        f"{_few(removed)} removed" if removed else "",
    ]
    return [f"input {role}: " + ", ".join(p for p in parts if p)]


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
