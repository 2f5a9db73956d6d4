"""The flag catalog (flags.yaml) loaded into plain objects. Everything about a flag is read from here."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

# Sections whose presence in a spec adds a stage to the pipeline; the others only configure.
STAGE_SECTIONS = ("data", "template", "train", "merge", "quantize", "export", "infer")
# Sections written as a list of targets (a single mapping is a one-element list).
LIST_SECTIONS = ("train", "quantize", "export")
TOP_LEVEL = "pipeline"


@dataclass(frozen=True)
class Flag:
    name: str
    section: str
    type: str
    default: Any = None
    choices: tuple | None = None
    range: tuple | None = None
    affects: str = "artifact"
    used_by: tuple[str, ...] = ()
    negatable: bool = False
    origin: str = "seed"
    zh: str = ""
    en: str = ""
    examples: tuple | None = None
    seed_notes: str | None = None

    @property
    def kebab(self) -> str:
        return self.name.replace("_", "-")

    @property
    def negation(self) -> str | None:
        return f"no_{self.name}" if self.negatable else None


@dataclass
class Catalog:
    sections: dict[str, str]
    flags: dict[str, Flag]
    by_section: dict[str, list[Flag]] = field(default_factory=dict)
    negations: dict[str, str] = field(default_factory=dict)  # no_X -> X

    def section_flags(self, section: str) -> list[Flag]:
        return self.by_section.get(section, [])

    def resolve_name(self, key: str) -> tuple[str, bool] | None:
        """Map a spelling (snake, kebab, no_X) to (flag name, negated) or None."""
        snake = key.replace("-", "_")
        if snake in self.flags:
            return snake, False
        if snake in self.negations:
            return self.negations[snake], True
        return None

    def suggest(self, key: str, candidates: list[str] | None = None) -> str | None:
        snake = key.replace("-", "_")
        pool = candidates if candidates is not None else [*self.flags, *self.negations]
        match = difflib.get_close_matches(snake, pool, n=1, cutoff=0.75)
        return match[0] if match else None


def _as_tuple(value: Any) -> tuple | None:
    return tuple(value) if value is not None else None


@lru_cache(maxsize=None)
def load_catalog() -> Catalog:
    text = resources.files("tunepipe.spec").joinpath("flags.yaml").read_text(encoding="utf-8")
    raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    sections = {name: info.get("en", "") for name, info in raw["sections"].items()}
    flags: dict[str, Flag] = {}
    for entry in raw["flags"]:
        entry = dict(entry)
        entry["choices"] = _as_tuple(entry.get("choices"))
        entry["range"] = _as_tuple(entry.get("range"))
        entry["examples"] = _as_tuple(entry.get("examples"))
        entry["used_by"] = tuple(entry.get("used_by") or [entry["section"]])
        flag = Flag(**entry)
        if flag.name in flags:
            raise ValueError(f"flags.yaml: flag {flag.name} is defined twice")
        flags[flag.name] = flag
    catalog = Catalog(sections=sections, flags=flags)
    for flag in flags.values():
        catalog.by_section.setdefault(flag.section, []).append(flag)
        if flag.negatable:
            catalog.negations[f"no_{flag.name}"] = flag.name
    return catalog
