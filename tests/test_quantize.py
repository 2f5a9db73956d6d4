"""The quantize stage on a tiny llama: each method that runs on CPU here writes a model its library
loads, whose weights really are quantized and whose logits stay near the merged model's.

Bounds are the measured figures on this tiny random model (weights of std 0.2, so 4-bit rounding
moves logits a lot) with a margin: bnb 8-bit agreement 0.93 / rel error 0.086, hqq 8-bit 0.92 /
0.059, bnb 4-bit 0.30 / 0.74, hqq 4-bit 0.39 / 0.66, gptq 4-bit 0.29 / 0.82, mlc 4-bit 0.23 / 0.83 (122 positions).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_support import step_params
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunepipe.errors import UserError
from tunepipe.runtime import quantize
from tunepipe.runtime.context import StepContext
from tunepipe.runtime.export.mlc_quant import dequantize_group, quantize_group
from tunepipe.runtime.stages import quantize as stage

TEMPLATE = {
    "name": "chatml",
    "source": "registry",
    "stop_words": ["<|im_end|>"],
    "eos_token": "<|im_end|>",
    "generation_prompt": "<|im_start|>assistant\n",
    "default_system": None,
}
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
needs_gptq = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel not installed")
needs_hqq = pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq not installed")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A merge artifact: model/ (a complete HF directory with tokenizer files) + template.json."""
    artifact = tmp_path_factory.mktemp("merged")
    make_tiny_model("llama", artifact / "model", seed=1)
    template = {
        **TEMPLATE,
        "source": "tokenizer",
        "chat_template": (artifact / "model" / "chat_template.jinja").read_text(),
    }
    (artifact / "template.json").write_text(json.dumps(template, sort_keys=True))
    return artifact


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, merged):
    """A template artifact's tokenized train split (input_ids + offsets), 24 chat samples."""
    data = tmp_path_factory.mktemp("data")
    tokenizer = AutoTokenizer.from_pretrained(merged / "model")
    rows = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": f"Question {i}: what is {i} plus {i * 3}?"},
                {"role": "assistant", "content": f"It is {i * 4}."},
            ],
            tokenize=False,
        )
        for i in range(24)
    ]
    ids = [tokenizer(row, add_special_tokens=False)["input_ids"] for row in rows]
    np.save(data / "train.input_ids.npy", np.concatenate(ids).astype(np.int32))
    np.save(data / "train.offsets.npy", np.cumsum([0] + [len(x) for x in ids]).astype(np.int64))
    return data


def run_stage(tmp_path, merged, method, bits, **inputs):
    (tmp_path / "out").mkdir(parents=True)
    ctx = StepContext(
        id="quantize",
        kind="quantize",
        key="k" * 64,
        params={**step_params("quantize"), "method": method, "bits": bits},
        inputs={"model": merged, **inputs},
        files={},
        seed=0,
        spec_dir=tmp_path,
        out=tmp_path / "out",
        work=tmp_path / "work",
    )
    metrics = stage.run(ctx)
    return tmp_path / "out", metrics


