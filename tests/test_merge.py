"""The merge stage: streaming LoRA merge equal to peft's merge_and_unload, the train chain walk, fallbacks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TOKENIZER_FILES, make_tiny_model

from tunepipe.errors import UserError
from tunepipe.runtime import merge
from tunepipe.runtime.context import StepContext
from tunepipe.runtime.stages import merge as merge_stage

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODEL_FLAGS = {"bf16": False, "fp16": False, "strict_dtype": False, "use_cache": True, "resize_vocab": False,
               "model_revision": "main", "trust_remote_code": False}  # fmt: skip
# The merge step's model-section flags, as the catalog's defaults fill them (the peft fallback loads the model).
STEP_FLAGS = {"model_revision": "main", "cache_dir": None, "trust_remote_code": False, "use_fast_tokenizer": True,
              "split_special_tokens": False, "flash_attn": "auto", "attn_implementation": "eager", "use_cache": True}  # fmt: skip


# ---------------------------------------------------------------- helpers


def adapter(base: Path, out: Path, *, seed: int, dtype=torch.float32, **config) -> Path:
    """A peft LoRA adapter on `base` whose every trainable tensor is random (B included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = {"r": 4, "lora_alpha": 8, "target_modules": LINEAR, **config}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:  # lora_A/B, modules_to_save copies, trained biases
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


def peft_merged(base: Path, adapters: list[Path], dtype=torch.float32):
    """The reference: peft's merge_and_unload, adapter after adapter (what LLaMA-Factory's export does)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    for path in adapters:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.eval()


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_weights(ours: Path, reference_model, tmp: Path) -> None:
    """Same tensor names (as save_pretrained writes them), dtypes and values at float32 rounding."""
    reference_model.save_pretrained(tmp / "reference")
    expected, got = weights(tmp / "reference"), weights(ours)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        eps = torch.finfo(value.dtype).eps
        error = (got[name].float() - value.float()).abs().max().item()
        assert error <= eps * max(value.float().abs().max().item(), 1.0), (name, error)


def logits(model, ids=(1, 5, 9, 42, 7, 300)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def tokenizer_dir(source: Path, target: Path, extra_tokens: list[str] = ()) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(list(extra_tokens))
    tokenizer.save_pretrained(target)
    return target


def lora_artifact(
    path: Path, adapter_dir: Path, tokenizer: Path, base: dict, flags=MODEL_FLAGS, extra_tokens=()
) -> Path:
    """A train artifact as runtime/stages/train.py writes it for finetuning_type lora."""
    path.mkdir(parents=True)
    shutil.copytree(adapter_dir, path / "adapter")
    tokenizer_dir(tokenizer, path / "tokenizer", extra_tokens)
    (path / "template.json").write_text(json.dumps({"name": "chatml", "stop_words": ["<|im_end|>"]}))
    info = {"finetuning_type": "lora", "stage": "sft", "base": base, "model_flags": dict(flags)}
    (path / "train.json").write_text(json.dumps(info))
    return path


def full_artifact(path: Path, model_dir: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copytree(model_dir, path / "model", ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    tokenizer_dir(model_dir, path / "tokenizer")
    (path / "train.json").write_text(
        json.dumps({"finetuning_type": "full", "stage": "pt", "base": {"kind": "model", "path": "m"}})
    )
    return path


def ctx_for(tmp: Path, train: Path, artifacts: dict, model=None, **params) -> StepContext:
    params = {"merge_lora": False, "merge_lora_and_save": False, "auto_merge_weights": False,
              "adapter_name_or_path": None, "adapter_folder": None, "max_shard_size": "5GB", **STEP_FLAGS, **params}  # fmt: skip
    (tmp / "out").mkdir()
    return StepContext(
        id="merge", kind="merge", key="k" * 64, params=params, inputs={"train": train},
        files={"model": model} if model else {}, seed=0, spec_dir=tmp, out=tmp / "out", work=tmp / "work",
        artifacts=artifacts, upstream={"train": train.name},
    )  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama") / "m", seed=1)


# ---------------------------------------------------------------- streaming == peft


def test_one_adapter_equals_peft_merge_and_unload(tmp_path, llama):
    lora = adapter(llama, tmp_path / "a", seed=2)
    info = merge.merge_lora(llama, [lora], tmp_path / "out", shard_size=1 << 30)
    assert_same_weights(tmp_path / "out", peft_merged(llama, [lora]), tmp_path)
    assert info["merged_tensors"] == 14 and info["shards"] == 1 and info["dtype"] == "float32"
    # the update is really there: every adapted tensor moved away from the base
    base, ours = weights(llama), weights(tmp_path / "out")
    assert sum(not torch.equal(base[k], ours[k]) for k in base) == 14


def test_two_adapters_in_order_with_patterns_rslora_and_modules_to_save(tmp_path, llama):
    first = adapter(
        llama, tmp_path / "a1", seed=3, rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 3},
        modules_to_save=["lm_head"],
    )  # fmt: skip
    second = adapter(llama, tmp_path / "a2", seed=4, r=2, lora_alpha=5, use_rslora=True, modules_to_save=["lm_head"])
    merge.merge_lora(llama, [first, second], tmp_path / "out", shard_size=1 << 30)
    assert_same_weights(tmp_path / "out", peft_merged(llama, [first, second]), tmp_path)
    merge.merge_lora(llama, [second, first], tmp_path / "reversed", shard_size=1 << 30)
    # the order is honoured: the last adapter's lm_head copy wins
    assert not torch.equal(
        weights(tmp_path / "out")["lm_head.weight"], weights(tmp_path / "reversed")["lm_head.weight"]
    )


def test_modules_to_save_and_trained_biases_replace_the_base_tensors(tmp_path):
    qwen = make_tiny_model("qwen2", tmp_path / "qwen", seed=5)  # q/k/v carry biases
    lora = adapter(
        qwen, tmp_path / "a", seed=6, target_modules=["q_proj", "o_proj"], bias="all", modules_to_save=["lm_head"]
    )
    stored = load_file(lora / merge.ADAPTER_WEIGHTS)
    assert any(k.endswith("q_proj.base_layer.bias") for k in stored) and any(k.endswith("k_proj.bias") for k in stored)
    merge.merge_lora(qwen, [lora], tmp_path / "out", shard_size=1 << 30)
    assert_same_weights(tmp_path / "out", peft_merged(qwen, [lora]), tmp_path)


def test_fan_in_fan_out_on_gpt2_conv1d_with_tied_head(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    assert "lm_head.weight" not in weights(tmp_path / "gpt2")  # tied: transformers stores the embedding only
    lora = adapter(
        tmp_path / "gpt2", tmp_path / "a", seed=7, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    info = merge.merge_lora(tmp_path / "gpt2", [lora], tmp_path / "out", shard_size=1 << 30)
    assert info["merged_tensors"] == 8
    reference = peft_merged(tmp_path / "gpt2", [lora])
    assert_same_weights(tmp_path / "out", reference, tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(ours, (1, 2, 3, 4)), logits(reference, (1, 2, 3, 4)), rtol=0, atol=1e-5)


def test_sharded_input_and_output_load_with_transformers(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / merge.INDEX).is_file()
    lora = adapter(llama, tmp_path / "a", seed=8)
    info = merge.merge_lora(tmp_path / "sharded", [lora], tmp_path / "out", shard_size=150_000)
    index = json.loads((tmp_path / "out" / merge.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == info["shards"] > 3 and files[0] == f"model-00001-of-{info['shards']:05d}.safetensors"
    sizes = {f: sum(t.numel() * t.element_size() for t in load_file(tmp_path / "out" / f).values()) for f in files}
    assert sum(sizes.values()) == index["metadata"]["total_size"] == info["bytes"]
    big = max(t.numel() * 4 for t in weights(llama).values())
    assert all(size <= max(150_000, big) for size in sizes.values())
    reference = peft_merged(llama, [lora])
    assert_same_weights(tmp_path / "out", reference, tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(ours), logits(reference), rtol=0, atol=1e-5)


def test_bf16_base_is_merged_in_float32_and_cast_back_to_bf16(tmp_path):
    base = make_tiny_model("llama", tmp_path / "bf16", seed=9, dtype="bfloat16")
    lora = adapter(base, tmp_path / "a", seed=10, dtype=torch.bfloat16)
    info = merge.merge_lora(base, [lora], tmp_path / "out", shard_size=1 << 30)
    ours = weights(tmp_path / "out")
    assert info["dtype"] == "bfloat16" and {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert_same_weights(tmp_path / "out", peft_merged(base, [lora], dtype=torch.bfloat16), tmp_path)
    # one rounding, of the float32 sum
    stored, name = load_file(lora / merge.ADAPTER_WEIGHTS), "model.layers.0.self_attn.q_proj"
    a, b = stored[f"base_model.model.{name}.lora_A.weight"], stored[f"base_model.model.{name}.lora_B.weight"]
    expected = (weights(base)[f"{name}.weight"].float() + (b.float() @ a.float()) * 2.0).to(torch.bfloat16)
    assert torch.equal(ours[f"{name}.weight"], expected)


@pytest.mark.parametrize(
    "config, why",
    [
        ({"use_dora": True}, "use_dora"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "lora_embedding"),
        ({"target_modules": ["q_proj"], "lora_bias": True}, "lora_bias"),
        ({"target_modules": ["q_proj"], "init_lora_weights": "olora"}, "olora"),
    ],
)
def test_what_only_peft_merges_is_detected_before_writing(tmp_path, llama, config, why):
    lora = adapter(llama, tmp_path / "a", seed=11, **config)
    with pytest.raises(merge.StreamingUnsupported, match=why):
        merge.merge_lora(llama, [lora], tmp_path / "out", shard_size=1 << 30)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the train chain


def test_chain_walks_train_json_back_to_a_full_weights_artifact(tmp_path, llama):
    full = full_artifact(tmp_path / "store" / "A", llama)
    extra = adapter(llama, tmp_path / "spec" / "adapters" / "extra", seed=12)
    trained = adapter(llama, tmp_path / "trained", seed=13)
    base = {"kind": "artifact", "key": "A", "merged_adapters": ["adapters/extra"], "max_length": 64}
    lora = lora_artifact(tmp_path / "store" / "B", trained, full / "tokenizer", base, {**MODEL_FLAGS, "bf16": True})
    chain = merge.resolve_chain(
        lora,
        "B",
        artifacts={"A": full, "B": lora},
        model_dir=None,
        spec_dir=tmp_path / "spec",
        params={"cache_dir": "c"},
    )
    assert chain.base == full / "model" and chain.base_record == {"kind": "artifact", "key": "A", "path": "model"}
    assert [a.path for a in chain.adapters] == [extra, lora / "adapter"]
    assert [a.record for a in chain.adapters] == [{"path": "adapters/extra"}, {"artifact": "B", "path": "adapter"}]
    assert chain.flags["bf16"] is True and chain.flags["cache_dir"] == "c" and chain.tokenizer == lora / "tokenizer"
    with pytest.raises(UserError, match="train artifact A .*not among this step's inputs"):
        merge.resolve_chain(lora, "B", artifacts={"B": lora}, model_dir=None, spec_dir=tmp_path / "spec", params={})


def test_chain_bases_model_and_own(tmp_path, llama):
    trained = adapter(llama, tmp_path / "trained", seed=14)
    listed = adapter(llama, tmp_path / "listed", seed=15)
    model_base = {"kind": "model", "path": "models/tiny", "merged_adapters": [str(listed)], "max_length": 99}
    first = lora_artifact(tmp_path / "A", trained, llama, model_base)
    chain = merge.resolve_chain(first, "A", artifacts={"A": first}, model_dir=llama, spec_dir=tmp_path, params={})
    assert (
        chain.base == llama and chain.base_record == {"kind": "model", "path": "models/tiny"} and chain.max_length == 99
    )
    assert [a.path for a in chain.adapters] == [listed, first / "adapter"]
    # a from-scratch init: base/ was saved after the listed adapters were merged into it
    own = lora_artifact(tmp_path / "O", trained, llama, {**model_base, "kind": "own", "path": "base"})
    chain = merge.resolve_chain(own, "O", artifacts={}, model_dir=None, spec_dir=tmp_path, params={})
    assert chain.base == own / "base" and [a.path for a in chain.adapters] == [own / "adapter"]
    assert chain.base_record == {"kind": "artifact", "key": "O", "path": "base"}
    (tmp_path / "adapters").mkdir()  # a mistyped local path, not a hub id
    with pytest.raises(UserError, match="adapters/missing .*is not at"):
        bad = lora_artifact(tmp_path / "C", trained, llama, {**model_base, "merged_adapters": ["adapters/missing"]})
        merge.resolve_chain(bad, "C", artifacts={}, model_dir=llama, spec_dir=tmp_path, params={})


# ---------------------------------------------------------------- the stage


def test_stage_merges_a_two_step_chain_into_a_loadable_model(tmp_path, llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = full_artifact(tmp_path / "A", llama)
    trained = adapter(llama, tmp_path / "trained", seed=16)
    lora = lora_artifact(
        tmp_path / "B", trained, full / "tokenizer", {"kind": "artifact", "key": "A", "merged_adapters": []}
    )
    ctx = ctx_for(tmp_path, lora, {"A": full, "B": lora}, max_shard_size="300KB")
    metrics = merge_stage.run(ctx)
    out = ctx.out
    assert metrics["method"] == "streaming" and metrics["adapters"] == 1 and metrics["shards"] > 1
    record = json.loads((out / "merge.json").read_text())
    assert record == {
        "method": "streaming", "fallback": None, "base": {"kind": "artifact", "key": "A", "path": "model"},
        "adapters": [{"artifact": "B", "path": "adapter"}], "dtype": "float32", "tensors": 21, "shards": metrics["shards"],
    }  # fmt: skip
    assert (out / "template.json").read_bytes() == (lora / "template.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    torch.testing.assert_close(logits(model), logits(peft_merged(full / "model", [trained])), rtol=0, atol=1e-5)
    tokenizer, trained_with = (
        AutoTokenizer.from_pretrained(out / "model"),
        AutoTokenizer.from_pretrained(lora / "tokenizer"),
    )
    chat = [{"role": "user", "content": "Who are you?"}]
    assert tokenizer.chat_template and tokenizer.chat_template == trained_with.chat_template
    assert tokenizer.apply_chat_template(chat) == trained_with.apply_chat_template(chat)
    assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is True


def test_stage_falls_back_to_peft_for_dora_and_says_why(tmp_path, llama, caplog):
    from transformers import AutoModelForCausalLM

    trained = adapter(llama, tmp_path / "trained", seed=17, target_modules=["q_proj", "v_proj"], use_dora=True)
    lora = lora_artifact(tmp_path / "B", trained, llama, {"kind": "model", "path": "m", "merged_adapters": []})
    ctx = ctx_for(tmp_path, lora, {"B": lora}, model=llama)
    with caplog.at_level(logging.INFO, logger="tunepipe.step"):
        metrics = merge_stage.run(ctx)
    assert metrics["method"] == "peft"
    assert "streaming merge not possible" in caplog.text and "use_dora" in caplog.text
    record = json.loads((ctx.out / "merge.json").read_text())
    assert record["method"] == "peft" and record["fallback"] == "use_dora=True in adapter_config.json"  # no local path
    model = AutoModelForCausalLM.from_pretrained(ctx.out / "model").eval()
    torch.testing.assert_close(logits(model), logits(peft_merged(llama, [trained])), rtol=0, atol=1e-5)


def test_model_flags_dtype_streams_like_peft_and_a_grown_vocabulary_goes_to_peft(tmp_path, llama):
    trained = adapter(llama, tmp_path / "trained", seed=18)
    flags = {**MODEL_FLAGS, "bf16": True, "rope_scaling": "linear"}
    lora = lora_artifact(tmp_path / "B", trained, llama, {"kind": "model", "path": "m", "max_length": 2000}, flags)
    where = {"artifacts": {}, "model_dir": llama, "spec_dir": tmp_path}
    chain = merge.resolve_chain(lora, "B", params=STEP_FLAGS, **where)
    streamed = merge.merge_streaming(chain, tmp_path / "streamed", shard_size=1 << 30)
    in_memory = merge.merge_with_peft(lora, tmp_path / "peft", params=STEP_FLAGS, shard_size=1 << 30, **where)
    assert streamed["dtype"] == in_memory["dtype"] == "bfloat16"
    # the very bytes save_pretrained writes for peft's merge (one shard), and the same config (dtype, rope scaling)
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == (
        tmp_path / "peft" / "model.safetensors"
    ).read_bytes()
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "peft" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["rope_parameters"]["factor"] == 4.0

    flags = {**MODEL_FLAGS, "resize_vocab": True}
    lora = lora_artifact(tmp_path / "G", trained, llama, {"kind": "model", "path": "m"}, flags, extra_tokens=["<tool>"])
    chain = merge.resolve_chain(lora, "G", params=STEP_FLAGS, **where)
    with pytest.raises(merge.StreamingUnsupported, match="vocabulary grows"):
        merge.merge_streaming(chain, tmp_path / "never", shard_size=1 << 30)
