"""MLC export: group quantization against mlc-llm's kernel, the weight package per architecture, its
verify figures, the conversation template, and the user errors.

Expected names, shapes and packed values below were produced by mlc-llm's own `convert_weight` and
`GroupQuantize.quantize_weight` (mlc-ai/mlc-llm 79d603f, run on apache-tvm 0.27) on the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_model

from tunepipe.errors import UserError
from tunepipe.runtime.export.mlc_quant import dequantize_group, quantize_group

LOG = logging.getLogger("test_export_mlc")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
TIED = {"gemma", "gemma2"}  # mlc-llm's gemma always reads logits off the embedding


# ------------------------------------------------------------------------------------ quantization
GOLDEN_INPUT = ((np.arange(2 * 40) * 37 % 29) - 14).reshape(2, 40) / 8  # 40 columns: a padded group
GOLDEN_Q_WEIGHT = [
    0xEA62C840,
    0x2C840B73,
    0x51C84EA6,
    0x840A62D9,
    0xB73EA51C,
    0,
    0,
    0,
    0xEA62C840,
    0x2D951C84,
    0x62C840A6,
    0x840B73EA,
    0xC84EA62C,
    0,
    0,
    0,
]
GOLDEN_Q_SCALE = {
    "float16": [[0.25, 0.232177734375], [0.25, 0.25]],
    "float32": [[0.25, 0.2321428507566452], [0.25, 0.25]],
}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_group_quantization_is_mlc_llms_bit_for_bit(dtype):
    q_weight, q_scale = quantize_group(GOLDEN_INPUT, bits=4, group_size=32, dtype=dtype)
    assert q_weight.dtype == np.uint32 and q_weight.shape == (2, 8)
    assert q_weight.ravel().tolist() == GOLDEN_Q_WEIGHT  # half-way codes round to even, padding packs as 0
    assert q_scale.dtype == np.dtype(dtype) and q_scale.tolist() == GOLDEN_Q_SCALE[dtype]


def test_packing_order_and_zero_point():
    scale = np.float32(0.5)
    codes = np.arange(32) % 15  # 0..14, the whole int4 range around the zero point 7
    weight = ((codes - 7) * scale).astype(np.float32)[None]  # max |w| = 7 scales: scale 0.5 exactly
    q_weight, q_scale = quantize_group(weight, bits=4, group_size=32, dtype="float32")
    assert q_scale.tolist() == [[0.5]]
    assert hex(int(q_weight[0, 0])) == "0x76543210"  # element r in bits 4r..4r+3, lowest first
    assert hex(int(q_weight[0, 1])) == "0xedcba98"  # codes 8..14 then 0 (the 15th code wraps to 0)
    assert np.array_equal(dequantize_group(q_weight, q_scale, k=32), weight)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_error_is_half_a_step(dtype):
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((48, 100)) * 0.3).astype(np.float32)
    weight[5, :32] = 0.0  # an all-zero group
    q_weight, q_scale = quantize_group(weight, bits=4, group_size=32, dtype=dtype)
    assert q_weight.shape == (48, 16) and q_scale.shape == (48, 4)
    restored = dequantize_group(q_weight, q_scale, k=100).astype(np.float32)
    assert restored.shape == weight.shape
    step = np.repeat(q_scale.astype(np.float32), 32, axis=1)[:, :100]
    slack = 1e-6 if dtype == "float32" else 4e-3  # f16 rounding of w, scale and (code - 7) * scale
    assert (np.abs(restored - weight) <= step / 2 + slack * np.abs(weight).max()).all()
    assert (restored[5, :32] == 0).all()
    assert np.abs(restored - weight).max() > 0.01  # it did quantize


@pytest.mark.parametrize("bits, group_size", [(5, 32), (4, 30), (4, 0)])
def test_bad_group_layout_is_a_user_error(bits, group_size):
    with pytest.raises(UserError):
        quantize_group(np.ones((2, 32)), bits=bits, group_size=group_size)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tvm():
    return pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install apache-tvm)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlc-models")
    return {arch: make_tiny_model(arch, root / arch, tie=arch in TIED) for arch in ARCHS}


def template_json(model_dir: Path, name: str = "chatml", **flags) -> dict:
    """template.json as the template stage writes it (stop words it would add to the vocabulary have no id here)."""
    import transformers

    from tunepipe.runtime import chat_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    _, info = chat_template.resolve({"template": name, **flags}, tokenizer, None)
    ids = {tokenizer.convert_tokens_to_ids(w) for w in info["stop_words"]} | {tokenizer.eos_token_id}
    info["stop_token_ids"] = sorted(i for i in ids if i is not None)
    return info


def probes(model_dir: Path) -> list[list[int]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
        tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"],
    ]


def export(model_dir: Path, out: Path, type: str, **kwargs) -> dict:
    from tunepipe.runtime.export import mlc

    return mlc.export(
        model_dir, out, type=type, template=kwargs.pop("template", None) or template_json(model_dir), log=LOG, **kwargs
    )


def verify(out: Path, model_dir: Path, type: str) -> dict:
    from tunepipe.runtime.export import mlc

    return mlc.verify(out, model_dir, probes(model_dir), type=type, template=template_json(model_dir), log=LOG)


def shard_records(out: Path) -> tuple[dict, dict[str, tuple[dict, bytes]]]:
    """(metadata, {name: (record, its bytes)}) after checking every shard's size, md5 and offsets."""
    cache = json.loads((out / "tensor-cache.json").read_text())
    found = {}
    for shard in cache["records"]:
        data = (out / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard" and shard["nbytes"] == len(data)
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        offset = 0
        for record in shard["records"]:
            assert record["byteOffset"] == offset and record["format"] == "raw"
            assert record["nbytes"] == math.prod(record["shape"]) * np.dtype(record["dtype"]).itemsize
            found[record["name"]] = (record, data[offset : offset + record["nbytes"]])
            offset += record["nbytes"]
        assert offset == len(data)
    return cache["metadata"], found


def hf_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(model_dir / "model.safetensors")


# ------------------------------------------------------------------------------------ the package
# layer 0 and the global parameters of q0 exports, as mlc-llm's convert_weight names them
LAYER0 = {
    "llama": {
        "model.embed_tokens.weight": [1417, 64],
        "lm_head.weight": [1417, 64],
        "model.norm.weight": [64],
        "model.layers.0.input_layernorm.weight": [64],
        "model.layers.0.post_attention_layernorm.weight": [64],
        "model.layers.0.self_attn.qkv_proj.weight": [128, 64],
        "model.layers.0.self_attn.o_proj.weight": [64, 64],
        "model.layers.0.mlp.gate_up_proj.weight": [256, 64],
        "model.layers.0.mlp.down_proj.weight": [64, 128],
    },
}
LAYER0["mistral"] = LAYER0["llama"]
LAYER0["qwen2"] = {
    **{k.replace("qkv_proj", "c_attn"): v for k, v in LAYER0["llama"].items()},
    "model.layers.0.self_attn.c_attn.bias": [128],
}
LAYER0["qwen3"] = {
    **{k.replace("qkv_proj", "c_attn"): v for k, v in LAYER0["llama"].items()},
    "model.layers.0.self_attn.q_norm.weight": [16],
    "model.layers.0.self_attn.k_norm.weight": [16],
}
LAYER0["gemma"] = {k: v for k, v in LAYER0["llama"].items() if k != "lm_head.weight"}
LAYER0["gemma2"] = {
    **LAYER0["gemma"],
    "model.layers.0.pre_feedforward_layernorm.weight": [64],
    "model.layers.0.post_feedforward_layernorm.weight": [64],
}
LAYER0["phi3"] = {
    "transformer.embd.weight": [1417, 64],
    "lm_head.weight": [1417, 64],
    "transformer.norm.weight": [64],
    "transformer.h.0.ln.weight": [64],
    "transformer.h.0.post_attention_layernorm.weight": [64],
    "transformer.h.0.mixer.qkv_proj.weight": [128, 64],
    "transformer.h.0.mixer.out_proj.weight": [64, 64],
    "transformer.h.0.mlp.gate_up_proj.weight": [256, 64],
    "transformer.h.0.mlp.down_proj.weight": [64, 128],
}


def expected_names(arch: str, quantized: bool) -> dict[str, tuple[list[int], str]]:
    dtype = "float16" if quantized else "float32"
    names = {}
    for name, shape in LAYER0[arch].items():
        if quantized and len(shape) == 2:
            module = name.removesuffix(".weight")
            names[f"{module}.q_weight"] = ([shape[0], shape[1] // 8], "uint32")
            names[f"{module}.q_scale"] = ([shape[0], shape[1] // 32], dtype)
        else:
            names[name] = (shape, dtype)
    return names


def exact_tensor(arch: str, name: str, state: dict[str, np.ndarray]) -> np.ndarray:
    """What a q0f32 record must hold, from the HF weights: fused, renamed, gemma's norms + 1."""
    hf = name.replace("transformer.h.", "model.layers.").replace(".mixer.out_proj.", ".self_attn.o_proj.")
    hf = hf.replace(".mixer.qkv_proj.", ".self_attn.qkv_proj.").replace(".ln.", ".input_layernorm.")
    hf = hf.replace("transformer.embd.", "model.embed_tokens.").replace("transformer.norm.", "model.norm.")
    for fused, parts in (
        ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
        ("c_attn", ("q_proj", "k_proj", "v_proj")),
        ("gate_up_proj", ("gate_proj", "up_proj")),
    ):
        if f".{fused}." in hf and hf not in state:
            return np.concatenate([state[hf.replace(fused, p)] for p in parts], axis=0)
    return state[hf] + 1 if arch in TIED and hf.endswith("norm.weight") else state[hf]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_q0f32_export_is_exact(tvm, models, tmp_path, arch):
    out = tmp_path / "mlc"
    info = export(models[arch], out, "q0f32")
    metadata, records = shard_records(out)
    layer0 = {n: (r["shape"], r["dtype"]) for n, (r, _) in records.items() if ".1." not in n}
    assert layer0 == expected_names(arch, quantized=False)
    state = hf_state(models[arch])
    for name, (record, data) in records.items():
        assert np.array_equal(
            np.frombuffer(data, dtype=np.float32).reshape(record["shape"]), exact_tensor(arch, name, state)
        ), name
    assert metadata["ParamSize"] == len(records) == info["tensors"]
    assert info["files"]["params_shard_0.bin"] == metadata["ParamBytes"]
    figures = verify(out, models[arch], "q0f32")
    assert figures["max_abs_logit_error"] == 0.0 and figures["greedy_agreement"] == 1.0
    assert figures["max_dequant_error"]["max_abs"] == 0.0
    assert figures["probes"] == 2 and figures["positions"] == sum(len(p) + 8 for p in probes(models[arch]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_q4f16_1_export_and_verify(tvm, models, tmp_path, arch):
    out = tmp_path / "mlc"
    info = export(models[arch], out, "q4f16_1")
    _, records = shard_records(out)
    layer0 = {n: (r["shape"], r["dtype"]) for n, (r, _) in records.items() if ".1." not in n}
    assert layer0 == expected_names(arch, quantized=True)
    state = hf_state(models[arch])
    qkv = next(n for n in records if n.endswith(("qkv_proj.q_weight", "c_attn.q_weight")) and ".0." in n)
    want_q, want_s = quantize_group(exact_tensor(arch, qkv.replace(".q_weight", ".weight"), state), dtype="float16")
    assert records[qkv][1] == want_q.tobytes()
    assert records[qkv.replace("q_weight", "q_scale")][1] == want_s.tobytes()
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat["quantization"] == "q4f16_1" and chat["model_type"] == arch
    assert info["bits_per_param"] < 5.0
    assert bool(info["notes"]) == (arch == "gemma2")  # mlc-llm's gemma2 skips the attention soft cap
    figures = verify(out, models[arch], "q4f16_1")
    errors = figures["max_dequant_error"]
    assert 0.02 < errors["max_rel"] <= 0.075  # ≤ half a step of max|group| / 7, plus f16 rounding
    assert all(v["max_rel"] <= 0.075 for v in errors["tensors"].values())
    assert set(errors["tensors"]) == {
        n.removesuffix(".q_scale") + ".weight" if n.endswith(".q_scale") else n
        for n in records
        if not n.endswith(".q_weight")
    }
    # random tiny models are chaotic: 4-bit weights flip many argmaxes (0.10-1.0 measured per arch),
    # where chance is 1/1417; the exactness of names, splits and packing is checked above and in q0f32
    assert figures["greedy_agreement"] >= 0.05
    assert 0 < figures["max_rel_logit_error"] < 2.0


@pytest.mark.slow
def test_q0f16_verify_is_at_f16_rounding(tvm, models, tmp_path):
    out = tmp_path / "mlc"
    export(models["qwen2"], out, "q0f16")
    figures = verify(out, models["qwen2"], "q0f16")
    assert 0 < figures["max_dequant_error"]["max_rel"] <= 2**-11
    assert figures["max_rel_logit_error"] < 1e-2 and figures["greedy_agreement"] >= 0.95


@pytest.mark.slow
def test_tied_mistral_gets_its_own_lm_head(tvm, tmp_path):
    model_dir = make_tiny_model("mistral", tmp_path / "m", tie=True)
    export(model_dir, tmp_path / "mlc", "q0f32")
    _, records = shard_records(tmp_path / "mlc")
    assert records["lm_head.weight"][1] == records["model.embed_tokens.weight"][1]
    assert verify(tmp_path / "mlc", model_dir, "q0f32")["max_abs_logit_error"] == 0.0


# ------------------------------------------------------------------------------------ chat config
def conversation_of(model_dir: Path, name: str, **flags) -> tuple[dict, dict, dict]:
    import transformers

    from tunepipe.runtime.export import mlc

    template = template_json(model_dir, name, **flags)
    conv, check = mlc.conv_template(template, transformers.AutoTokenizer.from_pretrained(model_dir))
    return conv, check, template


def test_chatml_conversation_template(models):
    from tunepipe.runtime.export.mlc_config import mlc_prompt

    conv, check, template = conversation_of(models["llama"], "chatml")
    assert conv["roles"] == {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    assert conv["role_content_sep"] == "\n" and conv["role_empty_sep"] == "\n"
    assert conv["seps"] == ["<|im_end|>\n"]
    assert conv["stop_str"] == ["<|im_end|>"] and conv["stop_token_ids"] == template["stop_token_ids"]
    assert conv["system_template"] == "" and conv["system_message"] == ""  # chatml has no default system prompt
    assert check == {"matches": True, "conversations": 2, "system_messages": False}
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert mlc_prompt(conv, messages) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "name, flags, system",
    [
        ("qwen", {}, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        ("chatml", {"default_system": "Answer in French."}, "Answer in French."),
        ("gemma", {"default_system": "Be terse."}, "Be terse."),  # system text folded into the first user turn
        ("qwen3", {}, ""),  # an empty think block before the answer
        ("default", {}, ""),
        ("auto", {}, ""),  # the tokenizer's own Jinja chat template
    ],
)
def test_conversation_template_reproduces_the_pipeline_prompt(models, name, flags, system):
    conv, check, _ = conversation_of(models["llama"], name, **flags)
    assert check["matches"], check
    assert conv["system_message"] == system
    assert check["system_messages"] == bool(system)
    if name == "gemma":
        assert conv["add_role_after_system_message"] is False


@pytest.mark.slow
def test_chat_config_fields(tvm, models, tmp_path):
    out = tmp_path / "mlc"
    info = export(models["mistral"], out, "q4f32_1")
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat["model_config"] == {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-06,
        "vocab_size": 1417,
        "position_embedding_base": 10000.0,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "context_window_size": -1,
        "sliding_window_size": 4096,
        "prefill_chunk_size": 4096,
        "attention_sink_size": 4,
        "tensor_parallel_shards": 1,
        "max_batch_size": 128,
    }  # mlc-llm's gen_config
    assert (chat["context_window_size"], chat["sliding_window_size"], chat["prefill_chunk_size"]) == (-1, 4096, 4096)
    assert chat["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_bytes() == (models["mistral"] / "tokenizer.json").read_bytes()
    assert chat["tokenizer_info"] == {
        "token_postproc_method": "byte_level",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": False,
    }
    assert (chat["temperature"], chat["top_p"], chat["eos_token_id"], chat["bos_token_id"]) == (1.0, 1.0, 0, None)
    assert chat["vocab_size"] == chat["active_vocab_size"] == 1417
    _, records = shard_records(out)
    assert records["lm_head.q_scale"][0]["dtype"] == "float32"
    command = "mlc_llm compile mlc-chat-config.json --device auto -o mistral-q4f32_1-auto.so"
    assert info["library"] == {
        "built": False,
        "reason": "mlc_llm is not installed (it is not on PyPI)",
        "command": command,
        "cwd": str(out),
    }
    assert command in (out / "README-mlc.txt").read_text()


def test_llama3_rope_scaling_reaches_model_config():
    from tiny_models import tiny_config

    from tunepipe.runtime.export.mlc_config import model_config

    config = tiny_config("llama")
    config.rope_parameters = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
        "rope_theta": 500000.0,
    }
    fields = model_config(config, "llama")
    assert fields["position_embedding_base"] == 500000.0
    assert fields["rope_scaling"] == {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
        "rope_type": "llama3",
        "type": "llama3",
    }
    assert (fields["context_window_size"], fields["prefill_chunk_size"]) == (512, 512)


@pytest.mark.slow
def test_library_is_compiled_when_mlc_llm_is_importable(tvm, models, tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "mlc_llm").mkdir(parents=True)
    (fake / "mlc_llm" / "__init__.py").write_text("")
    (fake / "mlc_llm" / "__main__.py").write_text(
        "import json, pathlib, sys\n"
        "args = sys.argv[1:]\n"
        "pathlib.Path(args[args.index('-o') + 1]).write_text(json.dumps(args))\n"
    )
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.setenv("PYTHONPATH", str(fake))
    out = tmp_path / "mlc"
    info = export(models["llama"], out, "q0f16")
    assert info["library"]["built"] is True
    args = json.loads((out / "llama-q0f16-auto.so").read_text())
    assert args == ["compile", "mlc-chat-config.json", "--device", "auto", "-o", "llama-q0f16-auto.so"]
    assert "was built here" in (out / "README-mlc.txt").read_text()


# ------------------------------------------------------------------------------------ user errors
def test_unknown_type_is_a_user_error(models, tmp_path):
    from tunepipe.runtime.export import mlc

    with pytest.raises(UserError, match="unknown MLC export type 'q3f16_0'") as err:
        mlc.export(models["llama"], tmp_path / "out", type="q3f16_0", template={}, log=LOG)
    assert "q4f16_1" in err.value.details[0]
    with pytest.raises(UserError, match="unknown MLC export type"):
        mlc.verify(tmp_path, models["llama"], [[1, 2]], type="int4", template={}, log=LOG)
    assert mlc.SUPPORTED_TYPES[0] == "q4f16_1"


def test_missing_tvm_names_the_pip_package(models, tmp_path, monkeypatch):
    from tunepipe.runtime.export import mlc

    for name in ("tvm", "tvm.contrib", "tvm.contrib.tvmjs"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError, match="apache-tvm") as err:
        mlc.export(models["llama"], tmp_path / "out", type="q4f16_1", template={}, log=LOG)
    assert err.value.details == ["pip install apache-tvm"]


def test_untied_gemma_cannot_be_exported(tvm, tmp_path):
    model_dir = make_tiny_model("gemma", tmp_path / "g", tie=False)
    with pytest.raises(UserError, match="always computes logits with the embedding"):
        export(model_dir, tmp_path / "out", "q0f16")


def test_rope_scaling_mlc_cannot_compute_is_a_user_error(tvm, tmp_path):
    model_dir = make_tiny_model("qwen2", tmp_path / "q")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not implement RoPE scaling 'linear'"):
        export(model_dir, tmp_path / "out", "q0f16")
