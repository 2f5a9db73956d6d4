"""Effective (non-padding) training tokens/s of the train step against a plain Trainer baseline.

    python bench/train.py [--steps 30] [--cutoff-len 256] [--batch 8] [--samples 480]

Same model (a seeded random tiny Llama from examples/models/tiny-llama, widened with --hidden),
same LoRA setup, same conversations tokenized by the template stage, same batch size and number
of optimizer steps, in one process, one after the other:

  baseline   a stock `Trainer`, random order, every sample padded to cutoff_len (what a
             pad-to-max-length recipe does)
  train      tunepipe's train step as a spec gets it: group_by_length, pad to the longest in the batch
  packed     the train step on the template stage's packed rows (packing: true)

Effective tokens are the real (non-padding) tokens the optimizer saw; each row's rate is
tokens / wall time of `trainer.train()` only (model loading excluded). The conversations have
a long-tailed length mix, like real chat data: most short, a few near cutoff_len.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from tunepipe.runtime.context import StepContext
from tunepipe.spec.catalog import load_catalog

WORDS = (REPO / "examples" / "data" / "tiny_corpus.jsonl").read_text().split()


def conversations(n: int, seed: int) -> list[dict]:
    """Chat samples whose lengths follow a long tail: mostly short, some near the cutoff."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = min(int(rng.lognormvariate(3.3, 0.8)), 400)
        question = " ".join(rng.choices(WORDS, k=max(3, words // 4)))
        answer = " ".join(rng.choices(WORDS, k=max(3, words)))
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                    "tools": None})  # fmt: skip
    return out


def defaults(kind: str) -> dict:
    return {f.name: f.default for f in load_catalog().flags.values() if kind in f.used_by or f.section == kind}


def context(root: Path, step_id: str, kind: str, params: dict, inputs: dict, files: dict) -> StepContext:
    out, work = root / step_id / "out", root / step_id / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return StepContext(step_id, kind, "0" * 64, params, inputs, files, 42, root, out, work, logging.getLogger(step_id))


def tokenize(root: Path, model: Path, records: list[dict], cutoff_len: int, packing: bool) -> Path:
    from tunepipe.runtime.stages import template

    raw = root / f"records-{packing}"
    raw.mkdir()
    (raw / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
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


def make_model(root: Path, hidden: int) -> Path:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = REPO / "examples" / "models" / "tiny-llama"
    config = AutoConfig.from_pretrained(tiny)
    config.hidden_size, config.intermediate_size, config.head_dim = (
        hidden,
        hidden * 2,
        hidden // config.num_attention_heads,
    )
    torch.manual_seed(0)
    path = root / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny / name, path / name)
    return path


def train_params(args) -> dict:
    return {
        **defaults("train"), "seed": 42, "stage": "sft", "finetuning_type": "lora", "lora_target": ["all"],
        "learning_rate": 1e-3, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
        "logging_steps": 10, "save_steps": 10_000, "disable_tqdm": True, "report_to": "none",
        "warmup_ratio": 0.0, "group_by_length": True,
    }  # fmt: skip


def run_stage(root: Path, step_id: str, data: Path, model: Path, args) -> tuple[float, int]:
    from tunepipe.runtime.stages import train

    ctx = context(root, step_id, "train", train_params(args), {"template": data}, {"model": model})
    metrics = train.run(ctx)
    return metrics["tokens"], metrics["train_runtime_s"]


def run_baseline(root: Path, data: Path, model_dir: Path, args) -> tuple[float, int]:
    """The stock recipe: Trainer + peft, RandomSampler, every sample padded to cutoff_len."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from tunepipe.runtime.collate import PadCollator, TokenizedSplit
    from tunepipe.runtime.modeling import linear_module_names

    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=linear_module_names(model)))  # fmt: skip
    p = train_params(args)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(root / "baseline"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=p["learning_rate"],
            lr_scheduler_type="cosine",
            save_strategy="no",
            report_to="none",
            logging_steps=10,
            disable_tqdm=True,
            use_cpu=True,
            seed=42,
            remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",
        ),  # fmt: skip
        train_dataset=TokenizedSplit(data, "train", "sft"),
        data_collator=PadCollator(tokenizer.pad_token_id, pad_to=args.cutoff_len),
    )
    started = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--samples", type=int, default=480)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        root = Path(tmp)
        model = make_model(root, args.hidden)
        records = conversations(args.samples, seed=0)
        plain = tokenize(root, model, records, args.cutoff_len, packing=False)
        packed = tokenize(root, model, records, args.cutoff_len, packing=True)
        stats = json.loads((plain / "stats.json").read_text())["train"]
        print(f"{stats['samples']} conversations, {stats['tokens']} tokens "
              f"(mean {stats['tokens'] / stats['rows']:.0f}, cutoff_len {args.cutoff_len}); "
              f"{args.steps} steps × batch {args.batch}, LoRA all, hidden {args.hidden}")  # fmt: skip
        rows = [
            ("baseline (Trainer, pad to cutoff_len)", run_baseline(root, plain, model, args)),
            ("train step (group_by_length)", run_stage(root, "train", plain, model, args)),
            ("train step (packing)", run_stage(root, "packed", packed, model, args)),
        ]
    base_rate = rows[0][1][0] / rows[0][1][1]
    print(f"{'':40} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'ratio':>6}")
    for name, (tokens, seconds) in rows:
        rate = tokens / seconds
        print(f"{name:40} {tokens:8d} {seconds:8.2f} {rate:9.0f} {rate / base_rate:6.2f}")
    ratio = rows[1][1][0] / rows[1][1][1] / base_rate
    print(f"ratio (train step / baseline, effective tokens/s): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
