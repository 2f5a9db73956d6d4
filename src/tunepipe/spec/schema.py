"""JSON Schema (draft 2020-12) of a spec, generated from the catalog for editors and other tools.

Editors that speak yaml-language-server get completion and hover docs from it through the
`# yaml-language-server: $schema=...` line at the top of a spec. It is committed at
schemas/tunepipe.schema.json; `tunepipe schema --check` fails when that file is stale.
"""

from __future__ import annotations

import json
from typing import Any

from .catalog import LIST_SECTIONS, STAGE_SECTIONS, TOP_LEVEL, Catalog, Flag, load_catalog
from .loader import NESTED_SECTIONS, STEP_NAME

_JSON_TYPES = {
    "bool": "boolean",
    "int": "integer",
    "float": "number",
    "number": "number",
    "str": "string",
    "path": "string",
    "mapping": "object",
}
# Kebab-case spellings are accepted by tunepipe; the schema lets them through unchecked rather than
# doubling every completion list.
_KEBAB = {"^[a-z0-9]+(-[a-z0-9]+)+$": {"description": "kebab-case spelling of a flag (checked by tunepipe validate)"}}


def flag_schema(flag: Flag) -> dict[str, Any]:
    if flag.type == "list":
        schema: dict[str, Any] = {
            "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
        }
    else:
        schema = {"type": [_JSON_TYPES.get(flag.type, "string"), "null"]}
    if flag.choices is not None:
        schema["enum"] = [*flag.choices, None]
    if flag.range is not None:
        low, high = flag.range
        if low is not None:
            schema["minimum"] = low
        if high is not None:
            schema["maximum"] = high
    if flag.default is not None:
        schema["default"] = flag.default
    if flag.examples:
        schema["examples"] = list(flag.examples)
    affects = "part of the cache key" if flag.affects == "artifact" else "runtime only, not in the cache key"
    schema["description"] = f"{flag.en}\n\n{flag.zh}\n\n({flag.section}; {affects})"
    return schema


def section_schema(catalog: Catalog, section: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for flag in catalog.section_flags(section):
        properties[flag.name] = flag_schema(flag)
        if flag.negatable:
            properties[f"no_{flag.name}"] = {
                "type": "boolean",
                "description": f"no_{flag.name}: true is {flag.name}: false.",
            }
    for key, sections in NESTED_SECTIONS.items():
        if section in sections:
            properties[key] = {
                "$ref": f"#/$defs/{key}_override",
                "description": f"Overrides {key} flags for this step only.",
            }
    if section in LIST_SECTIONS:
        properties["name"] = {
            "type": "string",
            "pattern": STEP_NAME.pattern,
            "description": f"Names this step: its id becomes {section}.NAME.",
        }
    return {
        "type": ["object", "null"],
        "description": catalog.sections[section],
        "properties": properties,
        "patternProperties": _KEBAB,
        "additionalProperties": False,
    }


def build_schema(catalog: Catalog | None = None) -> dict[str, Any]:
    catalog = catalog or load_catalog()
    defs: dict[str, Any] = {}
    properties: dict[str, Any] = {f.name: flag_schema(f) for f in catalog.section_flags(TOP_LEVEL)}
    for section in catalog.sections:
        if section == TOP_LEVEL:
            continue
        defs[section] = section_schema(catalog, section)
        ref = {"$ref": f"#/$defs/{section}"}
        if section in LIST_SECTIONS:
            properties[section] = {
                "anyOf": [ref, {"type": "array", "items": ref, "minItems": 1}],
                "description": catalog.sections[section] + " A mapping, or a list of them.",
            }
        else:
            properties[section] = {
                **ref,
                "description": catalog.sections[section]
                + (" Present = the stage runs." if section in STAGE_SECTIONS else ""),
            }
    values = {
        "type": "object",
        "additionalProperties": {},
        "description": "flag path (section.flag, section.NAME.flag) -> value",
    }
    properties["sweep"] = {
        "type": "object",
        "additionalProperties": False,
        "description": "Several points of this spec (spec/sweep.py); steps equal across points are built once.",
        "properties": {
            "matrix": {
                "type": "object",
                "additionalProperties": {"type": "array", "minItems": 1},
                "description": "flag path -> the values to try; every combination is a point",
            },
            "include": {"type": "array", "items": values, "description": "extra points"},
            "exclude": {"type": "array", "items": values, "description": "combinations to leave out"},
        },
    }
    for key in NESTED_SECTIONS:
        override = section_schema(catalog, key)
        override["properties"] = {k: v for k, v in override["properties"].items() if k not in NESTED_SECTIONS}
        defs[f"{key}_override"] = override
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tunepipe.dev/schemas/tunepipe.schema.json",
        "title": "tunepipe pipeline spec",
        "description": "One YAML file: data → template → train → merge → quantize → export. "
        "Generated from src/tunepipe/spec/flags.yaml by `tunepipe schema --write`.",
        "type": "object",
        "properties": properties,
        "patternProperties": _KEBAB,
        "additionalProperties": False,
        "$defs": defs,
    }


def render_schema() -> str:
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"
