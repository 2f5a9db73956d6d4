"""pydantic models generated from the flag catalog: one model per section, no flag written by hand."""

from __future__ import annotations

import os
from functools import cache
from typing import Annotated, Any, Literal, Optional, Union

# pydantic scans every installed package's entry points for plugins at first use (~30 ms); tunepipe
# uses none, and `validate` should answer instantly.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from pydantic import (  # noqa: E402
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    create_model,
)

from .catalog import Flag, load_catalog

_STRICT_FLOAT = Union[StrictInt, StrictFloat]  # an int is a valid float in a spec (lr: 1 is fine)
_BASE_TYPES: dict[str, Any] = {
    "bool": StrictBool,
    "int": StrictInt,
    "float": _STRICT_FLOAT,
    "number": _STRICT_FLOAT,
    "str": StrictStr,
    "path": StrictStr,
    "list": Union[StrictStr, list[StrictStr]],
    "mapping": dict[str, Any],
}


def python_type(flag: Flag) -> Any:
    if flag.choices is not None:
        base: Any = Literal[flag.choices]  # type: ignore[valid-type]
    else:
        base = _BASE_TYPES[flag.type]
    if flag.range is not None:
        low, high = flag.range
        base = Annotated[base, Field(ge=low, le=high)]
    return Optional[base]


class _SectionBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=False)


@cache
def section_model(section: str, names: frozenset[str] | None = None) -> type[BaseModel]:
    """The model of a section; with `names`, of just those flags.

    Validating a spec builds models of the flags it sets only: pydantic spends ~0.3 ms building each
    field, and a spec sets a few dozen of ~150 flags (defaults come from the catalog, and a test
    validates every default against the full models)."""
    fields = {
        flag.name: (python_type(flag), Field(default=flag.default, description=flag.en))
        for flag in load_catalog().section_flags(section)
        if names is None or flag.name in names
    }
    return create_model(f"{section.title()}Section", __base__=_SectionBase, **fields)


def describe_type(flag: Flag) -> str:
    """Human wording of what a flag accepts, used in error messages and `tunepipe flags`."""
    if flag.choices is not None:
        return "one of " + ", ".join(str(c) for c in flag.choices)
    words = {
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "number": "a number (int or float)",
        "str": "a string",
        "path": "a path",
        "list": "a comma-separated string or a list of strings",
        "mapping": "a mapping",
    }[flag.type]
    if flag.range is not None:
        low, high = flag.range
        if low is not None and high is not None:
            words += f" in [{low}, {high}]"
        elif low is not None:
            words += f" >= {low}"
        elif high is not None:
            words += f" <= {high}"
    return words
