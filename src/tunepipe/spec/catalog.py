"""The flag catalog (flags.yaml) loaded into plain objects. Everything about a flag is read from here."""

from __future__ import annotations

import difflib
import os
import pickle
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any

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
    # Set when this version cannot do what the flag asks: a reason (for any value but the default),
    # or {value: reason} for enum values. `tunepipe validate` reports it.
    not_integrated: Any = None
    # {other flag: {its value: [choices]}}: choices that depend on another flag (export `type` by `format`).
    choices_by: Any = None
    # {export type: value}: the value a null flag takes for an export of that type (verify thresholds).
    by_type: Any = None
    # Other names of this flag (newer transformers / LLaMA-Factory spellings), accepted everywhere.
    aliases: tuple = ()
    # Executor options: the executor kinds that take this one (empty: every kind).
    executors: tuple = ()

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
    aliases: dict[str, str] = field(default_factory=dict)  # another tool's or version's name -> the flag

    def section_flags(self, section: str) -> list[Flag]:
        return self.by_section.get(section, [])

    @cached_property
    def flags_by_kind(self) -> dict[str, list[Flag]]:
        """Step kind -> the flags its steps read (their `used_by` names it), in catalog order."""
        by_kind: dict[str, list[Flag]] = {}
        for flag in self.flags.values():
            for kind in flag.used_by:
                by_kind.setdefault(kind, []).append(flag)
        return by_kind

    def resolve_name(self, key: str) -> tuple[str, bool] | None:
        """Map a spelling (snake, kebab, no_X) to (flag name, negated) or None."""
        snake = key.replace("-", "_")
        if snake in self.flags:
            return snake, False
        if snake in self.negations:
            return self.negations[snake], True
        if snake in self.aliases:
            return self.aliases[snake], False
        return None

    def suggest(self, key: str, candidates: list[str] | None = None) -> str | None:
        snake = key.replace("-", "_")
        pool = candidates if candidates is not None else [*self.flags, *self.negations]
        match = difflib.get_close_matches(snake, pool, n=1, cutoff=0.75)
        return match[0] if match else None


def _as_tuple(value: Any) -> tuple | None:
    return tuple(value) if value is not None else None


@cache
def load_catalog() -> Catalog:
    """The catalog, parsed once per edit of flags.yaml.

    Parsing the YAML takes ~25 ms of every `tunepipe validate`; like Python's own .pyc files, the
    parsed catalog is kept in __pycache__ beside the source, keyed by its mtime and size, and is
    simply rebuilt when that cannot be read or written."""
    source = Path(str(resources.files("tunepipe.spec").joinpath("flags.yaml")))
    stat = source.stat()
    cached = source.parent / "__pycache__" / f"flags.{stat.st_mtime_ns}.{stat.st_size}.pickle"
    try:
        return pickle.loads(cached.read_bytes())
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        pass
    catalog = parse_catalog(source.read_text(encoding="utf-8"))
    try:
        cached.parent.mkdir(exist_ok=True)
        for stale in cached.parent.glob("flags.*.pickle"):
            stale.unlink(missing_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(pickle.dumps(catalog))
        os.replace(partial, cached)
    except OSError:  # a read-only install: parse every time
        pass
    return catalog


def parse_catalog(text: str) -> Catalog:
    import yaml

    raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    sections = {name: info.get("en", "") for name, info in raw["sections"].items()}
    flags: dict[str, Flag] = {}
    for entry in raw["flags"]:
        entry = dict(entry)
        entry["choices"] = _as_tuple(entry.get("choices"))
        entry["range"] = _as_tuple(entry.get("range"))
        entry["examples"] = _as_tuple(entry.get("examples"))
        entry["used_by"] = tuple(entry.get("used_by") or [entry["section"]])
        entry["aliases"] = tuple(entry.get("aliases") or ())
        entry["executors"] = tuple(entry.get("executors") or ())
        flag = Flag(**entry)
        if flag.name in flags:
            raise ValueError(f"flags.yaml: flag {flag.name} is defined twice")
        flags[flag.name] = flag
    catalog = Catalog(sections=sections, flags=flags)
    for flag in flags.values():
        catalog.by_section.setdefault(flag.section, []).append(flag)
        if flag.negatable:
            catalog.negations[f"no_{flag.name}"] = flag.name
        for alias in flag.aliases:
            catalog.aliases[alias] = flag.name
    return catalog
