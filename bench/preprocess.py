"""Preprocessing end to end: `tunepipe run --until template` against LLaMA-Factory's `get_dataset`.

    python bench/preprocess.py [--conversations 20000] [--cutoff-len 2048] [--repeat 3] [--lf /tmp/lfvenv/bin/python]

Writes a deterministic ShareGPT corpus (multi-turn, long-tailed lengths, a Zipf vocabulary of ~4k words)
and a Qwen2-style tokenizer directory (a byte-level BPE of 32k tokens trained on it, tokenizer_class
Qwen2Tokenizer, model_type qwen2), then times whole processes, as a user runs them, on the same files:

  LLaMA-Factory   a fresh `python` that imports llamafactory and runs `get_train_args` → `load_tokenizer`
                  → `get_template_and_fix_tokenizer` → `get_dataset` (template qwen, the datasets
                  cache fresh each run), one worker (LF's default) — its data path, nothing else;
  tunepipe        `tunepipe run spec.yaml --until template` on an empty cache: CLI start-up,
                  validation, planning, the data step's process and the template step's process,
                  with preprocessing_num_workers 1 and 2.

Before any timing counts, one run of each writes its input_ids and labels and the bench checks they
are identical, sample by sample (LF keeps the corpus order; so does tunepipe with val_size 0).
Prints each figure's median and the ratios: LF / tunepipe (1 worker), and tunepipe 1 / 2 workers, as
the median of the rounds' ratios (each round runs the contenders back to back, so a ratio holds while
a shared machine's speed drifts between rounds) and as the ratio of the medians.
LLaMA-Factory is looked for at --lf (default /tmp/lfvenv/bin/python, see bench/README or issue 16
for the side venv); without it the bench says so and times tunepipe alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNEPIPE = Path(sys.executable).with_name("tunepipe")

LF_SCRIPT = r"""
import json, sys, time
args, dump = json.loads(sys.argv[1]), sys.argv[2]
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer
import llamafactory.data.loader as loader
preprocess = loader._get_preprocessed_dataset  # the "Running tokenizer on dataset" map: LF's tokenizing phase
tokenizing = []
def timed_preprocess(*a, **k):
    start = time.perf_counter()
    try:
        return preprocess(*a, **k)
    finally:
        tokenizing.append(time.perf_counter() - start)
loader._get_preprocessed_dataset = timed_preprocess
model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
tokenizer_module = load_tokenizer(model_args)
template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
dataset = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
print("DONE", time.time(), sum(tokenizing), flush=True)
if dump:
    with open(dump, "w") as f:
        for row in dataset:
            f.write(json.dumps([row["input_ids"], row["labels"]]) + "\n")
