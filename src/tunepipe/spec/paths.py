"""How a path written in a spec is found: the one rule validate, the compiler and the stages share.

Relative paths are relative to the spec's directory; `~` is expanded first. A model or adapter
value that does not exist locally may be a hub id (`org/name`), unless its first folder exists
beside the spec — then it is a mistyped local path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# `org/name`: one slash at most.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve(spec_dir: Path, value: str | Path) -> Path:
    """The absolute path a spec value names (it may not exist)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(spec_dir) / path


def is_hub_id(spec_dir: Path, value: str) -> bool:
    """True when `value` does not exist locally and reads as a hub id rather than a mistyped path."""
    if resolve(spec_dir, value).exists() or not HUB_ID.fullmatch(value):
        return False
    return not resolve(spec_dir, value.split("/")[0]).exists()


def config_file_problems(flag: str, value, spec_dir) -> list[str]:
    """Problems of a JSON config file a flag names (deepspeed, fsdp_config): missing or not JSON."""
    path = resolve(spec_dir, str(value)) if spec_dir is not None else Path(str(value)).expanduser()
    if not path.is_file():
        return [f"{flag}: no such file {path}"]
    try:
        json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{flag}: {path} is not a valid JSON file ({exc})"]
    return []


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file a user named (`what`: "spec", "config" …), or a UserError saying why not."""
    from ..errors import UserError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a {what} file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
