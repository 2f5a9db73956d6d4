"""QLoRA on CPU: LoRA trained on a base quantized while it loads (bitsandbytes NF4 / int8, or HQQ with
`tuner_backend: hqq`), then merged into the full-precision base.

Which reference the merge must match: the merge contract (docs/internals.md) is "the base weights plus
the adapters", and the base weights are the full-precision ones on disk — what LLaMA-Factory's export
merges a QLoRA adapter into (it refuses to merge into a quantized model). So the merged model must equal
peft's merge_and_unload on the full-precision base, at float32 rounding. The function the adapter was
trained as is (quantized base + adapter); the merged model differs from it by the base's quantization
error alone — which the tests measure: merging into the *dequantized* base instead reproduces the
trained function exactly, and the merged model is as far from it as the full-precision base is from
the quantized one.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_train_support import make_ctx, tokenized, train_params
from tiny_models import make_tiny_model

from tunepipe.errors import UserError
from tunepipe.runtime import modeling
from tunepipe.runtime.context import StepContext

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA with bitsandbytes needs the bitsandbytes package")

STEPS = 8
IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 64, 128, 3]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("qlora") / "m", seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tokenized(tmp_path_factory.mktemp("qlora-data"), n=16)


def train_quantized(tmp, base, data, step_id, **flags):
    """Run the train stage; returns (artifact dir, metrics, logged losses, the model it trained)."""
    from tunepipe.runtime.stages import train

    loaded = []

    def capture(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    real = modeling.load_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "load_model", capture)
        ctx = make_ctx(tmp, train_params(max_steps=STEPS, learning_rate=2e-2, **flags), data=data, model=base,
                       step_id=step_id)  # fmt: skip
        metrics = train.run(ctx)
    state = json.loads((ctx.out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    return ctx.out, metrics, losses, loaded[0]


@pytest.fixture(scope="module")
def nf4(tmp_path_factory, base, data):
    tmp = tmp_path_factory.mktemp("nf4")
    flags = {"quantization_bit": 4, "quantization_method": "bnb", "gradient_checkpointing": True}
    return (*train_quantized(tmp, base, data, "nf4", **flags), flags)


def fresh(base, flags):
    """The base as the train stage quantizes it, loaded again."""
    tokenizer = modeling.load_tokenizer(base, {})
    return modeling.load_model(str(base), {**train_params(**flags)}, tokenizer)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[0].float()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def merge(tmp, artifact, base):
    """The merge stage on the train artifact, as the compiler wires it (files.model = the base)."""
    from tunepipe.runtime.stages import merge as merge_stage
    from tunepipe.spec.catalog import load_catalog

    params = {f.name: f.default for f in load_catalog().flags.values() if "merge" in f.used_by}
    ctx = StepContext(
        id="merge", kind="merge", key="m" * 64, params=params, inputs={"train": artifact}, files={"model": base},
        seed=0, spec_dir=tmp, out=tmp / "merged", work=tmp / "merge-work", artifacts={},
        upstream={"train": artifact.name},
    )  # fmt: skip
    ctx.out.mkdir()
    return ctx.out, merge_stage.run(ctx)


# ---------------------------------------------------------------- bitsandbytes NF4


def test_nf4_qlora_trains_on_cpu_and_its_loss_falls(nf4):
    artifact, metrics, losses, model = nf4[:4]
    assert len(losses) == STEPS and metrics["steps"] == STEPS
    assert losses[-1] < losses[0] - 1.5, losses  # measured: 8.4 → 5.3 on an idle machine
    # the model that trained held NF4-packed layers under peft's bnb LoRA layers: all 14 linear layers
    packed = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(packed) == 14 and all(m.weight.dtype == torch.uint8 for m in packed.values())
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in packed.values())
    assert metrics["trainable_params"] == 16384  # LoRA r=8 on the 14 layers, nothing else


def test_nf4_base_weights_are_unchanged_and_every_adapter_trained(nf4, base):
    artifact, _, _, model, flags = nf4
    reference = fresh(base, flags)
    want = {n: m for n, m in reference.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    got = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m for n, m in model.named_modules()
           if isinstance(m, bnb.nn.Linear4bit)}  # fmt: skip
    assert sorted(got) == sorted(want)
    for name, module in want.items():
        assert torch.equal(got[name].weight.data, module.weight.data), name  # the packed codes
        dequantized = bnb.functional.dequantize_4bit(got[name].weight.data, got[name].weight.quant_state)
        assert torch.equal(dequantized, bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state))
    adapter = load_file(artifact / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 28
    # lora_B starts at zero: every one is non-zero after training (gradients reached every layer,
    # through activation checkpointing and the frozen quantized weights)
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    info = json.loads((artifact / "train.json").read_text())
    assert info["finetuning_type"] == "lora" and info["base"]["kind"] == "model"
    assert info["quantized_base"] == {"method": "bnb", "bits": 4, "quant_type": "nf4", "double_quant": True}


def test_nf4_adapter_merges_into_the_full_precision_base(nf4, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    artifact, _, _, _, flags = nf4
    out, metrics = merge(tmp_path, artifact, base)
    assert metrics["method"] == "streaming"
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not modeling.is_quantized(merged) and merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32

    full = AutoModelForCausalLM.from_pretrained(base).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), artifact / "adapter")
    torch.testing.assert_close(logits(merged), logits(reference.merge_and_unload().eval()), rtol=0, atol=1e-5)

    # the trained function: quantized base + adapter
    trained = PeftModel.from_pretrained(fresh(base, flags), artifact / "adapter").eval()
    # the same adapter merged into the dequantized base computes it (NF4's matmul is dequantize-then-matmul)
    dequantized = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, module in fresh(base, flags).named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dequantized.get_submodule(name).weight.copy_(weight)
    on_dequantized = PeftModel.from_pretrained(dequantized, artifact / "adapter").merge_and_unload().eval()
    assert rel(logits(on_dequantized), logits(trained)) < 1e-5
    # the merged model is as far from the trained function as the full-precision base from the quantized
    # one (measured: 0.54 and 0.53 relative logit error; NF4 of a random tiny model's std-0.2 weights)
    quantization_error = rel(logits(fresh(base, flags)), logits(full))
    merge_error = rel(logits(merged), logits(trained))
    assert quantization_error > 0.01 and 0.8 * quantization_error < merge_error < 1.25 * quantization_error, (
        quantization_error,
        merge_error,
    )


# ---------------------------------------------------------------- bitsandbytes int8, HQQ


def test_int8_qlora_trains_on_cpu_with_its_int8_weights_unchanged(tmp_path, base, data):
    flags = {"quantization_bit": 8, "quantization_method": "bnb"}
    artifact, _, losses, model = train_quantized(tmp_path, base, data, "int8", **flags)
    assert losses[-1] < losses[0] - 1.5, losses
    got = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m for n, m in model.named_modules()
           if isinstance(m, bnb.nn.Linear8bitLt)}  # fmt: skip
    want = {n: m for n, m in fresh(base, flags).named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert len(got) == 14 and sorted(got) == sorted(want)
    for name, module in want.items():
        assert got[name].weight.dtype == torch.int8 and torch.equal(got[name].weight.data, module.weight.data)
        assert torch.equal(row_scales(got[name]), row_scales(module)), name


def row_scales(layer) -> torch.Tensor:
    """An int8 layer's per-row scales: on the weight until its first forward, then in the layer's state."""
    return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB


def test_hqq_tuner_backend_trains_lora_on_an_hqq_base_and_merges(tmp_path, base, data):
    pytest.importorskip("hqq", reason="tuner_backend hqq needs the hqq package")
    from hqq.core.quantize import HQQLinear
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    flags = {"quantization_bit": 4, "tuner_backend": "hqq"}
    artifact, _, losses, model = train_quantized(tmp_path, base, data, "hqq", **flags)
    assert losses[-1] < losses[0] - 1.5, losses
    got = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m for n, m in model.named_modules()
           if isinstance(m, HQQLinear)}  # fmt: skip
    want = {n: m for n, m in fresh(base, flags).named_modules() if isinstance(m, HQQLinear)}
    assert len(got) == 14 and sorted(got) == sorted(want)
    for name, module in want.items():
        assert got[name].meta["nbits"] == 4 and torch.equal(got[name].W_q, module.W_q), name
    adapter = load_file(artifact / "adapter" / "adapter_model.safetensors")
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
    out, _ = merge(tmp_path, artifact, base)
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), artifact / "adapter")
    torch.testing.assert_close(logits(merged), logits(reference.merge_and_unload().eval()), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- what cannot work


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"quantization_bit": 4, "quantization_method": "bnb", "finetuning_type": "full"},
         "quantization_bit 4 loads the base quantized (QLoRA), whose weights cannot train"),
        ({"quantization_bit": 4, "quantization_method": "gptq"}, "quantization_bit with quantization_method gptq"),
        ({"quantization_bit": 4, "quantization_method": "bnb", "tuner_backend": "hqq"},
         "tuner_backend hqq quantizes the base with HQQ, but quantization_method is bnb"),
        ({"tuner_backend": "hqq"}, "tuner_backend hqq trains LoRA on an HQQ-quantized base: set model.quantization_bit"),
    ],
)  # fmt: skip
def test_a_quantized_base_that_cannot_train_is_a_user_error(base, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        fresh(base, flags)


def test_an_adapter_is_not_merged_into_a_quantized_base(nf4, base):
    artifact, _, _, _, flags = nf4
    with pytest.raises(UserError, match="cannot merge the LoRA adapter .* into a quantized base"):
        modeling.merge_adapter(fresh(base, flags), str(artifact / "adapter"))


def test_a_recorded_quantized_base_is_named_in_merge_json(nf4, base, tmp_path):
    """train.json's `quantized_base` (modeling.quantization_record) reaches the adapter's merge.json record;
    the merge is the same full-precision merge."""
    import shutil

    artifact, _, _, _, flags = nf4
    record = modeling.quantization_record(train_params(**flags))
    assert record == {"method": "bnb", "bits": 4, "quant_type": "nf4", "double_quant": True}
    assert modeling.quantization_record(train_params()) is None
    assert modeling.quantization_record(train_params(quantization_bit=8, tuner_backend="hqq")) == {
        "method": "hqq",
        "bits": 8,
    }
    copy = tmp_path / artifact.name
    shutil.copytree(artifact, copy)
    info = json.loads((copy / "train.json").read_text())
    (copy / "train.json").write_text(json.dumps({**info, "quantized_base": record}))
    (tmp_path / "recorded").mkdir()
    (tmp_path / "plain").mkdir()
    out, _ = merge(tmp_path / "recorded", copy, base)
    merged = json.loads((out / "merge.json").read_text())
    assert merged["adapters"] == [{"artifact": copy.name, "path": "adapter", "quantized_base": record}]
    plain, _ = merge(tmp_path / "plain", artifact, base)
    assert (out / "model" / "model.safetensors").read_bytes() == (plain / "model" / "model.safetensors").read_bytes()


def test_a_quantized_base_is_placed_on_the_device_this_process_trains_on(monkeypatch):
    """The Trainer does not move a bitsandbytes model: it loads on this rank's GPU, or the CPU."""
    assert modeling.quantized_device({}) == "cpu"  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert modeling.quantized_device({}) == "cuda:1"
    assert modeling.quantized_device({"no_cuda": True}) == "cpu"
