"""The object a stage's `run(ctx)` receives (see docs/internals.md). Light: no torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StepContext:
    id: str
    kind: str
    key: str
    params: dict[str, Any]
    inputs: dict[str, Path]
    files: dict[str, Path]
    seed: int
    spec_dir: Path
    out: Path
    work: Path
    # Every upstream artifact the step declared, by key -> local directory: what a train.json's
    # `base.key` names is looked up here, never by rebuilding a store path.
    artifacts: dict[str, Path] = field(default_factory=dict)
    upstream: dict[str, str] = field(default_factory=dict)  # input role -> that artifact's key
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("tunepipe.step"))
