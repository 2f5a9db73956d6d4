"""Stage `data`: read the named datasets, normalise them, concatenate in order, split train/val.

Writes `train.jsonl`, `val.jsonl` (one record a line, sorted keys) and `stats.json` — see
docs/internals.md for the record format. The bytes depend only on the inputs and the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.errors import UserError
from tunepipe.runtime import datasets as registry
from tunepipe.runtime.context import StepContext


def dataset_dir(ctx: StepContext) -> Path:
    if "dataset_dir" in ctx.files:
        return Path(ctx.files["dataset_dir"])
    value = ctx.params.get("dataset_dir")
    return (ctx.spec_dir / value).resolve() if value else ctx.spec_dir


def load(params: dict[str, Any], root: Path, seed: int, cache_dir: Path) -> tuple[list, list, dict]:
    """(train records, val records, stats) for the data-section params."""
    names = params.get("dataset") or []
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise UserError("data.dataset is empty: name at least one dataset (a dataset_info.json entry or a file)")
    stage = params["stage"]
    info = registry.load_info(root)
    records, per_dataset = [], {}
    for name in names:
        attr = registry.resolve(name, root, info, params)
        rows = registry.sample(registry.read_records(attr, cache_dir), attr, seed, params.get("max_samples"))
        kept = [r for r in (registry.normalise(row, attr, stage) for row in rows) if r is not None]
        per_dataset[name] = {
            "formatting": attr.formatting,
            "rows": len(rows),
            "kept": len(kept),
            "dropped": len(rows) - len(kept),
        }
        records += kept
    if not records:
        raise UserError(
            f"datasets {', '.join(names)}: no usable example (all {sum(d['rows'] for d in per_dataset.values())} rows dropped)",
            ["check the formatting, columns and tags of the dataset_info.json entries"],
        )
    train, val = registry.split(records, params.get("val_size"), seed)
    stats = {
        "stage": stage,
        "datasets": per_dataset,
        "train": len(train),
        "val": len(val),
        "dropped": sum(d["dropped"] for d in per_dataset.values()),
    }
    return train, val, stats


RECORD_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)  # one encoder for every record


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(RECORD_JSON.encode(record) + "\n" for record in records)


def run(ctx: StepContext) -> dict:
    train, val, stats = load(ctx.params, dataset_dir(ctx), ctx.seed, ctx.work / "hf-datasets")
    write_jsonl(ctx.out / "train.jsonl", train)
    write_jsonl(ctx.out / "val.jsonl", val)
    (ctx.out / "stats.json").write_text(json.dumps(stats, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    ctx.log.info("data: %d train, %d val examples (%d dropped)", stats["train"], stats["val"], stats["dropped"])
    return stats
