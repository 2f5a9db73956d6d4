"""The infer stage: greedy answers through the training template, stopping at its stop token."""

from __future__ import annotations

import json

import pytest
from test_train_support import QA, chain, make_ctx, pretrained, step_params, tokenized, train_params  # noqa: F401

from tunepipe.runtime.stages import infer, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pretrained):
    """A full fine-tune that has memorised the QA pairs, and a LoRA one on the same data."""
    tmp = tmp_path_factory.mktemp("trained")
    data = tokenized(tmp / "data", n=32)
    full = make_ctx(tmp, train_params(finetuning_type="full", learning_rate=5e-3, max_steps=60,
                                      per_device_train_batch_size=8), data=data, model=pretrained, step_id="full")  # fmt: skip
    train.run(full)
    lora = make_ctx(tmp, train_params(max_steps=2), data=data, model=pretrained, step_id="lora")
    train.run(lora)
    return full.out, lora.out


def ask(tmp_path, artifact, prompt, **params):
    ctx = make_ctx(tmp_path, {**step_params("infer"), "prompt": prompt, "max_new_tokens": 40, "use_cache": True, **params},
                   data=None, step_id="infer", kind="infer")  # fmt: skip
    ctx.inputs["model"] = artifact
    ctx.artifacts = chain(artifact)
    metrics = infer.run(ctx)
    return metrics, json.loads((ctx.out / "answer.json").read_text()), (ctx.out / "answer.txt").read_text()


def test_answers_as_trained_and_stops_at_the_template_stop_word(tmp_path, trained):
    full, _ = trained
    for question, expected in QA[:3]:
        metrics, record, text = ask(tmp_path, full, question)
        assert record["answer"] == metrics["answer"] == expected
        assert text == expected + "\n"
        im_end = json.loads((full / "template.json").read_text())["stop_token_ids"]
        assert record["stopped"] and record["token_ids"][-1] in im_end  # stopped at <|im_end|>, not max_new_tokens
        assert len(record["token_ids"]) < 40


def test_prompt_goes_through_the_training_template(tmp_path, trained):
    from transformers import AutoTokenizer

    full, _ = trained
    _, record, _ = ask(tmp_path, full, "Hello")
    tokenizer = AutoTokenizer.from_pretrained(full / "tokenizer")
    assert tokenizer.decode(record["prompt_ids"]) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_lora_artifact_is_merged_onto_its_base(tmp_path, trained, pretrained):
    """An adapter artifact answers with base + adapter (not the bare base), cache on or off alike."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.runtime.modeling import load_trained

    _, lora = trained
    metrics, record, _ = ask(tmp_path, lora, "Who are you?", max_new_tokens=8)
    _, uncached, _ = ask(tmp_path, lora, "Who are you?", max_new_tokens=8, use_cache=False)
    assert record["token_ids"] == uncached["token_ids"] and metrics["new_tokens"] == len(record["token_ids"]) >= 1
    ids = torch.tensor([record["prompt_ids"]])
    merged = load_trained(lora)[0](ids).logits
    assert not torch.allclose(merged, AutoModelForCausalLM.from_pretrained(pretrained)(ids).logits)
    assert merged[0, -1].argmax().item() == record["token_ids"][0]


def test_no_cuda_keeps_inference_on_the_cpu(tmp_path, trained, monkeypatch):
    """infer reads no_cuda: with a GPU reported, no_cuda still generates on the CPU."""
    import torch

    full, _ = trained
    moved = []
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        moved.append(str(args[0]) if args else str(kwargs.get("device")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    metrics, record, _ = ask(tmp_path, full, "Hello", no_cuda=True)
    assert record["answer"] == "Hello! How can I help you?" and "cpu" in moved and "cuda" not in moved
