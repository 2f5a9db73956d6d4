"""Load a spec file: YAML with positions → normalised sections → overrides → pydantic → rules.

Every problem is collected as a Diagnostic with FILE:LINE:COL, so `tunepipe validate` reports all of
them at once. The result is the resolved spec of docs/internals.md: snake_case keys, defaults filled,
`no_X` folded into `X`, comma lists as lists, list sections always lists.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent

from ..errors import UserError
from .catalog import LIST_SECTIONS, STAGE_SECTIONS, TOP_LEVEL, Catalog, Flag, load_catalog
from .models import describe_type, section_model
from .paths import read_text

# Keys a stage entry may hold besides its section's flags: a per-stage executor override, and (train
# entries only) a data override so that e.g. a `pt` step reads another dataset than the `sft` step.
NESTED_SECTIONS = {"executor": STAGE_SECTIONS, "data": ("train",)}
# Entries of list sections may carry `name: NAME`, which names their step (train.NAME); not a flag.
STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# The most nodes all the aliases of one YAML document may stand for once expanded. A spec that shares a
# block or two with anchors needs a few hundred; nested aliases (`b: &b [*a, *a, …]`) multiply, and a
# few hundred bytes of them would stand for millions of values.
MAX_ALIAS_NODES = 10_000


@dataclass(frozen=True)
class Location:
    source: str
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.col}" if self.line is not None else self.source


@dataclass
class Diagnostic:
    location: Location
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else "warning: "
        where = f"{self.path}: " if self.path else ""
        return f"{self.location}: {prefix}{where}{self.message}"


class SpecError(UserError):
    def __init__(self, diagnostics: list[Diagnostic]):
        errors = [d for d in diagnostics if d.severity == "error"]
        noun = "error" if len(errors) == 1 else "errors"
        super().__init__(f"{len(errors)} {noun} in spec", [str(d) for d in diagnostics])
        self.diagnostics = diagnostics


@dataclass
class Override:
    """One CLI override: `--lora-rank 16` (section=None) or `--set train.1.lora_rank=16`."""

    key: str
    value: str | None  # None: a bare switch (`--fp16`, `--no-use-cache`)
    label: str
    section: str | None = None
    index: int | None = None


@dataclass
class ResolvedSpec:
    path: Path
    data: dict[str, Any]
    explicit: set[tuple] = field(default_factory=set)  # paths the user set (file or override)
    locations: dict[tuple, Location] = field(default_factory=dict)
    warnings: list[Diagnostic] = field(default_factory=list)
    indexed: set[str] = field(default_factory=set)  # list sections with several entries: named train[1]
    sweep: Any = None  # the `sweep:` section as written (spec/sweep.py), None without one

    @property
    def spec_dir(self) -> Path:
        return self.path.parent


def show_path(path: tuple, indexed: set[str]) -> str:
    """How a key path is named in messages: train.lora_rank for a single entry, train[1].lora_rank among several."""
    if len(path) > 1 and isinstance(path[1], int) and path[0] not in indexed:
        path = (path[0], *path[2:])
    return display_path(path)


def display_path(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def plain(value: Any) -> Any:
    """ruamel's round-trip scalars (ScalarBoolean is an int!) → plain Python values."""
    if isinstance(value, bool) or value is None:
        return value
    type_name = type(value).__name__
    if type_name == "ScalarBoolean":
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value  # dates and other YAML types: the model's type check will name them


class AliasExpansionError(MarkedYAMLError):
    """A YAML document whose aliases expand beyond MAX_ALIAS_NODES, or an alias inside its own anchor."""