"""


# ---------------------------------------------------------------------------------- the inputs
def vocabulary(rng: random.Random, n: int = 4000) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "ch", "st", "qu", "ng"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    return sorted(words)


def corpus(n: int, seed: int = 0) -> list[dict]:
    """ShareGPT conversations: 1–6 turns, answers with a long tail (a few near the cutoff)."""
    rng = random.Random(seed)
    words = vocabulary(rng)
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words are most of the text

    def sentences(k: int) -> str:
        out = []
        for _ in range(k):
            picked = rng.choices(words, weights, k=rng.randint(4, 16))
            out.append(" ".join(picked).capitalize() + rng.choice((".", ".", ".", "?", "!", ",")))
        return " ".join(out)

    records = []
    for _ in range(n):
        turns = []
        for _ in range(rng.choice((1, 1, 2, 2, 3, 3, 4, 5, 6))):
            answer = rng.choice((2, 3, 4, 6, 8, 12)) if rng.random() > 0.03 else rng.randint(60, 120)
            turns += [
                {"from": "human", "value": sentences(rng.randint(1, 4))},
                {"from": "gpt", "value": sentences(answer)},
            ]
        records.append({"conversations": turns})
    return records


def write_inputs(root: Path, n: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    records = corpus(n)
    data = root / "data"
    data.mkdir(parents=True)
    (data / "corpus.json").write_text(json.dumps(records, ensure_ascii=False))
    (data / "dataset_info.json").write_text(
        json.dumps(
            {"bench": {"file_name": "corpus.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}}}
        )
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(
        (turn["value"] for r in records[:3000] for turn in r["conversations"]),
        trainers.BpeTrainer(
            vocab_size=32_000,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    model = root / "model"
    model.mkdir()
    backend.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "extra_special_tokens": specials[1:],
                "model_max_length": 32768,
            }
        )
    )
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "vocab_size": backend.get_vocab_size(),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
            }
        )
    )


def write_spec(root: Path, cutoff_len: int, workers: int) -> Path:
    spec = root / f"spec-{workers}.yaml"
    spec.write_text(
        "version: 1\nname: preprocess\n"
        "model: {model_name_or_path: model}\n"
        f"data: {{dataset: bench, dataset_dir: data, cutoff_len: {cutoff_len}, val_size: 0, "
        f"preprocessing_num_workers: {workers}}}\n"
        "template: {template: qwen}\n"
        "train: [{finetuning_type: lora}]\n"
    )
    return spec


# ---------------------------------------------------------------------------------- the runs
def run_tunepipe(spec: Path, cache: Path) -> tuple[float, float]:
    """(process wall, the template step's tokenizing seconds from its manifest)."""
    env = {**os.environ, "TUNEPIPE_CACHE": str(cache)}
    start = time.time()
    done = subprocess.run(
        [str(TUNEPIPE), "run", str(spec), "--until", "template"], env=env, capture_output=True, text=True
    )
    wall = time.time() - start
    if done.returncode != 0:
        sys.exit(f"tunepipe failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    manifests = (json.loads(m.read_text()) for m in cache.rglob("manifest.json"))
    return wall, next(m["metrics"]["tokenizing_s"] for m in manifests if m["kind"] == "template")


def tunepipe_rows(cache: Path) -> list[tuple[list[int], list[int]]]:
    import numpy as np

    [offsets] = cache.rglob("train.offsets.npy")
    ids = np.load(offsets.with_name("train.input_ids.npy"))
    labels = np.load(offsets.with_name("train.labels.npy"))
    bounds = np.load(offsets)
    return [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def lf_args(root: Path, cutoff_len: int, out: Path) -> dict:
    return {
        "model_name_or_path": str(root / "model"),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "dataset": "bench",
        "dataset_dir": str(root / "data"),
        "template": "qwen",
        "cutoff_len": cutoff_len,
        "overwrite_cache": True,
        "output_dir": str(out),
        "report_to": "none",
    }


def run_lf(python: str, args: dict, dump: str = "") -> tuple[float, float]:
    """(process wall up to the tokenized dataset, its tokenizing phase's seconds)."""
    with tempfile.TemporaryDirectory() as hf_cache:
        env = {**os.environ, "HF_DATASETS_CACHE": hf_cache, "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1"}
        start = time.time()
        done = subprocess.run(
            [python, "-c", LF_SCRIPT, json.dumps(args), dump], env=env, capture_output=True, text=True
        )
    if done.returncode != 0:
        sys.exit(f"LLaMA-Factory failed:\n{done.stderr[-3000:]}")
    _, finished, tokenizing = next(line.split() for line in done.stdout.splitlines() if line.startswith("DONE "))
    return float(finished) - start, float(tokenizing)  # the dump for the check does not count


def report_ratio(label: str, a: list[float], b: list[float]) -> None:
    paired = [x / y for x, y in zip(a, b)]
    print(
        f"ratio {label}: {statistics.median(paired):.2f}x (median of {len(paired)} rounds, "
        f"{min(paired):.2f}-{max(paired):.2f}; ratio of medians {statistics.median(a) / statistics.median(b):.2f}x)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=20_000)
    ap.add_argument("--cutoff-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lf", default="/tmp/lfvenv/bin/python", help="a python with llamafactory installed")
    args = ap.parse_args()
    lf = (
        args.lf
        if Path(args.lf).exists()
        and subprocess.run([args.lf, "-c", "import llamafactory"], capture_output=True).returncode == 0
        else None
    )

    with tempfile.TemporaryDirectory(prefix="tunepipe-preprocess-") as tmp:
        root = Path(tmp)
        write_inputs(root, args.conversations)
        specs = {w: write_spec(root, args.cutoff_len, w) for w in (1, 2)}

        # Identical tokens first: one run of each writes what it produced.
        run_tunepipe(specs[1], root / "check-cache")
        ours = tunepipe_rows(root / "check-cache")
        tokens = sum(len(ids) for ids, _ in ours)
        print(f"{args.conversations} conversations, {tokens} tokens, template qwen, cutoff {args.cutoff_len}")
        if lf:
            dump = root / "lf.jsonl"
            run_lf(lf, lf_args(root, args.cutoff_len, root / "lf-out"), str(dump))
            theirs = [tuple(json.loads(line)) for line in dump.open()]
            same = len(theirs) == len(ours) and all(
                list(a) == b[0] and list(la) == b[1] for (a, la), b in zip(theirs, ours)
            )
            if not same:
                bad = next(
                    (i for i, (t, o) in enumerate(zip(theirs, ours)) if list(t[0]) != o[0] or list(t[1]) != o[1]), None
                )
                sys.exit(
                    f"input_ids/labels differ from LLaMA-Factory's ({len(theirs)} vs {len(ours)} rows; first at {bad})"
                )
            print(f"input_ids and labels identical to LLaMA-Factory's on all {len(ours)} samples")
        else:
            print(f"LLaMA-Factory not found at {args.lf}: timing tunepipe alone (see issue 16 for the side venv)")

        tunepipe = {"tunepipe, 1 worker": specs[1], "tunepipe, 2 workers": specs[2]}
        labels = [*tunepipe] + (["LLaMA-Factory get_dataset"] if lf else [])
        walls: dict[str, list[float]] = {label: [] for label in labels}
        tokenizing: dict[str, list[float]] = {label: [] for label in labels}
        for r in range(args.repeat):  # rounds interleave the contenders
            for label in labels:
                if label in tunepipe:
                    wall, tok = run_tunepipe(tunepipe[label], root / f"cache-{r}-{labels.index(label)}")
                else:
                    wall, tok = run_lf(lf, lf_args(root, args.cutoff_len, root / "lf-out"))
                walls[label].append(wall)
                tokenizing[label].append(tok)
        print("process wall (tokenizing phase: tunepipe's template step, LLaMA-Factory's tokenizer map):")
        for label in labels:
            w, t = walls[label], tokenizing[label]
            print(
                f"  {label:<28} median {statistics.median(w):6.2f} s  (min {min(w):.2f}, max {max(w):.2f})"
                f"   tokenizing {statistics.median(t):6.2f} s ({tokens / statistics.median(t) / 1e3:,.0f}k tokens/s)"
            )
        one, two = walls["tunepipe, 1 worker"], walls["tunepipe, 2 workers"]
        if lf:
            report_ratio("LLaMA-Factory / tunepipe (1 worker), process wall", walls["LLaMA-Factory get_dataset"], one)
            report_ratio(
                "LLaMA-Factory / tunepipe (1 worker), tokenizing phase",
                tokenizing["LLaMA-Factory get_dataset"],
                tokenizing["tunepipe, 1 worker"],
            )
        report_ratio("tunepipe 1 worker / 2 workers, process wall", one, two)
    return 0


if __name__ == "__main__":
    sys.exit(main())
