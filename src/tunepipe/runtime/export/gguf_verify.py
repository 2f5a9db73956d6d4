"""Does the GGUF compute what the HF model computes, and prompt it the way it was trained?

    figures = verify(gguf_path, model_dir, probes, template=template_json, log=log)

Logits: each probe (token ids) is extended by the HF model's 8-token greedy continuation; llama.cpp
(llama-cpp-python, all logits) and the HF model in float32 then score the same sequence. Per position
the relative error is max|Δ| / max|ref|; `max_rel_logit_error` is its maximum over positions and probes.
`greedy_agreement` is the fraction of positions (probe positions and continuation positions) whose
argmax agrees — teacher-forced on the HF continuation, so one early disagreement is not counted twice.
Chat template: a short conversation is rendered through the GGUF's embedded `tokenizer.chat_template`
with llama-cpp-python's Jinja formatter, tokenized by the GGUF's own tokenizer, and compared id for id
with the HF tokenizer's `apply_chat_template` from model_dir — the whole conversation, and the
generation prompt (also against tunepipe's own prompt encoding of the template.json).
This module reports figures; the verify stage compares them with the catalog's thresholds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

CONTINUATION = 8
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def verify(
    gguf_path: Path, model_dir: Path, probes: list[list[int]], *, template: dict, log: logging.Logger
) -> dict[str, Any]:
    import transformers

    probes = [list(map(int, p)) for p in probes if len(p)]
    if not probes:
        raise ValueError("verify needs at least one non-empty probe")
    hf = _hf_model(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    sequences = [p + greedy_continuation(hf, p, CONTINUATION) for p in probes]
    llm = _llama(gguf_path, max(len(s) for s in sequences))
    rel, abs_, agree, positions = 0.0, 0.0, 0, 0
    for seq in sequences:
        ref = hf_logits(hf, seq)
        got = llama_logits(llm, seq)
        delta = np.abs(got - ref).max(axis=1)
        rel = max(rel, float((delta / np.abs(ref).max(axis=1)).max()))
        abs_ = max(abs_, float(delta.max()))
        agree += int((got.argmax(axis=1) == ref.argmax(axis=1)).sum())
        positions += len(seq)
    chat = chat_template_check(llm, tokenizer, template)
    figures = {
        "max_rel_logit_error": rel,
        "max_abs_logit_error": abs_,
        "greedy_agreement": agree / positions,
        "probes": len(probes),
        "positions": positions,
        "continuation_tokens": CONTINUATION,
        "chat_template_tokens_match": chat["match"],
        "chat_template": chat,
    }
    log.info(
        "gguf verify: max rel logit error %.3g, greedy agreement %.4f over %d positions, chat template %s",
        rel,
        agree / positions,
        positions,
        "matches" if chat["match"] else "DIFFERS",
    )
    return figures


# ------------------------------------------------------------------------------------- models
def _hf_model(model_dir: Path):
    import torch
    import transformers

    # eager attention: gemma2's attention softcapping is applied only there
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _llama(gguf_path: Path, n_tokens: int):
    """llama.cpp with a float32 KV cache: its default f16 cache alone costs ~1e-3 relative logit error,
    which would hide what the file itself computes."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf_path),
        logits_all=True,
        n_ctx=max(n_tokens, 64),
        n_batch=max(n_tokens, 64),
        verbose=False,
        seed=0,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    """The HF model's next `n` argmax tokens after `ids` (no stop on eos: positions to compare)."""
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(hf_logits(model, ids + tokens)[-1].argmax()))
    return tokens


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


# ------------------------------------------------------------------------------ chat template
def chat_template_check(llm, tokenizer, template: dict) -> dict[str, Any]:
    """The GGUF's embedded chat template, rendered by llama-cpp-python and tokenized by llama.cpp, vs
    the HF tokenizer's apply_chat_template (and tunepipe's prompt encoding) of the same messages.
    A template that rejects a system message (raise_exception) is checked without one."""
    import jinja2

    source = llm.metadata.get("tokenizer.chat_template")
    if not source:
        return {"match": False, "reason": "the GGUF has no tokenizer.chat_template"}
    out: dict[str, Any] = {"match": True}
    for name, (messages, generation) in {
        "conversation": (CONVERSATION, False),
        "generation_prompt": (CONVERSATION[:2], True),
    }.items():
        try:
            case = _compare(llm, source, tokenizer, template, messages, generation)
        except (jinja2.TemplateError, ValueError, TypeError):  # e.g. raise_exception on a system message: retry without
            case = _compare(llm, source, tokenizer, template, messages[1:], generation)
            case["system_message"] = False
        out[name] = case
        out["match"] = out["match"] and case["match"]
    return out


def _compare(llm, source: str, tokenizer, template: dict, messages: list[dict], generation: bool) -> dict[str, Any]:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    text_of = lambda t: llm._model.token_get_text(t) if t != -1 else ""  # as Llama() builds its formatter
    formatter = Jinja2ChatFormatter(
        template=source,
        eos_token=text_of(llm.token_eos()),
        bos_token=text_of(llm.token_bos()),
        add_generation_prompt=generation,
    )
    text = formatter(messages=messages).prompt
    # add_bos=False: the template's own tokens, as apply_chat_template (add_special_tokens=False)
    gguf_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    hf_ids = _token_ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation))
    case: dict[str, Any] = {"tokens": len(gguf_ids), "match": gguf_ids == hf_ids}
    if generation and (template.get("slots") or template.get("chat_template")):
        from tunepipe.runtime.chat_template import encode_prompt

        case["pipeline_match"] = gguf_ids == encode_prompt(tokenizer, template, messages)
        case["match"] = case["match"] and case["pipeline_match"]
    if not case["match"]:
        case.update(gguf_ids=gguf_ids, hf_ids=hf_ids, first_difference=_first_difference(gguf_ids, hf_ids))
    return case


def _token_ids(result) -> list[int]:
    """apply_chat_template(tokenize=True) returns ids, or (transformers ≥ 5) a BatchEncoding."""
    ids = result["input_ids"] if hasattr(result, "keys") else result
    return [int(i) for i in ids]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
