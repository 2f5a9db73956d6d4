"""The spec: flag catalog (data) → pydantic models, loading with positions, rules, JSON Schema.

The names below are loaded on first use (PEP 562): a step's worker imports `tunepipe.spec.paths`,
and must not pay for the loader and pydantic (~0.3 s) to get it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import Catalog, Flag, load_catalog
    from .loader import Diagnostic, Override, ResolvedSpec, SpecError, load_spec

_MODULE_OF = {
    "Catalog": "catalog",
    "Flag": "catalog",
    "load_catalog": "catalog",
    "Diagnostic": "loader",
    "Override": "loader",
    "ResolvedSpec": "loader",
    "SpecError": "loader",
    "load_spec": "loader",
}
__all__ = ["Catalog", "Diagnostic", "Flag", "Override", "ResolvedSpec", "SpecError", "load_catalog", "load_spec"]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