class BoundedComposer(Composer):
    """ruamel's composer, counting the nodes each alias stands for as it resolves it.

    The composed graph shares an anchored node between its aliases, but everything that walks the
    document afterwards (the loader, pydantic, the compiler's JSON) sees one copy per alias; so the
    expanded size is what counts, and it is measured here, before anything is constructed."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.expanded: dict[int, int] = {}  # id(node) -> nodes it stands for, counted once composed
        self.composed = 0  # nodes composed so far, aliases counted expanded
        self.aliased = 0  # of those, nodes that aliases stand for

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.parser.check_event(AliasEvent):
            event = self.parser.peek_event()
            node = super().compose_node(parent, index)
            size = self.expanded.get(id(node))
            if size is None:  # its anchor is still being composed: the alias is inside it
                raise AliasExpansionError(
                    None,
                    None,
                    f"alias *{event.anchor} is inside its own anchor &{event.anchor}, so it would expand forever",
                    event.start_mark,
                )
            self.composed += size
            self.aliased += size
            if self.aliased > MAX_ALIAS_NODES:
                raise AliasExpansionError(
                    None,
                    None,
                    f"YAML aliases expand to more than {MAX_ALIAS_NODES} nodes; "
                    "write the values out or use fewer nested aliases",
                    event.start_mark,
                )
            return node
        before = self.composed
        node = super().compose_node(parent, index)
        self.composed += 1
        self.expanded[id(node)] = self.composed - before
        return node


def bounded_yaml(typ: str = "rt") -> YAML:
    """A ruamel YAML loader (pure Python) that refuses alias expansion beyond MAX_ALIAS_NODES."""
    yaml = YAML(typ=typ, pure=True)
    yaml.Composer = BoundedComposer
    return yaml


class _Loader:
    def __init__(self, source: str, catalog: Catalog):
        self.source = source
        self.catalog = catalog
        self.diagnostics: list[Diagnostic] = []
        self.locations: dict[tuple, Location] = {}
        self.explicit: set[tuple] = set()
        self.indexed: set[str] = set()  # list sections with several entries
        self.sweep: Any = None  # the `sweep:` section, kept as written

    # -- reporting -------------------------------------------------------------------------------
    def error(self, location: Location, path: tuple, message: str, severity: str = "error") -> None:
        self.diagnostics.append(Diagnostic(location, self.show(path), message, severity))

    def show(self, path: tuple) -> str:
        return show_path(path, self.indexed)

    def key_location(self, node: Any, key: Any) -> Location:
        try:
            line, col = node.lc.key(key)
            return Location(self.source, line + 1, col + 1)
        except Exception:  # noqa: BLE001 - positions are best effort for odd nodes
            return self.node_location(node)

    def item_location(self, node: Any, index: int) -> Location:
        try:
            line, col = node.lc.item(index)
            return Location(self.source, line + 1, col + 1)
        except Exception:  # noqa: BLE001
            return self.node_location(node)

    def node_location(self, node: Any) -> Location:
        lc = getattr(node, "lc", None)
        if lc is not None and lc.line is not None:
            return Location(self.source, lc.line + 1, lc.col + 1)
        return Location(self.source)

    # -- the document ----------------------------------------------------------------------------
    def document(self, doc: Any, sweep: Any = None) -> dict[str, Any]:
        """The spec's sections as plain values; `sweep`: its sweep section, already plain (`_parsed`)."""
        raw: dict[str, Any] = {TOP_LEVEL: {}}
        if doc is None:
            self.error(Location(self.source, 1, 1), (), "the spec is empty; start from examples/quickstart.yaml")
            return raw
        if not isinstance(doc, CommentedMap):
            self.error(self.node_location(doc), (), f"a spec is a mapping of sections, got {_kind(doc)}")
            return raw
        sections = [s for s in self.catalog.sections if s != TOP_LEVEL]
        for key, value in doc.items():
            where = self.key_location(doc, key)
            if not isinstance(key, str):
                self.error(where, (), f"keys must be strings, got {_kind(key)} {key!r}")
                continue
            name = key.replace("-", "_")
            if name in sections:
                raw[name] = self.section(name, value, where)
                continue
            if name == "sweep":  # several points of one spec: spec/sweep.py
                self.sweep = sweep
                continue
            resolved = self.catalog.resolve_name(key)
            if resolved and self.catalog.flags[resolved[0]].section == TOP_LEVEL:
                self.flag_value(raw[TOP_LEVEL], (TOP_LEVEL,), key, value, where)
                continue
            self.unknown(where, (key,), key, TOP_LEVEL, extra=sections)
        return raw

    def section(self, name: str, value: Any, where: Location) -> Any:
        if name in LIST_SECTIONS:
            if isinstance(value, CommentedSeq):
                if len(value) > 1:
                    self.indexed.add(name)
                if not value:
                    self.error(where, (name,), "an empty list: remove the section or give at least one entry")
                entries = []
                for index, item in enumerate(value):
                    entries.append(self.entry(name, index, item, self.item_location(value, index)))
                return entries
            return [self.entry(name, 0, value, where)]
        return self.entry(name, None, value, where)

    def entry(self, section: str, index: int | None, node: Any, where: Location) -> dict[str, Any]:
        prefix = (section,) if index is None else (section, index)
        out: dict[str, Any] = {}
        if node is None:  # `merge:` with nothing under it: the stage with its defaults
            return out
        if not isinstance(node, CommentedMap):
            self.error(where, prefix, f"expected a mapping of {section} flags, got {_kind(node)}")
            return out
        for key, value in node.items():
            key_where = self.key_location(node, key)
            if isinstance(key, str) and key in NESTED_SECTIONS and section in NESTED_SECTIONS[key]:
                if value is not None and not isinstance(value, CommentedMap):
                    self.error(key_where, (*prefix, key), f"expected a mapping of {key} flags, got {_kind(value)}")
                    continue
                nested: dict[str, Any] = {}
                for sub_key, sub_value in (value or {}).items():
                    self.flag_value(nested, (*prefix, key), sub_key, sub_value, self.key_location(value, sub_key), key)
                out[key] = nested
                continue
            if key == "name" and section in LIST_SECTIONS:
                if not (isinstance(value, str) and STEP_NAME.match(value)):
                    self.error(key_where, (*prefix, key), f"a step name is letters, digits, '-' and '_', got {value!r}")
                else:
                    out["name"] = str(value)
                continue
            self.flag_value(out, prefix, key, value, key_where, section)
        return out

    def flag_value(
        self, out: dict, prefix: tuple, key: Any, value: Any, where: Location, section: str = TOP_LEVEL
    ) -> None:
        if not isinstance(key, str):
            self.error(where, prefix, f"keys must be strings, got {_kind(key)} {key!r}")
            return
        resolved = self.catalog.resolve_name(key)
        if resolved is None:
            self.unknown(where, (*prefix, key), key, section)
            return
        name, negated = resolved
        flag = self.catalog.flags[name]
        path = (*prefix, name)
        if flag.section != section:
            here = "at the top level" if section == TOP_LEVEL else f"under {section}:"
            home = "at the top level" if flag.section == TOP_LEVEL else f"under {flag.section}:"
            self.error(where, (*prefix, key), f"{name} is a {flag.section} flag, not allowed {here}; put it {home}")
            return
        value = plain(value)
        if negated:
            if not isinstance(value, bool):
                self.error(where, (*prefix, key), f"no_{name} is a switch: expected true or false, got {value!r}")
                return
            value = not value
        if path in self.explicit and name in out:
            if out[name] != value:
                self.error(where, (*prefix, key), f"contradicts an earlier {name} / no_{name} in the same mapping")
            else:
                self.error(
                    where, (*prefix, key), f"{name} is given twice (as {key!r} and an earlier spelling)", "warning"
                )
            return
        out[name] = value
        self.explicit.add(path)
        self.locations[path] = where

    def unknown(
        self, where: Location, path: tuple, key: str, section: str | None, extra: list[str] | None = None
    ) -> None:
        """An unknown key: suggest the closest flag of this section, else of any section (saying which).

        `section=None` (a CLI flag without a section) searches the whole catalog."""
        snake = key.replace("-", "_")
        elsewhere = self.catalog.flags.get(snake)
        if elsewhere is not None:  # a real flag in the wrong place (handled in flag_value for known names)
            self.error(
                where, path, f"unknown key (it is a {elsewhere.section} flag: put it under {elsewhere.section}:)"
            )
            return
        hint = None
        if section is not None:
            local = [f.name for f in self.catalog.section_flags(section)] + list(extra or [])
            local += [k for k, allowed in NESTED_SECTIONS.items() if section in allowed]
            if section in LIST_SECTIONS:
                local.append("name")
            hint = self.catalog.suggest(key, local)
        if hint is None:
            anywhere = self.catalog.suggest(key)
            if anywhere is not None:
                home = self.catalog.flags[self.catalog.resolve_name(anywhere)[0]].section
                same = section is None or home == section
                hint = anywhere if same or home == TOP_LEVEL else f"{home}.{anywhere}"
        message = "unknown flag"
        if hint:
            message += f" (did you mean {hint}?)"
        elif section not in (None, TOP_LEVEL):
            message += f" (see `tunepipe flags --section {section}`)"
        self.error(where, path, message)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(plain(value)).__name__}"