def assert_copied_tokenizer_and_template(out, merged):
    assert (out / "template.json").read_bytes() == (merged / "template.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / "model" / name).read_bytes() == (merged / "model" / name).read_bytes()
    prompt = [{"role": "user", "content": "hi"}]
    ours, theirs = (AutoTokenizer.from_pretrained(d) for d in (out / "model", merged / "model"))
    assert ours.apply_chat_template(prompt, tokenize=False) == theirs.apply_chat_template(prompt, tokenize=False)


def logits(model, ids=(1, 5, 9, 42, 7, 300)):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@needs_bnb
def test_bnb_8bit_saves_int8_weights_that_transformers_reloads(tmp_path, merged):
    import bitsandbytes as bnb

    out, metrics = run_stage(tmp_path, merged, "bnb", 8)
    assert metrics["greedy_agreement"] >= 0.9 and metrics["max_rel_logit_error"] <= 0.15
    config = json.loads((out / "model" / "config.json").read_text())
    assert (
        config["quantization_config"]["quant_method"] == "bitsandbytes"
        and config["quantization_config"]["load_in_8bit"]
    )
    stored = load_file(out / "model" / "model.safetensors")
    q_proj = stored["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.dtype == torch.int8 and "model.layers.0.self_attn.q_proj.SCB" in stored
    assert stored["model.embed_tokens.weight"].dtype == torch.float32  # only the Linear layers
    # int8 codes times their row scale (SCB / 127) give back the merged weights, to half a step plus
    # float16 rounding (bitsandbytes quantizes the float16 cast of the weight)
    original = load_file(merged / "model" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    scale = stored["model.layers.0.self_attn.q_proj.SCB"][:, None] / 127
    assert torch.allclose(q_proj.float() * scale, original, atol=float(scale.max()) / 2 + 5e-4)
    model = quantize.load("bnb", out / "model")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    record = json.loads((out / "quantize.json").read_text())
    assert record["method"] == "bnb" and record["bits"] == 8 and record["quant_type"] == "int8"
    assert record["versions"]["bitsandbytes"] and len(record["modules"]) == 14  # 2 layers × 7 Linear
    assert record["figures"]["greedy_agreement"] == metrics["greedy_agreement"]
    assert_copied_tokenizer_and_template(out, merged)


@needs_bnb
def test_bnb_4bit_is_nf4_packed_and_reloads_to_the_same_logits(tmp_path, merged):
    import bitsandbytes as bnb

    out, metrics = run_stage(tmp_path, merged, "bnb", 4)
    assert metrics["greedy_agreement"] >= 0.2 and metrics["max_rel_logit_error"] <= 1.0
    stored = load_file(out / "model" / "model.safetensors")
    packed = stored["model.layers.0.mlp.up_proj.weight"]
    assert packed.dtype == torch.uint8 and packed.numel() == 128 * 64 // 2  # two nf4 codes a byte
    assert any("quant_state.bitsandbytes__nf4" in name for name in stored)
    model = quantize.load("bnb", out / "model")
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    again = quantize.load("bnb", out / "model")
    assert torch.equal(logits(model), logits(again))
    reference = AutoModelForCausalLM.from_pretrained(merged / "model")
    assert not torch.allclose(logits(model), logits(reference), atol=1e-3)  # it is not the float model


@needs_hqq
def test_hqq_packs_weights_and_error_shrinks_with_bits(tmp_path, merged):
    from hqq.core.quantize import HQQLinear

    figures = {}
    for bits in (2, 4, 8):
        out, figures[bits] = run_stage(tmp_path / str(bits), merged, "hqq", bits)
        model = quantize.load("hqq", out / "model")
        layer = model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, HQQLinear) and layer.meta["nbits"] == bits and layer.meta["group_size"] == 64
        assert layer.W_q.dtype == torch.uint8
        record = json.loads((out / "quantize.json").read_text())
        assert record["versions"]["hqq"] and record["group_size"] == 64 and len(record["modules"]) == 14
        config = json.loads((out / "model" / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "hqq" and config["quantization_config"]["nbits"] == bits
    assert_copied_tokenizer_and_template(out, merged)
    assert figures[8]["greedy_agreement"] >= 0.85 and figures[8]["max_rel_logit_error"] <= 0.12
    assert figures[4]["greedy_agreement"] >= 0.25 and figures[4]["max_rel_logit_error"] <= 1.0
    assert figures[2]["max_rel_logit_error"] > figures[4]["max_rel_logit_error"] > figures[8]["max_rel_logit_error"]


@needs_gptq
def test_gptq_calibrates_on_the_data_and_packs_int32_weights(tmp_path, merged, calibration):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    out, metrics = run_stage(tmp_path, merged, "gptq", 4, calibration=calibration)
    assert metrics["greedy_agreement"] >= 0.2 and metrics["max_rel_logit_error"] <= 1.0
    stored = load_file(out / "model" / "model.safetensors")
    qweight = stored["model.layers.0.self_attn.q_proj.qweight"]
    assert qweight.dtype == torch.int32 and qweight.shape == (64 * 4 // 32, 64)  # 8 int4 codes per int32
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    config = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 64
    assert config["meta"]["offload_to_disk_path"] is None  # no temporary path in the artifact
    record = json.loads((out / "quantize.json").read_text())
    assert record["calibration_samples"] == 24 and record["versions"]["gptqmodel"] and len(record["modules"]) == 14
    assert not (out / "model" / "quant_log.csv").exists()
    model = quantize.load("gptq", out / "model")
    assert isinstance(model.model.layers[0].self_attn.q_proj, BaseQuantLinear)
    assert_copied_tokenizer_and_template(out, merged)


def test_mlc_writes_the_dequantized_group_quantized_weights(tmp_path, merged):
    out, metrics = run_stage(tmp_path, merged, "mlc", 4)
    assert metrics["greedy_agreement"] >= 0.15 and metrics["max_rel_logit_error"] <= 1.1
    original = load_file(merged / "model" / "model.safetensors")
    stored = load_file(out / "model" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        w = original[name].numpy()
        q_weight, q_scale = quantize_group(w, bits=4, group_size=32, dtype="float32")
        expected = dequantize_group(q_weight, q_scale, bits=4, group_size=32, k=w.shape[-1])
        assert np.array_equal(stored[name].numpy(), expected)
        assert len(np.unique(stored[name].numpy()[0, :32])) <= 15  # one group: codes 0..14 (symmetric, zero point 7)
    assert torch.equal(stored["model.norm.weight"], original["model.norm.weight"])  # 1-D: untouched
    model = quantize.load("mlc", out / "model")
    assert (
        json.loads((out / "model" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "mlc_fake_quant"
    )
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])


def test_mlc_other_bits_and_unavailable_methods_are_user_errors(tmp_path, merged):
    with pytest.raises(UserError, match="mlc does not quantize to 8 bits"):
        run_stage(tmp_path / "mlc8", merged, "mlc", 8)
    for method in ("gptq", "awq", "cpm"):  # gptq: without its calibration input
        with pytest.raises(UserError) as raised:
            run_stage(tmp_path / method, merged, method, 4)
        assert raised.value.details  # what to use instead (or the package to install)
    assert not any((tmp_path / name / "out" / "model").exists() for name in ("mlc8", "gptq", "awq", "cpm"))


def test_a_missing_package_is_a_user_error_naming_it(tmp_path, merged, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    with pytest.raises(UserError, match="hqq package is not installed") as raised:
        run_stage(tmp_path, merged, "hqq", 4)
    assert raised.value.details == ["pip install hqq"]


def test_probes_are_the_chat_template_rendered_with_a_generation_prompt(merged):
    tokenizer = AutoTokenizer.from_pretrained(merged / "model")
    prompts = quantize.probes(tokenizer)
    assert len(prompts) == len(quantize.CONVERSATIONS)
    text = tokenizer.decode(prompts[0])
    assert "What is the capital of France?" in text and text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- infer / chat on a quantized model


def greedy(model, prompt: list[int], steps: int, stop: list[int]) -> list[int]:
    """Argmax decoding by hand, without cache: what the answer's token ids must be."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in stop:
                break
    return ids[len(prompt) :]


@pytest.mark.parametrize(
    "method, bits, layer",
    [
        pytest.param("bnb", 8, "Linear8bitLt", marks=needs_bnb),
        pytest.param("bnb", 4, "Linear4bit", marks=needs_bnb),
        pytest.param("hqq", 4, "HQQLinear", marks=needs_hqq),
    ],
)
def test_infer_answers_with_the_quantized_model(tmp_path, merged, method, bits, layer):
    """A quantize artifact is loaded by its library (modeling.load_trained → quantize.load), quantized,
    and the infer stage's answer is that model's greedy decoding through the template."""
    from tunepipe.runtime import generate, modeling
    from tunepipe.runtime.stages import infer

    out, _ = run_stage(tmp_path, merged, method, bits)
    params = {**step_params("infer"), "prompt": "Who are you?", "max_new_tokens": 8}
    (tmp_path / "answer").mkdir()
    ctx = StepContext(id="infer", kind="infer", key="i" * 64, params=params, inputs={"model": out}, files={}, seed=0,
                      spec_dir=tmp_path, out=tmp_path / "answer", work=tmp_path / "infer-work")  # fmt: skip
    infer.run(ctx)
    answer = json.loads((tmp_path / "answer" / "answer.json").read_text())

    model, tokenizer = modeling.load_trained(out)
    assert modeling.is_quantized(model) and type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    stop = generate.stop_token_ids(tokenizer, json.loads((out / "template.json").read_text()))
    assert answer["token_ids"] == greedy(model, answer["prompt_ids"], 8, stop)
    if bits == 4:  # measured: 4-bit rounding changes the tiny model's greedy answer (8-bit may keep it)
        reference = AutoModelForCausalLM.from_pretrained(merged / "model").eval()
        assert answer["token_ids"] != greedy(reference, answer["prompt_ids"], 8, stop)


@needs_bnb
def test_verify_judges_a_quantized_model_on_the_pipelines_probes(tmp_path, merged, calibration):
    """The verify step of a quantize step loads it with its method's library and compares it with the
    merged model on the pipeline's probes: figures equal `compare`'s, thresholds by type (`bnb8`)
    from the flags, a breach fails the step (exit status 1) with the figure in the message."""
    from tunepipe.runtime.stages import verify

    quantized, _ = run_stage(tmp_path / "q", merged, "bnb", 8)
    # the pipeline's data as probes: a val split whose samples train on their answers
    ids, offsets = (np.load(calibration / f"train.{n}.npy") for n in ("input_ids", "offsets"))
    labels = ids.copy()
    for a, b in zip(offsets[:-1], offsets[1:]):
        labels[a : a + (b - a) // 2] = -100
    probes = tmp_path / "probes"
    probes.mkdir()
    for name, array in (("input_ids", ids), ("labels", labels), ("offsets", offsets)):
        np.save(probes / f"train.{name}.npy", array)

    def run_verify(out, **params):
        out.mkdir()
        ctx = StepContext(
            id="verify.quantize-bnb8",
            kind="verify",
            key="v" * 64,
            params={**step_params("verify"), **params},
            inputs={"quantized": quantized, "reference": merged, "probes": probes},
            files={},
            seed=0,
            spec_dir=tmp_path,
            out=out,
            work=tmp_path / "vwork",
        )
        return verify.run(ctx)

    metrics = run_verify(tmp_path / "v1", max_rel_logit_error=0.5, min_greedy_agreement=0.5)
    report = json.loads((tmp_path / "v1" / "report.json").read_text())
    assert report["format"] == "quantize" and report["type"] == "bnb8" and report["passed"]
    prompts = verify.probes(probes, int(step_params("verify")["verify_prompts"]), 0)
    reference = AutoModelForCausalLM.from_pretrained(merged / "model").eval()
    expected = quantize.compare(reference, quantize.load("bnb", quantized / "model"), prompts, greedy_steps=8)
    assert metrics["greedy_agreement"] == expected["greedy_agreement"] == report["figures"]["greedy_agreement"]
    assert metrics["max_rel_logit_error"] == pytest.approx(expected["max_rel_logit_error"], rel=1e-6)
    assert metrics["probes"] == len(prompts) and metrics["threshold_min_greedy_agreement"] == 0.5
    with pytest.raises(verify.VerifyFailed, match="the quantized model does not compute") as failed:
        run_verify(tmp_path / "v2", max_rel_logit_error=1e-6)
    assert failed.value.exit_code == 1 and "max relative logit error" in failed.value.details[0]
