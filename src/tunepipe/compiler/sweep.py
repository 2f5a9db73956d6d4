"""A sweep's points → one Plan whose steps are shared wherever their keys are equal.

Each point is the spec loaded with its own overrides (spec/sweep.py) and compiled as usual; then
the plans are merged: a step whose key another point already has is that step (data, template, a
shared pretrain run once), any other step is added with the point in its id (`train.sft@p3`), its
dependencies renamed to the merged steps. `plan.points` lists (point, {step id in the point's own
plan: step id in the merged plan}) for the summary table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .digest import MEMO_NAME, DigestMemo
from .plan import Plan, Step, compile_plan, plan_cache_dir


def compile_sweep(points: list, specs: list[dict], spec_path: Path, *, cache_dir: Path | None = None, **kwargs) -> Plan:
    cache_dir = plan_cache_dir(spec_path, cache_dir)
    memo = DigestMemo(cache_dir / MEMO_NAME)  # one snapshot of the inputs for every point: each read once
    plans = [compile_plan(data, spec_path, cache_dir=cache_dir, memo=memo, **kwargs) for data in specs]
    memo.save()
    everywhere = set.intersection(*({step.key for step in plan.steps} for plan in plans))
    first = plans[0]
    merged = Plan(
        name=first.name,
        spec_path=first.spec_path,
        cache_dir=first.cache_dir,
        seed=first.seed,
        remote=first.remote,
        push=first.push,
    )
    by_key: dict[str, Step] = {}
    for point, plan in zip(points, plans):
        ids: dict[str, str] = {}
        for step in plan.steps:
            if step.key not in by_key:
                new_id = step.id if step.key in everywhere else f"{step.id}@{point.name}"
                by_key[step.key] = dataclasses.replace(
                    step,
                    id=new_id,
                    deps=[ids[d] for d in step.deps],
                    inputs={role: ids[dep] for role, dep in step.inputs.items()},
                )
                merged.steps.append(by_key[step.key])
            ids[step.id] = by_key[step.key].id
        merged.points.append((point, ids))
    return merged


def compile_resolved(resolved, overrides: list, *, point: int | None = None, **kwargs) -> Plan:
    """The plan of a loaded spec: its sweep's merged plan, one point of it (`point`, 1-based), or the
    spec itself when it has no sweep. `overrides` are the command line's, applied to every point."""
    from ..errors import UserError
    from ..spec import sweep
    from ..spec.loader import load_spec

    if resolved.sweep is None:
        if point is not None:
            raise UserError("--point: the spec has no sweep: section")
        return compile_plan(resolved.data, resolved.path, **kwargs)
    chosen = sweep.points(resolved.sweep)
    if point is not None:
        if not 1 <= point <= len(chosen):
            raise UserError(f"--point {point}: the sweep has points 1 to {len(chosen)}")
        chosen = [chosen[point - 1]]
    file_facts: dict = {}  # the points' input files, read once
    specs = [
        load_spec(resolved.path, [*overrides, *sweep.overrides(p, resolved.data)], file_facts=file_facts).data
        for p in chosen
    ]
    if point is not None:
        return compile_plan(specs[0], resolved.path, **kwargs)
    return compile_sweep(chosen, specs, resolved.path, **kwargs)