# -- overrides -----------------------------------------------------------------------------------


@functools.cache
def _scalar_yaml() -> YAML:
    """One safe loader for every override value (building a loader costs more than a scalar's parse)."""
    return bounded_yaml("safe")


def _parse_scalar(text: str) -> Any:
    try:
        value = _scalar_yaml().load(text)
    except YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) or value is None else text


def apply_overrides(loader: _Loader, raw: dict[str, Any], overrides: list[Override]) -> None:
    catalog = loader.catalog
    for ov in overrides:
        where = Location(ov.label)
        resolved = catalog.resolve_name(ov.key)
        if resolved is None:
            path = (
                (ov.key,)
                if not ov.section
                else (ov.section, ov.key)
                if ov.index is None
                else (ov.section, ov.index, ov.key)
            )
            if ov.index is not None:
                loader.indexed.add(ov.section)  # named train[1], as the file's entries are
            loader.unknown(where, path, ov.key, ov.section)
            continue
        name, negated = resolved
        flag = catalog.flags[name]
        if ov.section is not None and ov.section.replace("-", "_") != flag.section:
            loader.error(where, (ov.section, ov.key), f"{name} is a {flag.section} flag, not a {ov.section} flag")
            continue
        try:
            value = _override_value(flag, ov, negated)
        except OverrideValueError as exc:
            loader.error(where, (flag.section, name), str(exc))
            continue
        for target, prefix in _override_targets(loader, raw, flag.section, ov, where):
            target[name] = value
            loader.explicit.add((*prefix, name))
            loader.locations[(*prefix, name)] = where


