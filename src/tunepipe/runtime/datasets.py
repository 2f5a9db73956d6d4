"""Dataset registry (LLaMA-Factory's `dataset_info.json`) and normalisation to the data artifact format.

A dataset name resolves, in order, to an entry of `<dataset_dir>/dataset_info.json`, or to a local file
or directory inside `dataset_dir`. JSON/JSONL files of objects are read with the json module, other local files
(csv, parquet) and hub datasets with `datasets`;
`hf_hub_url` entries are loaded from the hub when it is reachable. Every record becomes either

    {"messages": [{"role": "system|user|assistant|function|tool", "content": str}, ...], "tools": str|None}

(`function` = an assistant turn that calls a tool, `tool` = the tool's answer) or, for `stage: pt`,
`{"text": str}`. Records that cannot form a valid conversation are dropped and counted.

Light at import time: `datasets` is imported only when it reads a dataset.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.errors import UserError
from tunepipe.spec.catalog import load_catalog

FORMATS = ("alpaca", "sharegpt", "openai")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# LLaMA-Factory's defaults; `openai` formatting changes the tag defaults to OpenAI's message schema.
DEFAULT_COLUMNS = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": None,
        "system": None,
        "tools": None,
    },
    "sharegpt": {"messages": "conversations", "system": None, "tools": None},
    "openai": {"messages": "messages", "system": None, "tools": None},
}
DEFAULT_TAGS = {
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "openai": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "function",
        "system_tag": "system",
    },
}
# The seed's column flags and the registry column each one overrides.
COLUMN_FLAGS = {
    "prompt_column": "prompt",
    "query_column": "query",
    "response_column": "response",
    "history_column": "history",
}


@dataclass
class DatasetAttr:
    name: str
    formatting: str = "alpaca"
    path: Path | None = None  # local file or directory
    hub: str | None = None  # hf_hub_url
    subset: str | None = None
    split: str = "train"
    num_samples: int | None = None
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def load_info(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "dataset_info.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object mapping dataset names to entries")
    return info


def inside(dataset_dir: Path, file_name: str, what: str) -> Path:
    """`file_name` resolved inside dataset_dir; anything that escapes it (.., absolute, symlink) is refused."""
    root = dataset_dir.resolve()
    path = (root / file_name).resolve()
    if path != root and root not in path.parents:
        raise UserError(
            f"{what}: {file_name!r} resolves to {path}, outside dataset_dir {root}",
            ["dataset files must live inside dataset_dir; move the file there or change dataset_dir"],
        )
    return path


def resolve(name: str, dataset_dir: Path, info: dict[str, Any], params: dict[str, Any]) -> DatasetAttr:
    entry = info.get(name)
    if entry is None:
        path = inside(dataset_dir, name, f"dataset {name!r}")
        if not path.exists():
            known = ", ".join(sorted(info)) or "none"
            raise UserError(
                f"unknown dataset {name!r}: not in {dataset_dir / 'dataset_info.json'} and no such file in {dataset_dir}",
                [
                    f"datasets in dataset_info.json: {known}",
                    "add an entry to dataset_info.json, or name a json/jsonl/csv/parquet file inside dataset_dir",
                ],
            )
        attr = DatasetAttr(name=name, path=path, formatting=_sniff_format(path))
    else:
        attr = _from_entry(name, entry, dataset_dir)
    attr.columns = {**DEFAULT_COLUMNS[attr.formatting], **attr.columns}
    if attr.formatting != "alpaca":
        attr.tags = {**DEFAULT_TAGS[attr.formatting], **attr.tags}
    # A column flag set to something other than its default overrides the registry's mapping.
    flags = load_catalog().flags
    for flag, column in COLUMN_FLAGS.items():
        value = params.get(flag)
        if value and value != flags[flag].default and attr.formatting == "alpaca":
            attr.columns[column] = value
    return attr


def _from_entry(name: str, entry: Any, dataset_dir: Path) -> DatasetAttr:
    where = f"dataset {name!r} in {dataset_dir / 'dataset_info.json'}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object with file_name or hf_hub_url")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise UserError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATS)}")
    attr = DatasetAttr(
        name=name,
        formatting=formatting,
        split=entry.get("split") or "train",
        subset=entry.get("subset"),
        num_samples=entry.get("num_samples"),
        columns=dict(entry.get("columns") or {}),
        tags=dict(entry.get("tags") or {}),
    )
    if entry.get("file_name"):
        attr.path = inside(dataset_dir, entry["file_name"], where)
        if not attr.path.exists():
            raise UserError(f"{where}: file {attr.path} does not exist")
    elif entry.get("hf_hub_url"):
        attr.hub = entry["hf_hub_url"]
    else:
        other = [k for k in entry if k.endswith("_url")]
        raise UserError(
            f"{where}: needs file_name or hf_hub_url" + (f" ({', '.join(other)} is not supported)" if other else "")
        )
    return attr


def _sniff_format(path: Path) -> str:
    """A bare file without a registry entry: openai/sharegpt when its first record has a message list."""
    first = _first_record(path)
    if isinstance(first, dict):
        if isinstance(first.get("messages"), list):
            return "openai"
        if isinstance(first.get("conversations"), list):
            return "sharegpt"
    return "alpaca"


def _first_record(path: Path) -> Any:
    if path.is_dir() or path.suffix not in (".json", ".jsonl"):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                line = f.readline()
                return json.loads(line) if line.strip() else None
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
    return data[0] if isinstance(data, list) and data else None


# ------------------------------------------------------------------------------------- reading
def read_records(attr: DatasetAttr, cache_dir: Path) -> list[dict[str, Any]]:
    """The raw rows of one dataset, in file order."""
    if attr.hub:
        datasets = _datasets()
        try:
            ds = datasets.load_dataset(attr.hub, attr.subset, split=attr.split, cache_dir=str(cache_dir))
        except Exception as e:  # network, auth, missing repo: all the same to the user
            raise UserError(
                f"dataset {attr.name!r}: could not load {attr.hub!r} from the Hugging Face hub ({type(e).__name__}: {e})",
                ["no hub is reachable from here? download the dataset, put it inside dataset_dir and use file_name"],
            ) from None
        return list(ds)
    files = _data_files(attr)
    kind = FILE_TYPES[files[0].suffix]
    if kind == "json":
        try:
            rows = _json_rows(files)
        except ValueError:  # malformed: check_files says where
            rows = []
        if rows:
            return rows
    check_files(attr)  # located errors for a malformed or empty file, before datasets reports them less clearly
    datasets = _datasets()
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=str(cache_dir))
    except Exception as e:
        raise UserError(f"dataset {attr.name!r}: cannot read {attr.path} as {kind} ({type(e).__name__}: {e})") from None
    return list(ds)


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _json_rows(files: list[Path]) -> list[dict[str, Any]] | None:
    """Rows of JSON / JSONL files of objects, read with the json module: what `datasets.load_dataset("json")`
    gives (every row has every top-level column, None where a row lacks it) without its import, its
    Arrow cache and the conversion back to Python — seconds on a 20k-conversation file. None when a file
    holds anything else (a top-level object, a list of non-objects): `datasets` reads those."""
    rows: list[dict[str, Any]] = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            if file.suffix == ".jsonl":
                part = [json.loads(line) for line in f if line.strip()]
            else:
                part = json.load(f)
        if not isinstance(part, list) or not all(isinstance(row, dict) for row in part):
            return None
        rows += part
    columns = dict.fromkeys(key for row in rows for key in row)
    return [row if len(row) == len(columns) else {key: row.get(key) for key in columns} for row in rows]


FULL_CHECK_BYTES = 64 << 20  # files up to this size are parsed whole by `check_files`; larger ones by their ends


def check_files(attr: DatasetAttr) -> None:
    """A malformed JSON/JSONL file as FILE:LINE:COL, an empty dataset as such — the same errors in
    `validate` and in the data step, before `datasets` would report them less clearly."""
    if attr.hub:
        return
    files = _data_files(attr)
    if all(f.stat().st_size == 0 for f in files):
        raise UserError(f"dataset {attr.name!r}: {attr.path} is empty: no examples to train on")
    records = 0
    for file in files:
        kind = FILE_TYPES[file.suffix]
        if kind != "json":
            records += file.stat().st_size > 0
            continue
        text = _readable_part(file)
        if file.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    _parse(line, file, number, line_offset=0)
                    records += 1
        else:
            data = _parse(text, file, 1, line_offset=None)
            records += len(data) if isinstance(data, (list, dict)) else 1
    if records == 0:
        raise UserError(f"dataset {attr.name!r}: {attr.path} holds no examples (an empty list or only blank lines)")


def _readable_part(file: Path) -> str:
    try:
        if file.stat().st_size <= FULL_CHECK_BYTES or file.suffix != ".jsonl":
            return file.read_text(encoding="utf-8")
        with open(file, encoding="utf-8") as f:  # a big JSONL file: its first lines are checked
            return "".join(f.readline() for _ in range(1000))
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 text (byte {exc.start})") from None


def _parse(text: str, file: Path, line: int, line_offset: int | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{file}:{exc.lineno if line_offset is None else line}:{exc.colno}"
        raise UserError(f"{where}: malformed JSON: {exc.msg}") from None


def _data_files(attr: DatasetAttr) -> list[Path]:
    path = attr.path
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.suffix in FILE_TYPES]
    if not files:
        raise UserError(f"dataset {attr.name!r}: no json, jsonl, csv or parquet file in {path}")
    kinds = {FILE_TYPES[f.suffix] for f in files}
    if len(kinds) > 1:
        raise UserError(f"dataset {attr.name!r}: {path} mixes file types ({', '.join(sorted(kinds))}); keep one")
    return files


def sample(rows: list[dict[str, Any]], attr: DatasetAttr, seed: int, max_samples: int | None) -> list[dict[str, Any]]:
    """`num_samples` (seeded sample, with repetition when larger than the data) then `max_samples` (first n)."""
    if attr.num_samples is not None and rows:
        rng = random.Random(f"{seed}:{attr.name}")
        n = int(attr.num_samples)
        order = list(range(len(rows)))
        rng.shuffle(order)
        picked = order[:n]
        while len(picked) < n:
            picked.append(rng.randrange(len(rows)))
        rows = [rows[i] for i in picked]
    if max_samples is not None:
        rows = rows[:max_samples]
    return rows


# -------------------------------------------------------------------------------- normalising
def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _column(row: dict[str, Any], attr: DatasetAttr, key: str, required: bool = False) -> Any:
    column = attr.columns.get(key)
    if column is None:
        return None
    if column not in row:
        if required:
            flag = f" or set data.{key}_column" if f"{key}_column" in COLUMN_FLAGS else ""
            raise UserError(
                f"dataset {attr.name!r}: column {column!r} ({key}) is missing; it has {', '.join(sorted(row))}",
                [f'map the right column in dataset_info.json ("columns": {{"{key}": ...}}){flag}'],
            )
        return None
    return row[column]


def normalise(row: dict[str, Any], attr: DatasetAttr, stage: str) -> dict[str, Any] | None:
    """One row → an artifact record, or None when the row is not a usable example."""
    if attr.formatting == "alpaca":
        record = _from_alpaca(row, attr, stage)
    else:
        record = _from_sharegpt(row, attr)
    if record is None:
        return None
    if stage == "pt":
        text = record.get("text")
        if text is None:
            text = "\n".join(m["content"] for m in record["messages"] if m["content"])
        return {"text": text} if text else None
    return record


def _from_alpaca(row: dict[str, Any], attr: DatasetAttr, stage: str) -> dict[str, Any] | None:
    prompt = _text(_column(row, attr, "prompt", required=True))
    if stage == "pt" and attr.columns.get("response") not in row:
        return {"text": prompt}  # a plain corpus: `"columns": {"prompt": "text"}`
    query = _text(_column(row, attr, "query"))
    response = _column(row, attr, "response", required=stage != "pt")
    if isinstance(response, list):
        raise UserError(
            f"dataset {attr.name!r}: response column holds a list (preference data?); "
            "tunepipe's sft data needs one response per example"
        )
    messages = []
    system = _text(_column(row, attr, "system"))
    if system:
        messages.append({"role": "system", "content": system})
    for turn in _column(row, attr, "history") or []:
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            return None
        messages += [{"role": "user", "content": _text(turn[0])}, {"role": "assistant", "content": _text(turn[1])}]
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    messages.append({"role": "assistant", "content": _text(response)})
    if stage != "pt" and not messages[-1]["content"]:
        return None
    tools = _column(row, attr, "tools")
    return {"messages": messages, "tools": _text(tools) or None}


def _from_sharegpt(row: dict[str, Any], attr: DatasetAttr) -> dict[str, Any] | None:
    tags = attr.tags
    turns = _column(row, attr, "messages", required=True)
    if not isinstance(turns, list):
        return None
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "function",
        tags["system_tag"]: "system",
    }
    messages = []
    system = _text(_column(row, attr, "system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None
        role = roles.get(turn.get(tags["role_tag"]))
        if role is None:
            return None
        if role == "system":
            if i != 0 or system:
                return None  # a system turn only opens a conversation
        messages.append({"role": role, "content": _text(turn.get(tags["content_tag"]))})
    if not _alternates([m["role"] for m in messages if m["role"] != "system"]):
        return None
    tools = _column(row, attr, "tools")
    return {"messages": messages, "tools": _text(tools) or None}


def _alternates(roles: list[str]) -> bool:
    """user/tool turns at even positions, assistant/function turns at odd ones, ending with an answer."""
    if not roles or len(roles) % 2:
        return False
    return all(r in ("user", "tool") if i % 2 == 0 else r in ("assistant", "function") for i, r in enumerate(roles))


# ---------------------------------------------------------------------------------- splitting
def split(records: list[dict[str, Any]], val_size: float | int | None, seed: int) -> tuple[list, list]:
    """Seeded validation split: `val_size` < 1 is a fraction, otherwise a count. Train keeps file order."""
    n = len(records)
    if not val_size:
        return records, []
    if float(val_size) < 1:
        k = min(n, max(1, math.ceil(round(float(val_size) * n, 6)))) if n else 0
    else:
        if float(val_size) != int(val_size):
            raise UserError(f"val_size {val_size}: a count must be a whole number (or use a fraction below 1)")
        k = int(val_size)
        if k >= n:
            raise UserError(f"val_size {k} leaves no training data: the datasets hold {n} examples")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:k])
    return [r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)]
