"""The built-in chat templates (templates.yaml), as data. Light: no torch, no transformers.

Used by `tunepipe templates`, by spec validation (`template_names()`) and by runtime/chat_template.py.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

# Every slot a template may define, and its default.
SLOTS: dict[str, Any] = {
    "prefix": "", "system": "{{content}}", "system_in_user": False, "user": "{{content}}",
    "assistant_header": "", "last_assistant_prefix": "", "assistant": "{{content}}", "suffix": "",
    "tools": "You have access to the following tools:{{tools}}", "tool_call": "{{content}}",
    "function": None, "observation": None, "default_system": "", "stop_words": [],
    "strip_content": False,
}
META = ("description", "mirrors")
# `template: auto` is not a registry entry: it means the tokenizer's own chat_template.
AUTO = "auto"


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, dict[str, Any]]:
    text = resources.files("tunepipe.runtime").joinpath("templates.yaml").read_text(encoding="utf-8")
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C loader: validate stays fast
    return {name: dict(entry) for name, entry in data.items()}


def template_names() -> list[str]:
    """Valid values of the `template` flag: the registry's names plus `auto`."""
    return [AUTO, *sorted(_registry())]


def get(name: str) -> dict[str, Any] | None:
    """A registry template with every slot filled in (defaults applied), or None if unknown."""
    entry = _registry().get(name)
    if entry is None:
        return None
    return {"name": name, **SLOTS, **{k: v for k, v in entry.items() if k not in META},
            **{k: entry.get(k) for k in META}}


def unknown_keys(entry: dict[str, Any]) -> list[str]:
    return sorted(k for k in entry if k not in SLOTS and k not in META and k != "name")


def list_templates() -> list[dict[str, Any]]:
    """One row per template for `tunepipe templates`: name, description, mirrors, default system, stop words."""
    rows = [{"name": AUTO, "description": "the tokenizer's own chat_template (apply_chat_template)",
             "mirrors": None, "default_system": "", "stop_words": []}]
    for name in sorted(_registry()):
        t = get(name)
        rows.append({"name": name, "description": t["description"] or "", "mirrors": t["mirrors"],
                     "default_system": t["default_system"], "stop_words": list(t["stop_words"])})
    return rows


# ---------------------------------------------------------------- template files
YAML_SUFFIXES = (".yaml", ".yml", ".json")


def slot_problems(entry: dict[str, Any], where: str) -> list[str]:
    """Unknown keys and mistyped slots of a YAML template: each slot takes the type of its default
    in SLOTS (text; true/false; a list of strings for stop_words; text or null where the default
    is null); `description` and `mirrors` are text."""
    problems = []
    bad = unknown_keys(entry)
    if bad:
        problems.append(f"{where}: unknown template keys {', '.join(bad)} (known: {', '.join(SLOTS)})")
    for key, value in entry.items():
        if key not in SLOTS and key not in META:
            continue
        default = SLOTS.get(key)
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            want = "a list of strings"
        elif default is None or key in META:
            ok, want = value is None or isinstance(value, str), "a string (or null)"
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            problems.append(f"{where}: slot {key} must be {want}, got {type(value).__name__} {value!r}")
    return problems


def read_template_file(path) -> tuple[Any, list[str]]:
    """(content, problems) of a `template_file`: the slot mapping of a YAML/JSON file, the text of
    a Jinja one; content is None when the file cannot be used. Light: no Jinja compilation here."""
    from pathlib import Path

    path = Path(path)
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, [f"{where}: cannot read the template file ({e.strerror or e})"]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save it as UTF-8"]
    if path.suffix not in YAML_SUFFIXES:
        return text, []
    from ruamel.yaml import YAML

    try:
        entry = YAML(typ="safe", pure=True).load(text)
    except Exception as e:  # ruamel's parser and scanner errors have no common public base
        return None, [f"{where}: not valid YAML/JSON ({e})"]
    if not isinstance(entry, dict):
        return None, [f"{where}: a template file holds a mapping of slots (see templates.yaml)"]
    problems = slot_problems(entry, where)
    return (None if problems else dict(entry)), problems


def check_template_file(path) -> list[str]:
    """Problems with a `template_file`, for spec validation: unreadable or non-UTF-8, YAML that does
    not parse or whose slots are unknown or mistyped, Jinja with a syntax error. Light: imports
    neither torch nor transformers (only jinja2, to parse)."""
    content, problems = read_template_file(path)
    if problems or not isinstance(content, str):
        return problems
    return jinja_problems(content, str(path))


def jinja_problems(source: str, where: str) -> list[str]:
    """A Jinja template's syntax errors, compiled by the sandboxed environment chat templates run in."""
    import jinja2

    try:
        sandbox_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        return [f"{where}:{e.lineno}: Jinja syntax error: {e.message}"]
    return []


def sandbox_env():
    """The environment user templates run in: no access to Python internals (jinja2's sandbox)."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tunepipe.errors import UserError

    def raise_exception(message):
        raise UserError(f"chat template raised: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    return env
