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
