"""Step names of list sections: ONE rule, read by the compiler (step ids) and the validation rules
(`quantized:` references), so that both always agree. Light: pure Python.

A list section's entries are named by their `name:`, else by a default per kind (a train entry's
`stage`, a quantize entry's `method` and `bits`, an export entry's `format`); a name given twice or
missing is numbered by position (`gguf-1`, `gguf-2`); exports of one format take their type first
(`gguf-f16`, `gguf-q8_0`). A kind with one entry has the kind as step id
(`export`); several have `kind.name` (`export.gguf`, `export.onnx`). Each export and quantize step has
a verify step (`verify_id`): `verify.gguf`, `verify.quantize-bnb4`.
"""

from __future__ import annotations

from typing import Any


def default_name(kind: str, entry: dict[str, Any]) -> str | None:
    if kind == "train":
        return entry.get("stage")
    if kind == "quantize":
        method, bits = entry.get("method"), entry.get("bits")
        return f"{method}{bits}" if method and bits else method
    if kind == "export":
        return entry.get("format")
    return None


def entry_names(kind: str, entries: list[dict[str, Any]]) -> list[str]:
    """Unique, readable names: the given ones, numbered where missing or repeated. Exports of one
    format are told apart by their type first (`gguf-f16`, `gguf-q8_0`)."""
    raw = [entry.get("name") or default_name(kind, entry) for entry in entries]
    if kind == "export":
        raw = [
            f"{name}-{entry['type']}" if not entry.get("name") and entry.get("type") and raw.count(name) > 1 else name
            for name, entry in zip(raw, entries)
        ]
    return unique_names(raw)


def unique_names(raw: list[str | None]) -> list[str]:
    names = [str(name) if name else str(i + 1) for i, name in enumerate(raw)]
    return [name if names.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(names)]


def step_ids(kind: str, names: list[str]) -> list[str]:
    return [kind] if len(names) == 1 else [f"{kind}.{name}" for name in names]


def verify_id(step_id: str) -> str:
    """The verify step of an export or quantize step: `export[.X]` → `verify[.X]`, `quantize[.X]` →
    `verify.quantize[-X]`."""
    kind, _, name = step_id.partition(".")
    if kind == "export":
        return f"verify.{name}" if name else "verify"
    return f"verify.{kind}-{name}" if name else f"verify.{kind}"
