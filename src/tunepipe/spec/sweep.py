"""The `sweep:` section: one spec, several points, each a set of flag values.

    sweep:
      matrix:                                   # every combination of these values
        train.sft.learning_rate: [1.0e-3, 3.0e-3, 1.0e-2]
        train.sft.lora_rank: [8, 16]
      exclude: [{train.sft.learning_rate: 1.0e-3, train.sft.lora_rank: 16}]
      include: [{train.sft.learning_rate: 2.0e-2, train.sft.lora_rank: 32}]   # extra points

A path is `section.flag`, `section.NAME.flag` (a list entry by its name) or `section.N.flag` (by
position). Each point becomes the overrides `--set section.N.flag=value` of one load of the spec, so a
point is validated exactly like the file; the compiler then shares every step whose key is equal
across points (compiler/sweep.py). Light: pure Python.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .catalog import LIST_SECTIONS
from .naming import entry_names


@dataclass
class Point:
    name: str  # p1, p2, … in matrix order, then the included points
    values: dict[str, Any] = field(default_factory=dict)  # path as written -> value

    @property
    def label(self) -> str:
        return ", ".join(f"{path.rsplit('.', 1)[-1]}={_show(value)}" for path, value in self.values.items())


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


def points(sweep: Any) -> list[Point]:
    """The points of a `sweep:` mapping (raw YAML data), in order; a UserError for a malformed one."""
    if not isinstance(sweep, dict) or not set(sweep) <= {"matrix", "include", "exclude"}:
        raise UserError("sweep: expected a mapping with matrix: (and optionally include:, exclude:)")
    matrix = sweep.get("matrix") or {}
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise UserError("sweep.matrix: expected a mapping of flag paths to non-empty lists of values")
    excluded = [dict(e) for e in sweep.get("exclude") or []]
    combos = [dict(zip(matrix, values)) for values in itertools.product(*matrix.values())] if matrix else []
    combos = [c for c in combos if not any(all(c.get(k) == v for k, v in e.items()) for e in excluded)]
    for extra in sweep.get("include") or []:
        if not isinstance(extra, dict) or not extra:
            raise UserError("sweep.include: each entry is a mapping of flag paths to values")
        combos.append(dict(extra))
    if not combos:
        raise UserError("sweep: no points (the matrix is empty, or exclude removes every combination)")
    return [Point(f"p{i + 1}", combo) for i, combo in enumerate(combos)]


def overrides(point: Point, data: dict[str, Any]):
    """`point` as `--set` overrides of the spec whose resolved data is `data`."""
    from .loader import Override

    out = []
    for path, value in point.values.items():
        section, index, flag = _target(path, data)
        out.append(
            Override(
                key=flag,
                value=json.dumps(value),
                label=f"sweep {point.name}: {path}={_show(value)}",
                section=section,
                index=index,
            )
        )
    return out


def _target(path: str, data: dict[str, Any]) -> tuple[str, int | None, str]:
    parts = str(path).split(".")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) != 3:
        raise UserError(f"sweep: {path!r}: expected section.flag, section.NAME.flag or section.N.flag")
    section, entry, flag = parts
    if section not in LIST_SECTIONS:
        raise UserError(f"sweep: {path!r}: only {', '.join(LIST_SECTIONS)} have entries")
    if entry.isdigit():
        return section, int(entry), flag
    names = entry_names(section, data.get(section) or [])
    if entry not in names:
        raise UserError(f"sweep: {path!r}: no {section} entry named {entry!r} (entries: {', '.join(names) or 'none'})")
    return section, names.index(entry), flag
