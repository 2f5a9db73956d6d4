"""The spec: flag catalog (data) → pydantic models, loading with positions, rules, JSON Schema."""

from .catalog import Catalog, Flag, load_catalog
from .loader import Diagnostic, Override, ResolvedSpec, SpecError, load_spec

__all__ = ["Catalog", "Diagnostic", "Flag", "Override", "ResolvedSpec", "SpecError", "load_catalog", "load_spec"]
