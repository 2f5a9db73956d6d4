"""A plan with its statuses as text (a tree), json, mermaid or dot. Each returns a string."""

from __future__ import annotations

import json

from ..errors import UserError
from .plan import Plan
from .status import CACHED, REMOTE, STALE, StepStatus

FORMATS = ("text", "json", "mermaid", "dot")


def render(
    plan: Plan, statuses: dict[str, StepStatus], fmt: str = "text", commands: dict[str, str] | None = None
) -> str:
    """Ends with a newline. `commands` ({step id: command line}, from a dry run) are shown with each step."""
    renderers = {"text": render_text, "json": render_json, "mermaid": render_mermaid, "dot": render_dot}
    if fmt not in renderers:
        raise UserError(f"unknown plan format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return renderers[fmt](plan, statuses, commands or {}) + "\n"


def render_text(plan: Plan, statuses: dict[str, StepStatus], commands: dict[str, str]) -> str:
    """Each step once, under its first dependency; a step with more names the others `(also after …)`."""
    children: dict[str | None, list[str]] = {}
    for step in plan.steps:
        children.setdefault(step.deps[0] if step.deps else None, []).append(step.id)
    width = max((len(step.id) for step in plan.steps), default=0) + 3 * _depth(plan)
    counts = {state: sum(1 for s in statuses.values() if s.state == state) for state in (CACHED, REMOTE, STALE)}
    remote = f", {counts[REMOTE]} on the remote" if counts[REMOTE] else ""
    lines = [f"{plan.name}: {len(plan.steps)} steps, {counts[CACHED]} cached{remote}, {counts[STALE]} stale"]

    def walk(step_id: str, prefix: str, branch: str, last: bool) -> None:
        step, status = plan.step(step_id), statuses[step_id]
        label = f"{prefix}{branch}{step.id}"
        state = status.state if status.state == CACHED else f"{status.state}: {status.reason}"
        also = f"  (also after {', '.join(step.deps[1:])})" if step.deps[1:] else ""
        lines.append(f"{label.ljust(width)}  {step.key[:12]}  {state}{also}")
        child_prefix = prefix + ("" if not branch else ("   " if last else "│  "))
        if step_id in commands:
            lines.append(f"{child_prefix}{'│  ' if children.get(step_id) else '   '}$ {commands[step_id]}")
        kids = children.get(step_id, [])
        for i, kid in enumerate(kids):
            walk(kid, child_prefix, "└─ " if i == len(kids) - 1 else "├─ ", i == len(kids) - 1)

    for root in children.get(None, []):
        walk(root, "", "", True)
    return "\n".join(lines)


def _depth(plan: Plan) -> int:
    depth: dict[str, int] = {}
    for step in plan.steps:
        depth[step.id] = 1 + depth[step.deps[0]] if step.deps else 0
    return max(depth.values(), default=0)


def render_json(plan: Plan, statuses: dict[str, StepStatus], commands: dict[str, str]) -> str:
    rows = []
    for step in plan.steps:
        status = statuses[step.id]
        row = {
            "id": step.id,
            "kind": step.kind,
            "key": step.key,
            "deps": step.deps,
            "inputs": step.inputs,
            "status": status.state,
            "reason": status.reason,
            "reasons": status.reasons,
            "params": step.key_params,
            "executor": step.executor.get("kind", "local"),
        }
        if step.id in commands:
            row["command"] = commands[step.id]
        rows.append(row)
    return json.dumps(rows, indent=2, ensure_ascii=False)


def render_mermaid(plan: Plan, statuses: dict[str, StepStatus], commands: dict[str, str]) -> str:
    lines = ["flowchart TD"]
    node = {}  # step id -> its mermaid node name: n<position in the plan>
    for i, step in enumerate(plan.steps):
        node.setdefault(step.id, f"n{i}")
    for step in plan.steps:
        status = statuses[step.id]
        label = f"{step.id}<br/>{status.state}"
        if status.state != CACHED:
            label += f"<br/><small>{status.reason}</small>"
        lines.append(f'    {node[step.id]}["{_escape_mermaid(label)}"]:::{status.state}')
    for step in plan.steps:
        for dep in step.deps:
            lines.append(f"    {node[dep]} --> {node[step.id]}")
    lines.append("    classDef cached fill:#d4edda,stroke:#28a745")
    lines.append("    classDef stale fill:#fff3cd,stroke:#d39e00")
    lines.append("    classDef remote fill:#d1ecf1,stroke:#17a2b8")
    return "\n".join(lines)


def _escape_mermaid(text: str) -> str:
    return text.replace('"', "#quot;")


def render_dot(plan: Plan, statuses: dict[str, StepStatus], commands: dict[str, str]) -> str:
    colours = {"cached": "#d4edda", "stale": "#fff3cd", "remote": "#d1ecf1"}
    lines = [f"digraph {json.dumps(plan.name)} {{", "    rankdir=TB;", '    node [shape=box, style="rounded,filled"];']
    for step in plan.steps:
        status = statuses[step.id]
        label = f"{step.id}\n{status.state}" + (f"\n{status.reason}" if status.state != CACHED else "")
        lines.append(
            f"    {json.dumps(step.id)} [label={json.dumps(label)}, fillcolor={json.dumps(colours[status.state])}];"
        )
    for step in plan.steps:
        for dep in step.deps:
            lines.append(f"    {json.dumps(dep)} -> {json.dumps(step.id)};")
    lines.append("}")
    return "\n".join(lines)
