"""Effective (non-padding) training tokens/s of the train step against LLaMA-Factory's SFT recipe.

    python bench/train.py [--steps 100] [--cutoff-len 1024] [--batch 8] [--samples 3000] [--lf]
                          [--set flag=value ...] [--rows baseline,train,packed]

Same model (a seeded random tiny Llama from examples/models/tiny-llama, widened with --hidden),
same LoRA setup and hyperparameters, same conversations tokenized once by the template stage,
same batch size and number of optimizer steps, in one process, one after the other:

  baseline   what LLaMA-Factory 0.9.5's `stage: sft` does, rebuilt on the stock Trainer: its
             collator (DataCollatorForSeq2Seq: pad to the longest in the batch, pad_to_multiple_of=8,
             labels padded with -100), random order (the Trainer's RandomSampler; LF has no
             group_by_length), its model defaults on CPU (sdpa attention, gradient checkpointing with
             use_reentrant=True, inputs requiring grads, use_cache off), no full_determinism
  lf         (with --lf) real LLaMA-Factory, `llamafactory-cli train` from /tmp/lfvenv on the same
             tokenized rows (its `tokenized_path`), the same model and hyperparameters
  train      tunepipe's train step with the catalog's defaults (plus --set)
  packed     the train step on the template stage's packed rows (packing: true): position ids
             restart per sample, and transformers derives a block-diagonal mask from them

Effective tokens are the real (non-padding) tokens the optimizer saw; each row's rate is
tokens / wall time of `trainer.train()` only (model loading and evaluation excluded). Equivalence:
each row's mean and last logged train loss, and its eval loss on the same held-out conversations
(a packed row sees more samples per step: its losses are not comparable step for step). The
conversations have a long-tailed length mix, like real chat data: mostly short, a few past cutoff_len.
Timings on a shared machine are noisy; the ratios (rows run back to back) much less so.

Steps: length grouping draws megabatches of 50 batches and runs each longest batch first, so a
run of a multiple of 50 steps sees whole megabatches (a random sample of the data's lengths); a
run of 20 steps would see only the longest batches of its first megabatch, and other tokens/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LF_CLI = Path("/tmp/lfvenv/bin/llamafactory-cli")

from tunepipe.runtime.context import StepContext
from tunepipe.spec.catalog import load_catalog

WORDS = (REPO / "examples" / "data" / "tiny_corpus.jsonl").read_text().split()


def conversations(n: int, seed: int) -> list[dict]:
    """Chat samples, 1-3 turns, whose lengths follow a long tail: mostly short, a few past the cutoff."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            words = min(int(rng.lognormvariate(3.6, 1.0)), 900)
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=max(3, words // 4)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=max(3, words)))})
        out.append({"messages": messages, "tools": None})
    return out


def defaults(kind: str) -> dict:
    return {f.name: f.default for f in load_catalog().flags.values() if kind in f.used_by or f.section == kind}


def context(root: Path, step_id: str, kind: str, params: dict, inputs: dict, files: dict) -> StepContext:
    out, work = root / step_id / "out", root / step_id / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return StepContext(step_id, kind, "0" * 64, params, inputs, files, 42, root, out, work, logging.getLogger(step_id))


def tokenize(root: Path, model: Path, records: list[dict], val: list[dict], cutoff_len: int, packing: bool) -> Path:
    from tunepipe.runtime.stages import template

    raw = root / f"records-{packing}"
    raw.mkdir()
    (raw / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (raw / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    params = {
        **defaults("template"),
        "template": "chatml",
        "cutoff_len": cutoff_len,
        "packing": packing,
        "stage": "sft",
    }
    ctx = context(root, f"template-{packing}", "template", params, {"data": raw}, {"model": model})
    template.run(ctx)
    return ctx.out


def make_model(root: Path, hidden: int, cutoff_len: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = REPO / "examples" / "models" / "tiny-llama"
    config = AutoConfig.from_pretrained(tiny)
    config.hidden_size, config.intermediate_size = hidden, hidden * 2
    config.head_dim = hidden // config.num_attention_heads
    config.max_position_embeddings = max(config.max_position_embeddings, cutoff_len)
    torch.manual_seed(0)
    path = root / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny / name, path / name)
    return path


def hyperparameters(args) -> dict:
    """What every row trains with (tunepipe flag names; the baseline and LF get the same values)."""
    return {
        "seed": 42, "stage": "sft", "finetuning_type": "lora", "lora_target": ["all"], "lora_rank": 8,
        "lora_alpha": 32.0, "lora_dropout": 0.05, "learning_rate": 1e-3, "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.0, "warmup_steps": 0, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
        "per_device_eval_batch_size": args.batch, "gradient_accumulation_steps": 1, "logging_steps": 10,
    }  # fmt: skip


class Row:
    """One measured configuration: effective tokens, train seconds, logged losses, eval loss."""

    def __init__(self, name: str, tokens: int, seconds: float, losses: list[float], eval_loss: float | None):
        self.name, self.tokens, self.seconds, self.losses, self.eval_loss = name, tokens, seconds, losses, eval_loss

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def run_stage(root: Path, name: str, data: Path, model: Path, args, overrides: dict) -> Row:
    from tunepipe.runtime.stages import train

    params = {
        **defaults("train"), **hyperparameters(args), "save_steps": 10_000, "disable_tqdm": True,
        "report_to": "none", **args.overrides, **overrides,
    }  # fmt: skip
    if overrides:
        name += " " + " ".join(f"{k}={v}" for k, v in overrides.items())
    ctx = context(
        root, f"stage-{len(list(root.glob('stage-*')))}", "train", params, {"template": data}, {"model": model}
    )
    metrics = train.run(ctx)
    state = json.loads((ctx.out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e and e.get("step", 0) > 1]
    return Row(name, metrics["tokens"], metrics["train_runtime_s"], losses, metrics.get("eval_loss"))


class LFCollator:
    """LLaMA-Factory 0.9.5's SFT collator for a text-only model (SFTDataCollatorWith4DAttentionMask without
    neat_packing: the multimodal part adds nothing) = DataCollatorForSeq2Seq with pad_to_multiple_of=8
    and -100 label padding, over rows with input_ids, attention_mask, labels."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, label_pad_token_id=-100)

    def __call__(self, items: list[dict]):
        rows = [
            {"input_ids": i["input_ids"].tolist(), "attention_mask": [1] * len(i["input_ids"]),
             "labels": i["labels"].tolist()}
            for i in items
        ]  # fmt: skip
        return self.inner(rows)


def run_baseline(root: Path, data: Path, model_dir: Path, args) -> Row:
    """LLaMA-Factory's SFT recipe on the stock Trainer (see the module docstring)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from tunepipe.runtime.collate import TokenizedSplit
    from tunepipe.runtime.modeling import linear_module_names

    h = hyperparameters(args)
    set_seed(h["seed"])
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    tokenizer.padding_side = "right"  # LF's load_tokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation="sdpa")
    model.config.use_cache = False  # LF's patch_config for training
    # LF's prepare_model_for_training: gradient checkpointing (use_reentrant=True) unless disabled
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    lora = LoraConfig(task_type="CAUSAL_LM", r=h["lora_rank"], lora_alpha=h["lora_alpha"],
                      lora_dropout=h["lora_dropout"], target_modules=linear_module_names(model))  # fmt: skip
    model = get_peft_model(model, lora)
    eval_set = TokenizedSplit(data, "val", "sft")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(root / "baseline"),
            seed=h["seed"],
            max_steps=h["max_steps"],
            per_device_train_batch_size=h["per_device_train_batch_size"],
            per_device_eval_batch_size=h["per_device_eval_batch_size"],
            learning_rate=h["learning_rate"],
            lr_scheduler_type=h["lr_scheduler_type"],
            warmup_steps=h["warmup_steps"],
            logging_steps=h["logging_steps"],
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",
        ),  # fmt: skip
        train_dataset=TokenizedSplit(data, "train", "sft"),
        eval_dataset=eval_set,
        data_collator=LFCollator(tokenizer),
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    name = "baseline (LF 0.9.5's recipe)"
    return Row(name, trainer.state.num_input_tokens_seen, seconds, losses, trainer.evaluate()["eval_loss"])


def lf_dataset(root: Path, data: Path) -> Path:
    """The tokenized rows as LF's `tokenized_path` reads them (datasets.load_from_disk of a DatasetDict)."""
    import datasets

    from tunepipe.runtime.collate import TokenizedSplit

    def split(name: str):
        rows = [TokenizedSplit(data, name, "sft")[i] for i in range(len(TokenizedSplit(data, name, "sft")))]
        return datasets.Dataset.from_dict({
            "input_ids": [r["input_ids"].tolist() for r in rows],
            "attention_mask": [[1] * len(r["input_ids"]) for r in rows],
            "labels": [r["labels"].tolist() for r in rows],
        })  # fmt: skip

    path = root / "lf-tokenized"
    datasets.DatasetDict({"train": split("train"), "validation": split("val")}).save_to_disk(path)
    return path


def run_lf(root: Path, data: Path, model_dir: Path, args) -> Row:
    """Real LLaMA-Factory in its own venv, on the same tokenized rows and model."""
    h = hyperparameters(args)
    out = root / "lf-out"
    config = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "do_eval": True,
        "finetuning_type": "lora", "lora_target": "all", "lora_rank": h["lora_rank"], "lora_alpha": h["lora_alpha"],
        "lora_dropout": h["lora_dropout"], "template": "chatml", "cutoff_len": args.cutoff_len,
        "tokenized_path": str(lf_dataset(root, data)),
        "dataset": "tokenized", "eval_dataset": "tokenized",  # names LF requires; tokenized_path wins
        "output_dir": str(out), "overwrite_output_dir": True,
        "per_device_train_batch_size": h["per_device_train_batch_size"],
        "per_device_eval_batch_size": h["per_device_eval_batch_size"], "learning_rate": h["learning_rate"],
        "lr_scheduler_type": h["lr_scheduler_type"], "warmup_steps": h["warmup_steps"], "max_steps": h["max_steps"],
        "logging_steps": h["logging_steps"], "save_strategy": "no", "report_to": "none", "seed": h["seed"],
        "use_cpu": True, "eval_strategy": "no", "include_effective_tokens_per_second": True,
        "include_num_input_tokens_seen": "non_padding", "disable_tqdm": True,
    }  # fmt: skip
    yaml_path = root / "lf.yaml"
    yaml_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(LF_CLI), "train", str(yaml_path)], env=env, capture_output=True, text=True)
    if done.returncode or not (out / "trainer_state.json").is_file():
        raise SystemExit(f"llamafactory-cli failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    state = json.loads((out / "trainer_state.json").read_text())
    train_metrics = json.loads((out / "train_results.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    eval_loss = (
        json.loads((out / "eval_results.json").read_text())["eval_loss"]
        if (out / "eval_results.json").is_file()
        else None
    )
    return Row(
        "LLaMA-Factory 0.9.5 (real)", state["num_input_tokens_seen"], train_metrics["train_runtime"], losses, eval_loss
    )


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per row (a multiple of 50)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rows", default="baseline,train,packed",
                        help="comma list of baseline, lf, train, packed; a train or packed row may take its own "
                             "flags: 'train[attn_implementation=sdpa;group_by_length=false]'")  # fmt: skip
    parser.add_argument("--lf", action="store_true", help="add a row for real LLaMA-Factory (from /tmp/lfvenv)")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                        help="a train flag for the train-step rows (JSON value), e.g. --set group_by_length=false")  # fmt: skip
    args = parser.parse_args()
    if args.steps % 50:
        print(f"note: --steps {args.steps} is not a multiple of 50: the grouped rows see a biased share of lengths")
    args.overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows_wanted = args.rows.split(",") + (["lf"] if args.lf and "lf" not in args.rows else [])
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renames (gradient checkpointing)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if "lf" in rows_wanted and not LF_CLI.exists():
        print(f"LLaMA-Factory is not installed ({LF_CLI} missing): comparing with the LF-equivalent baseline only")
        rows_wanted.remove("lf")

    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        root = Path(tmp)
        model = make_model(root, args.hidden, args.cutoff_len)
        records = conversations(args.samples + args.val, seed=0)
        plain = tokenize(root, model, records[: args.samples], records[args.samples :], args.cutoff_len, False)
        stats = json.loads((plain / "stats.json").read_text())["train"]
        print(f"{stats['samples']} conversations, {stats['tokens']} tokens (mean {stats['tokens'] / stats['rows']:.0f}, "
              f"{stats['truncated']} truncated at cutoff_len {args.cutoff_len}); {args.steps} steps × batch "
              f"{args.batch}, LoRA all, hidden {args.hidden}; train-step flags {args.overrides or 'as the catalog'}")  # fmt: skip
        rows = []
        for wanted in rows_wanted:
            kind, _, flags = wanted.partition("[")
            overrides = {k: parse_value(v) for k, v in (f.split("=", 1) for f in flags.rstrip("]").split(";") if f)}
            if kind == "baseline":
                rows.append(run_baseline(root, plain, model, args))
            elif kind == "lf":
                rows.append(run_lf(root, plain, model, args))
            elif kind == "train":
                rows.append(run_stage(root, "train step", plain, model, args, overrides))
            elif kind == "packed":
                packed = root / "template-True" / "out"
                packed = (
                    packed
                    if packed.is_dir()
                    else tokenize(root, model, records[: args.samples], records[args.samples :], args.cutoff_len, True)
                )
                rows.append(run_stage(root, "train step, packing", packed, model, args, overrides))
            else:
                raise SystemExit(f"unknown row {kind!r}")
    base = rows[0]
    print(f"{'':56} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'ratio':>6} {'mean loss':>9} {'last loss':>9} {'eval loss':>9}")  # fmt: skip
    for row in rows:
        losses = [sum(row.losses) / len(row.losses), row.losses[-1]] if row.losses else [None, None]
        figures = " ".join(f"{x:9.4f}" if x is not None else f"{'-':>9}" for x in [*losses, row.eval_loss])
        print(f"{row.name:56} {row.tokens:8d} {row.seconds:8.2f} {row.rate:9.0f} {row.rate / base.rate:6.2f} {figures}")
    print(f"ratios are effective tokens/s over the first row's ({base.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
