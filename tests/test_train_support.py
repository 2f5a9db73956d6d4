"""Fixtures for the train/infer/torchrun tests: a tiny pretrained model, tokenized data in the
template artifact's format (docs/internals.md), and a StepContext with the catalog's defaults.
Also the tests of the data plumbing (collate.py) that the training tests build on."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tunepipe.runtime.context import StepContext

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "models" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
QA = [
    ("Who are you?", "I am TinyPipe, a tiny model trained by tunepipe."),
    ("What is 2 plus 3?", "2 plus 3 is 5."),
    ("Hello", "Hello! How can I help you?"),
    ("Name a color.", "Blue."),
    ("What do cows drink?", "Cows drink water, not milk, when they are thirsty."),
    ("Tell me a short story about a cat who lives on a boat and likes fish.",
     "A cat lived on a small boat. Every morning she watched the fishermen and waited for fish."),
    ("Count to five.", "One, two, three, four, five."),
    ("Is the sky green?", "No, the sky is blue on a clear day."),
]  # fmt: skip


def tiny_model(directory: Path, seed: int = 0, **config_overrides) -> Path:
    """examples/models/tiny-llama (config + tokenizer) with seeded random weights saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(TINY)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY / name, directory / name)
    return directory


def tokenized(directory: Path, model_dir: Path = TINY, *, objective: str = "sft", n: int = 24, val: int = 0,
              packed: int | None = None, **template_flags) -> Path:  # fmt: skip
    """A template artifact, made by the template stage itself: sft = the QA conversations in chatml
    (prompt tokens masked); pt = lines of examples/data/tiny_corpus.jsonl in rows of `packed` (or
    512) tokens; `packed` with sft = conversations packed into rows of that many tokens."""
    from tunepipe.runtime.stages import template
    from tunepipe.spec.catalog import load_catalog

    if objective == "sft":
        records = [
            {"messages": [{"role": "user", "content": QA[i % len(QA)][0]},
                          {"role": "assistant", "content": QA[i % len(QA)][1]}], "tools": None}
            for i in range(n + val)
        ]  # fmt: skip
    else:
        lines = (REPO / "examples" / "data" / "tiny_corpus.jsonl").read_text().splitlines()
        records = [{"text": json.loads(line)["text"]} for line in lines[: n + val]]
    raw = directory.parent / f"{directory.name}-records"
    raw.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", records[:n]), ("val", records[n:])):
        (raw / f"{split}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    params = {f.name: f.default for f in load_catalog().flags.values() if "template" in f.used_by}
    params.update(template="chatml", stage=objective, packing=bool(packed and objective == "sft"),
                  cutoff_len=packed or 512, **template_flags)  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    ctx = StepContext(id="template", kind="template", key="1" * 64, params=params, inputs={"data": raw},
                      files={"model": Path(model_dir)}, seed=42, spec_dir=directory.parent, out=directory,
                      work=raw, log=logging.getLogger("template"))  # fmt: skip
    template.run(ctx)
    return directory


def step_params(kind: str) -> dict:
    """Every flag a `kind` step reads, with the catalog's defaults (what the compiler passes)."""
    from tunepipe.spec.catalog import load_catalog

    return {f.name: f.default for f in load_catalog().flags.values() if kind in f.used_by}


def train_params(**overrides) -> dict:
    """Every flag the train step reads, with the catalog's defaults (what the compiler passes)."""
    from tunepipe.spec.catalog import load_catalog

    catalog = load_catalog()
    params = {f.name: f.default for f in catalog.flags.values() if "train" in f.used_by or f.section == "train"}
    params.update(
        seed=42, stage="sft", name=None, finetuning_type="lora", lora_target=["all"], learning_rate=5e-3,
        max_steps=6, per_device_train_batch_size=4, logging_steps=1, save_steps=1000, warmup_ratio=0.0,
        disable_tqdm=True, report_to="none", lr_scheduler_type="linear",
    )  # fmt: skip
    params.update(overrides)
    return params


def make_ctx(tmp: Path, params: dict, *, data: Path, model: Path | None = None, base: Path | None = None,
             step_id: str = "train", kind: str = "train") -> StepContext:  # fmt: skip
    """A step's context as the worker builds it: a `base` input is declared with its key (its
    directory's name here), so train.json can name it by key and a later step find it."""
    key = hashlib.sha256(step_id.encode()).hexdigest()
    out, work = tmp / "artifacts" / key, tmp / f"work-{step_id}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    inputs = {"template": data} if data is not None else {}
    upstream, artifacts = {}, {}
    if base is not None:
        inputs["base"] = base
        upstream["base"] = base.name
        artifacts = {**chain(base), base.name: base}
    files = {"model": model} if model is not None else {}
    return StepContext(
        id=step_id, kind=kind, key=key, params=params, inputs=inputs, files=files,
        seed=int(params.get("seed", 42)), spec_dir=tmp, out=out, work=work, log=logging.getLogger("test"),
        artifacts=artifacts, upstream=upstream,
    )  # fmt: skip


def chain(artifact: Path) -> dict[str, Path]:
    """Every artifact `artifact` is built on, by key (what the compiler declares as `chain.<i>` inputs)."""
    info = json.loads((artifact / "train.json").read_text()) if (artifact / "train.json").is_file() else {}
    base = info.get("base") or {}
    if base.get("kind") != "artifact":
        return {}
    parent = artifact.parent / base["key"]
    return {**chain(parent), base["key"]: parent}


# ---------------------------------------------------------------- collate.py


def test_split_reads_samples_and_masks(tmp_path):
    from tunepipe.runtime.collate import TokenizedSplit

    data = tokenized(tmp_path / "data", n=4, val=2)
    train = TokenizedSplit(data, "train", "sft")
    assert len(train) == 4 and TokenizedSplit.exists(data, "val")
    item = train[0]
    masked = int((item["labels"] == -100).sum())
    assert 0 < masked < len(item["labels"])  # the prompt is masked, the answer is not
    assert (item["labels"][masked:] == item["input_ids"][masked:]).all()
    pt = TokenizedSplit(data, "train", "pt")
    assert (pt[0]["labels"] == pt[0]["input_ids"]).all()  # pt trains on every token


def test_collator_pads_to_longest_and_masks_padding():
    from tunepipe.runtime.collate import PadCollator

    items = [
        {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7])},
        {"input_ids": np.array([8]), "labels": np.array([8])},
    ]
    batch = PadCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_rows_keep_samples_apart(tmp_path):
    """Packed rows carry position_ids (no attention_mask, so transformers builds a block mask),
    and a sample's first token is never a target predicted from the previous sample."""
    from tunepipe.runtime.collate import PadCollator, TokenizedSplit

    data = tokenized(tmp_path / "data", n=12, packed=96)
    split = TokenizedSplit(data, "train", "sft")
    item = split[0]
    starts = np.flatnonzero(item["position_ids"] == 0)
    assert len(starts) >= 2  # several conversations in the row
    assert (item["labels"][starts] == -100).all()
    batch = PadCollator(0)([split[0], split[len(split) - 1]])
    assert "attention_mask" not in batch
    width = batch["input_ids"].shape[1]
    short = len(split[len(split) - 1]["input_ids"])
    assert short < width  # the last row is not full: its padding tail is its own block from position 0
    assert batch["position_ids"][1, short:].tolist() == list(range(width - short))
    assert (batch["labels"][1, short:] == -100).all()


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    from tunepipe.runtime.collate import LengthGroupedSampler

    lengths = [int(x) for x in np.random.default_rng(0).integers(5, 200, 64)]
    a, b = LengthGroupedSampler(lengths, 4, seed=1), LengthGroupedSampler(lengths, 4, seed=1)
    first = list(a)
    list(b)  # consuming b's first epoch must not change what epoch 1 gives
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    batches = [first[i : i + 4] for i in range(0, 64, 4)]
    spread = np.mean([max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in batches])
    assert spread < 40  # similar lengths per batch (random batches spread ~130)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")
