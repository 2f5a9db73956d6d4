"""What the formats exported through transformers' own exporters (`transformers.exporters`: onnx,
openvino, executorch) share: the traced sample step, the side files, and the comparison with the HF model.

    sample_inputs(model)          forward kwargs of one step that continues a non-empty DynamicCache
    dynamic_shapes(inputs)        batch and lengths dynamic (optionally bounded), every other axis fixed
    write_side_files(...)         generation_config.json (eos ids + the template's stop tokens) and the
                                  tokenizer files copied from the model directory
    compare(runtime, model, ...)  the figures of the verify contract for a runtime decoder against the HF
                                  model: a prefill of each probe, then DECODE_STEPS decode steps fed the HF
                                  model's greedy tokens (so one disagreement does not derail the rest)

A runtime decoder is any object with `start()` (a new sequence, empty cache; returns itself) and
`step(tokens) -> logits [len(tokens), vocab]` (float32 numpy), its cache kept between steps.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from tunepipe.errors import UserError

DECODE_STEPS = 8
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# Shapes the graph is traced with: torch.export freezes a dim of size 0 or 1, so each dynamic one is >= 2.
SAMPLE_BATCH, SAMPLE_SEQUENCE, SAMPLE_PAST = 2, 3, 5
# A cache leaf's path, as transformers' exporters name graph inputs and outputs: `layers.3.keys`,
# `input.cache.layers.3.keys`, `output.cache.layers.3.values`.
CACHE_LEAF = re.compile(r"(?:^|\.)layers\.(\d+)\.(keys|values)$")


def check_type(format: str, type: str, supported: tuple[str, ...]) -> None:
    if type not in supported:
        raise UserError(
            f"unknown {format} export type {type!r}",
            details=[f"`type` of the {format} export is one of: {', '.join(supported)}"],
        )


def require(format: str, requires: tuple[tuple[str, str], ...]) -> None:
    """UserError naming the pip packages of `requires` ((import name, pip name), ...) that are absent."""
    missing = [pip for module, pip in requires if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(
            f"{format} export needs the Python package(s) {', '.join(missing)}",
            details=[f"pip install {' '.join(missing)}"],
        )


def check_probes(format: str, probes: list[list[int]]) -> list[list[int]]:
    """The non-empty probes; UserError when there are none."""
    probes = [list(probe) for probe in probes if len(probe)]
    if not probes:
        raise UserError(f"{format} verify got no probe tokens", details=["give verify at least one non-empty probe"])
    return probes


def load_model(model_dir: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=torch.float32).eval()


def sample_inputs(model, *, batch: int = SAMPLE_BATCH) -> dict:
    """Forward kwargs of a step that continues a non-empty past: the cache is filled by a forward over
    SAMPLE_PAST tokens, so its layers have whatever shapes the architecture gives them. It is a plain
    DynamicCache (every layer a full one): a sliding-window layer would add its window as a graph input and
    output, and the model's sliding-window mask applies the window over a full cache all the same."""
    import torch
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    past_ids = torch.randint(vocab, (batch, SAMPLE_PAST), generator=generator)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=past_ids, cache=cache, use_cache=True)
    total = SAMPLE_PAST + SAMPLE_SEQUENCE
    return {
        "input_ids": torch.randint(vocab, (batch, SAMPLE_SEQUENCE), generator=generator),
        "attention_mask": torch.ones(batch, total, dtype=torch.int64),
        "position_ids": torch.arange(SAMPLE_PAST, total).expand(batch, -1).contiguous(),
        "cache": cache,
        "use_cache": True,
    }


def dynamic_shapes(
    inputs: dict, *, dynamic_batch: bool = True, max_sequence: int | None = None, max_context: int | None = None
) -> dict:
    """Lengths dynamic (new tokens up to `max_sequence`, past and total up to `max_context`; unbounded
    by default), the batch too unless `dynamic_batch` is false, every other axis (heads, head_dim) fixed."""
    from torch.export import Dim
    from transformers.exporters.utils import get_leaf_tensors

    batch = {0: Dim.DYNAMIC} if dynamic_batch else {}
    sequence = Dim.DYNAMIC(max=max_sequence) if max_sequence else Dim.DYNAMIC
    past = Dim.DYNAMIC(max=max_context - 1) if max_context else Dim.DYNAMIC
    total = Dim.DYNAMIC(max=max_context) if max_context else Dim.DYNAMIC
    cache = get_leaf_tensors(inputs["cache"])
    return {
        "input_ids": {**batch, 1: sequence},
        "attention_mask": {**batch, 1: total},
        "position_ids": {**batch, 1: sequence},
        # One entry per cache leaf, in the order the exporters flatten the cache (the same walk).
        "cache": [{**batch, 2: past} if CACHE_LEAF.search(path) else None for path in cache],
    }


def write_side_files(model_dir: Path, out: Path, config, template: dict):
    """Write generation_config.json and copy the tokenizer files; returns (generation config, copied names)."""
    generation = generation_config(Path(model_dir), config, template)
    generation.save_pretrained(out)
    copied = [name for name in TOKENIZER_FILES if (Path(model_dir) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(model_dir) / name, Path(out) / name)
    return generation, copied


def generation_config(model_dir: Path, config, template: dict):
    """The model's generation config (or one from its config), its eos ids extended with the template's
    stop tokens so a runtime stops where the pipeline's template ends a turn."""
    from transformers import GenerationConfig

    if (model_dir / "generation_config.json").exists():
        generation = GenerationConfig.from_pretrained(model_dir)
    else:
        generation = GenerationConfig.from_model_config(config)
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos += [token for token in template.get("stop_token_ids") or [] if token not in eos]
    generation.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    if generation.pad_token_id is None:
        generation.pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos or [None])[0]
    return generation


def compare(runtime, model, probes: list[list[int]], *, format: str, type: str) -> dict:
    """The verify figures of `runtime` (a decoder, see the module docstring) against the HF `model`."""
    import numpy as np

    probes = check_probes(format, probes)
    rel, absolute, prefill_agree, decode_agree = [], [], [], []

    def record(got, want, agree: list) -> None:
        delta = np.abs(got - want).max(axis=-1)
        absolute.extend(delta.tolist())
        rel.extend((delta / np.abs(want).max(axis=-1)).tolist())
        agree.extend((got.argmax(axis=-1) == want.argmax(axis=-1)).tolist())

    for probe in probes:
        exported, reference = runtime.start(), HfDecoder(model)
        want = reference.step(probe)
        record(exported.step(probe), want, prefill_agree)
        for _ in range(DECODE_STEPS):
            token = int(want[-1].argmax())
            want = reference.step([token])
            record(exported.step([token]), want, decode_agree)
    agreement = prefill_agree + decode_agree
    return {
        "max_rel_logit_error": float(max(rel)),
        "max_abs_logit_error": float(max(absolute)),
        "greedy_agreement": float(np.mean(agreement)),
        "prefill_greedy_agreement": float(np.mean(prefill_agree)),
        "decode_greedy_agreement": float(np.mean(decode_agree)),
        "probes": len(probes),
        "positions": len(agreement),
        "decode_steps": DECODE_STEPS,
        "type": type,
    }


class HfDecoder:
    """The HF model stepping through one sequence with its own cache."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def step(self, tokens: list[int]):
        import torch

        with torch.no_grad():
            output = self.model(input_ids=torch.tensor([tokens]), cache=self.cache, use_cache=True)
        self.cache = output.cache
        return output.logits[0].float().numpy()