class OverrideValueError(ValueError):
    """An override whose value cannot be used for its flag; the message says why."""


def _override_value(flag: Flag, ov: Override, negated: bool) -> Any:
    """The value an override sets; raises OverrideValueError when it has none or a switch gets a non-bool."""
    if ov.value is None:
        if flag.type != "bool":
            raise OverrideValueError(f"{ov.label} needs a value ({describe_type(flag)})")
        return not negated
    value = ov.value if flag.type in ("str", "path", "list") else _parse_scalar(ov.value)
    if negated:
        if not isinstance(value, bool):
            raise OverrideValueError(f"{ov.label} is a switch: expected true or false, got {ov.value!r}")
        return not value
    return value


def _override_targets(loader: _Loader, raw: dict, section: str, ov: Override, where: Location):
    if section == TOP_LEVEL:
        return [(raw[TOP_LEVEL], (TOP_LEVEL,))]
    if section not in raw:
        if section in STAGE_SECTIONS:
            loader.error(
                where,
                (section, ov.key),
                f"the spec has no {section} section; add one to the spec "
                "(an override changes flags, it does not add a stage)",
            )
            return []
        raw[section] = {}
    value = raw[section]
    if isinstance(value, list):
        if ov.index is not None:
            if not 0 <= ov.index < len(value):
                loader.error(where, (section, ov.index), f"{section} has {len(value)} entries; no index {ov.index}")
                return []
            return [(value[ov.index], (section, ov.index))]
        return [(entry, (section, i)) for i, entry in enumerate(value)]
    return [(value, (section,))]


# -- validation ----------------------------------------------------------------------------------


def _validate_entry(loader: _Loader, section: str, entry: dict, prefix: tuple, fill_defaults: bool = True) -> dict:
    catalog = loader.catalog
    nested = {k: entry.pop(k) for k in list(entry) if k in NESTED_SECTIONS}
    step_name = entry.pop("name", None) if section in LIST_SECTIONS else None
    try:
        given = section_model(section, frozenset(entry)).model_validate(entry).model_dump()
        defaults = {f.name: f.default for f in catalog.section_flags(section)} if fill_defaults else {}
        result = {**defaults, **given}
    except ValidationError as exc:
        seen: set[str] = set()
        for err in exc.errors():
            name = str(err["loc"][0])
            if name in seen:
                continue
            seen.add(name)
            flag = catalog.flags[name]
            path = (*prefix, name)
            location = loader.locations.get(path, Location(loader.source))
            loader.error(location, path, f"expected {describe_type(flag)}, got {_show_value(entry.get(name))}")
        result = {k: v for k, v in entry.items()}
        if fill_defaults:
            result = {f.name: entry.get(f.name, f.default) for f in catalog.section_flags(section)}
    for flag in catalog.section_flags(section):
        if flag.type == "list" and isinstance(result.get(flag.name), str):
            result[flag.name] = [part.strip() for part in result[flag.name].split(",") if part.strip()]
    for key, value in nested.items():
        result[key] = _validate_entry(loader, key, value, (*prefix, key), fill_defaults=False)
    if step_name is not None:
        result["name"] = step_name
    return result


