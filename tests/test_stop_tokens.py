"""Every built-in template trains, at the end of each answer, a token that generation stops on (the eos
or one of the template's stop words), so a model tuned with it learns to stop. Tokenized the way the
template stage does it (`template.prepare` + `template.tokenize_split`) on the bundled tokenizer, with
the template's stop words added as special tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tunepipe.runtime import chat_template as ct  # noqa: E402
from tunepipe.runtime import template_registry  # noqa: E402
from tunepipe.runtime.stages import template  # noqa: E402
from tunepipe.spec.catalog import load_catalog  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-llama"
ANSWERS = ["I was trained by tunepipe.", "It is 42."]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who made you?"},
    {"role": "assistant", "content": ANSWERS[0]},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": ANSWERS[1]},
]
BUILT_IN = [name for name in template_registry.template_names() if name != template_registry.AUTO]


def stage_params(name: str) -> dict:
    """A template step's params: every flag at its catalog default, this template, stop words added."""
    params = {flag.name: flag.default for flag in load_catalog().flags.values()}
    return params | {"template": name, "stage": "sft", "resize_vocab": True}


def tokenize(name: str):
    """(tokenizer, template.json, ids, labels) of CONVERSATION, as the template stage writes them."""
    params = stage_params(name)
    tokenizer, renderer, info, _ = template.prepare(params, {"model": MODEL}, MODEL.parent)
    arrays, _ = template.tokenize_split([{"messages": CONVERSATION}], tokenizer, renderer, params)
    return tokenizer, info, arrays["input_ids"].tolist(), arrays["labels"].tolist()


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The trained tokens, one run per stretch of labels != -100 (one per answer)."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != ct.IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_every_built_in_template_is_checked():
    assert len(BUILT_IN) >= 20 and {"chatglm3", "cpm", "baichuan", "baichuan2"} <= set(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_answer_trains_a_token_generation_stops_on(name):
    tokenizer, info, ids, labels = tokenize(name)
    stop_ids = set(info["stop_token_ids"])
    assert stop_ids == {tokenizer.convert_tokens_to_ids(w) for w in info["stop_words"]} | {tokenizer.eos_token_id}
    runs = trained_runs(ids, labels)
    assert len(runs) == len(ANSWERS), [tokenizer.decode(r) for r in runs]
    for run, answer in zip(runs, ANSWERS):
        # replaying the trained tokens, generation stops at the first stop token: it must be there,
        # after the whole answer; what the template trains after it (chatml's "\n") is never generated
        stop = next((k for k, token in enumerate(run) if token in stop_ids), None)
        assert stop is not None, f"{name}: {tokenizer.decode(run)!r} trains no token that generation stops on"
        assert answer in tokenizer.decode(run[:stop]), f"{name}: generation would stop inside {answer!r}"
        rest = run[stop + 1 :]
        assert all(token in stop_ids or not tokenizer.decode([token]).strip() for token in rest), (
            f"{name}: {tokenizer.decode(rest)!r} trained after the stop token"
        )


def test_chatglm3_trains_the_next_role_token_and_a_final_eos():
    """ChatGLM3 has no end-of-turn token: its own fine-tuning trains the role token after an answer
    and an eos after the last one; the text otherwise is the model's chat template's."""
    tokenizer, _, ids, labels = tokenize("chatglm3")
    assert tokenizer.decode(ids) == (
        "[gMASK]sop<|system|>\n Answer briefly.<|user|>\n Who made you?<|assistant|>\n "
        "I was trained by tunepipe.<|user|>\n What is 12 plus 30?<|assistant|>\n It is 42."
        "<|endoftext|>"
    )
    assert [tokenizer.decode(r) for r in trained_runs(ids, labels)] == [
        "\n I was trained by tunepipe.<|user|>",
        "\n It is 42.<|endoftext|>",
    ]


def test_cpm_and_baichuan2_train_the_next_user_token_and_a_final_eos():
    tokenizer, _, ids, labels = tokenize("cpm")
    assert [tokenizer.decode(r) for r in trained_runs(ids, labels)] == [
        "I was trained by tunepipe.<用户>",
        "It is 42.<|endoftext|>",
    ]
    tokenizer, _, ids, labels = tokenize("baichuan2")
    assert "<reserved_106>Who made you?<reserved_107>I was trained by tunepipe.<reserved_106>What" in tokenizer.decode(
        ids
    )
    assert [tokenizer.decode(r) for r in trained_runs(ids, labels)] == [
        "I was trained by tunepipe.<reserved_106>",
        "It is 42.<|endoftext|>",
    ]
