"""Throughput of the template (tokenize) stage against a naive per-sample loop.

    python bench/tokenization.py [--conversations 20000] [--model examples/models/tiny-llama]

Generates a synthetic multi-turn corpus (deterministic) and, unless --model is given, a byte-level BPE
with a production-sized vocabulary trained on it (common words are one token, as with a 32k–150k
vocabulary; the bundled tiny-llama tokenizer has 1.4k tokens and splits words into ~4 pieces, which
makes the tokenizer's own Rust work dominate both sides). Then times, in this process:
- tunepipe: `stages.template.tokenize_split` (render, batched tokenization, labels, arrays) with 1 and 2 workers;
- naive: per sample `apply_chat_template(tokenize=False)` then `tokenizer(text)`, no labels at all.
- tunepipe with FastBPE off (runtime/fast_bpe.py): every text through the tokenizer's `encode_batch`,
  as before FastBPE; the ratio of the two is FastBPE's gain, on the same ids (the bench checks).
Prints tokens/s for each (fastest of --repeat runs) and tunepipe's speed-up over the naive loop.
--text picks the corpus' language: `english` (ASCII), `typeset` (curly quotes, dashes, ellipses:
still FastBPE's), `chinese` (each word three CJK characters: the tokenizer's own path).
"""

import os
import sys

# This file shares its name with the stdlib's `tokenize`, which transformers imports: keep the
# script's own directory off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a small big red green river hill house garden model token data train answer question "
    "pipeline quick brown fox jumps over lazy dog one two three four five six seven eight nine ten "
    "why how what when where who please explain write short story about cats and dogs in spring"
).split()


def corpus(n: int, seed: int = 0, text: str = "english") -> list[dict]:
    rng = random.Random(seed)
    words = WORDS
    if text == "chinese":
        words = ["".join(chr(0x4E00 + (hash(w) + 7 * k) % 3000) for k in range(3)) for w in WORDS]

    def sentence(k: int) -> str:
        line = " ".join(rng.choice(words) for _ in range(k)).capitalize() + rng.choice(".?!")
        if text == "typeset":
            line = f"“{line}” — {rng.choice(words)}’s…" if rng.random() < 0.5 else line
        return line

    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(8)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            messages.append(
                {"role": "user", "content": " ".join(sentence(rng.randint(4, 14)) for _ in range(rng.randint(1, 3)))}
            )
            messages.append(
                {
                    "role": "assistant",
                    "content": " ".join(sentence(rng.randint(4, 14)) for _ in range(rng.randint(1, 4))),
                }
            )
        records.append({"messages": messages, "tools": None})
    return records


def bench_tokenizer(records: list[dict], template: str):
    """A byte-level BPE trained on the corpus, with ChatML's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunepipe.runtime import chat_template as ct
    from tunepipe.runtime import template_registry

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = (m["content"] for r in records[:2000] for m in r["messages"])
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=32_000,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    entry = template_registry.get(template)
    tokenizer.chat_template = ct.SlotRenderer.build(entry, "", tokenizer.eos_token, None).to_jinja()
    return tokenizer


def naive(tokenizer, records: list[dict]) -> int:
    tokens = 0
    for r in records:
        text = tokenizer.apply_chat_template(r["messages"], tokenize=False)
        tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=20_000)
    ap.add_argument(
        "--model",
        help="tokenizer directory (default: a BPE trained on the corpus); "
        f"e.g. {ROOT / 'examples' / 'models' / 'tiny-llama'}",
    )
    ap.add_argument("--template", default="chatml")
    ap.add_argument("--text", choices=("english", "typeset", "chinese"), default="english")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest counts (shared machines)")
    args = ap.parse_args()

    from tunepipe.runtime import chat_template as ct
    from tunepipe.runtime.stages import template as stage

    records = corpus(args.conversations, text=args.text)
    if args.model:
        tokenizer, origin = stage.load_tokenizer({}, args.model), Path(args.model).name
    else:
        tokenizer, origin = bench_tokenizer(records, args.template), "BPE trained on the corpus"
    renderer, _ = ct.resolve({"template": args.template}, tokenizer, None)
    print(
        f"{len(records)} conversations, {sum(len(r['messages']) for r in records)} messages, "
        f"template {args.template}, tokenizer: {origin} ({len(tokenizer)} tokens)"
    )

    runs = {"naive apply_chat_template": lambda: naive(tokenizer, records)}
    for workers in (1, 2):
        params = {"cutoff_len": 4096, "preprocessing_num_workers": workers, "stage": "sft"}
        runs[f"tunepipe, {workers} worker{'s' if workers > 1 else ''}"] = lambda p=params: stage.tokenize_split(
            records, tokenizer, renderer, p
        )[1]["tokens"]
    params_1 = {"cutoff_len": 4096, "preprocessing_num_workers": 1, "stage": "sft"}
    runs["tunepipe, 1 worker, FastBPE off"] = lambda: without_fast_bpe(
        lambda: stage.tokenize_split(records, tokenizer, renderer, params_1)
    )[1]["tokens"]
    fast, slow = (
        stage.tokenize_split(records[:2000], tokenizer, renderer, params_1)[0],
        without_fast_bpe(lambda: stage.tokenize_split(records[:2000], tokenizer, renderer, params_1))[0],
    )
    if any(not np.array_equal(fast[k], slow[k]) for k in fast):
        sys.exit("FastBPE's arrays differ from the tokenizer's")
    # Rounds interleave the contenders, so a busy moment on a shared machine hits all of them.
    best = {label: (float("inf"), 0) for label in runs}
    for _ in range(args.repeat):
        for label, fn in runs.items():
            start = time.perf_counter()
            tokens = fn()
            best[label] = min(best[label], (time.perf_counter() - start, tokens))
    rate = {}
    for label, (seconds, tokens) in best.items():
        rate[label] = tokens / seconds
        print(f"  {label:<32} {tokens:>10} tokens  {seconds:7.2f} s  {rate[label]:>12,.0f} tokens/s")
    base = rate["naive apply_chat_template"]
    for label in list(runs)[1:]:
        print(f"ratio {label} / naive: {rate[label] / base:.2f}x")
    print(
        "ratio tunepipe, 1 worker / FastBPE off (the same ids): "
        f"{rate['tunepipe, 1 worker'] / rate['tunepipe, 1 worker, FastBPE off']:.2f}x"
    )


def without_fast_bpe(fn):
    """fn() with FastBPE declining every tokenizer: tunepipe's tokenizer path."""
    from unittest import mock

    from tunepipe.runtime import fast_bpe

    with mock.patch.object(fast_bpe.FastBPE, "of", classmethod(lambda cls, backend: None)):
        return fn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