def _show_value(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_kind(value)})" if not isinstance(value, (dict, list)) else _kind(value)


def resolve(loader: _Loader, raw: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    data.update(_validate_entry(loader, TOP_LEVEL, raw.get(TOP_LEVEL, {}), (TOP_LEVEL,)))
    for section in loader.catalog.sections:
        if section == TOP_LEVEL:
            continue
        value = raw.get(section)
        if section in LIST_SECTIONS:
            data[section] = [_validate_entry(loader, section, e, (section, i)) for i, e in enumerate(value or [])]
        elif value is not None:
            data[section] = _validate_entry(loader, section, value, (section,))
        elif section not in STAGE_SECTIONS:  # an absent config section: its defaults, nothing to check
            data[section] = {f.name: f.default for f in loader.catalog.section_flags(section)}
        else:
            data[section] = None
    return data


@functools.lru_cache(maxsize=4)
def _parsed(text: str) -> tuple[Any, Any]:
    """The YAML document of `text` and its `sweep:` section as plain values, once per process: a
    sweep loads its spec once per point, and its points are the sweep section's size (so reading it
    at each load would grow with the square of the points). Shared: read them, never change them (the
    loader copies every other value it keeps, with `plain`)."""
    doc = bounded_yaml().load(text)
    return doc, plain(doc.get("sweep")) if isinstance(doc, CommentedMap) else None


def parse_yaml(text: str, source: str, loader: _Loader) -> tuple[Any, Any]:
    """The document and its plain sweep section (`_parsed`); (None, None) with the YAML's errors reported."""
    try:
        return _parsed(text)
    except AliasExpansionError as exc:
        mark = exc.problem_mark
        loader.error(Location(source, mark.line + 1, mark.column + 1), (), exc.problem)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(source, mark.line + 1, mark.column + 1) if mark else Location(source)
        problem = exc.problem or exc.context or "invalid YAML"
        loader.error(where, (), f"YAML syntax error: {problem}")
    except YAMLError as exc:
        loader.error(
            Location(source), (), f"YAML error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
    except RecursionError:
        loader.error(Location(source), (), "the YAML nests too deeply")
    return None, None


def load_spec(
    path: str | Path, overrides: list[Override] | None = None, *, file_facts: dict | None = None
) -> ResolvedSpec:
    """Load, validate and resolve a spec; raises SpecError listing every problem.

    `file_facts`: one dict shared by several loads of one command (a sweep's points, each loaded with
    its own overrides): what the rules read from input files is read once (rules.RuleContext)."""
    from .rules import check_rules, resolve_interactions

    path = Path(path)
    catalog = load_catalog()
    loader = _Loader(str(path), catalog)
    text = read_text(path, "spec")
    doc, sweep = parse_yaml(text, str(path), loader)
    if loader.diagnostics:
        raise SpecError(loader.diagnostics)
    try:
        raw = loader.document(doc, sweep)
    except RecursionError:
        raise SpecError([Diagnostic(Location(str(path)), "", "the YAML nests too deeply")]) from None
    apply_overrides(loader, raw, overrides or [])
    data = resolve(loader, raw)
    spec = ResolvedSpec(
        path=path.resolve(),
        data=data,
        explicit=loader.explicit,
        locations=loader.locations,
        indexed=loader.indexed,
        sweep=loader.sweep,
    )
    if not any(d.severity == "error" for d in loader.diagnostics):
        resolve_interactions(spec)
        for diagnostic in check_rules(spec, catalog, file_facts):
            loader.diagnostics.append(diagnostic)
    errors = [d for d in loader.diagnostics if d.severity == "error"]
    if errors:
        raise SpecError(_sorted(loader.diagnostics))
    spec.warnings = _sorted(loader.diagnostics)
    return spec


def _sorted(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    return sorted(diagnostics, key=lambda d: (d.location.line is None, d.location.line or 0, d.location.col or 0))
