"""GGUF export: what the file holds (read back with gguf.GGUFReader) and what llama.cpp computes from it.

Every architecture is exported from a tiny random model; the metadata llama.cpp reads, the tokenizer and
one transformed tensor per architecture are checked byte for byte against the HF model. Through
llama-cpp-python each export is run next to the HF model: skipped when it is not installed, unless
TUNEPIPE_REQUIRE_LLAMA_CPP=1 (CI), where its absence fails the module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tiny_models import ARCHS, TOKENIZER, TOKENIZER_FILES, make_tiny_model, tiny_config

gguf = pytest.importorskip("gguf")
from safetensors import safe_open

from tunepipe.errors import UserError
from tunepipe.runtime.export import gguf as gguf_export
from tunepipe.runtime.export import modelfile
from tunepipe.runtime.export.gguf_arch import permute_rotary

LOG = logging.getLogger("test_export_gguf")
CHATML = {
    "name": "chatml",
    "source": "registry",
    "eos_token": "<|endoftext|>",
    "stop_words": ["<|im_end|>"],
    "default_system": "",
    "generation_prompt": "<|im_start|>assistant\n",
    "slots": {
        "prefix": "",
        "system": "<|im_start|>system\n{{content}}<|im_end|>\n",
        "system_in_user": False,
        "user": "<|im_start|>user\n{{content}}<|im_end|>\n",
        "assistant_header": "<|im_start|>assistant\n",
        "last_assistant_prefix": "",
        "assistant": "{{content}}<|im_end|>\n",
        "suffix": "",
        "tools": "",
        "tool_call": "{{content}}",
        "function": None,
        "observation": None,
        "default_system": "",
        "stop_words": ["<|im_end|>"],
        "strip_content": False,
    },
}
PROBES = [[5, 17, 250, 31, 999, 64, 12], [100, 3, 47, 1200, 8, 8, 301, 77, 5, 640, 21]]
try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    if os.environ.get("TUNEPIPE_REQUIRE_LLAMA_CPP") == "1":  # CI: these checks must run, never skip
        raise
    HAVE_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")


def tiny(arch: str, root: Path, **kwargs) -> Path:
    # gemma's llama.cpp graph reads the output from the embeddings: a gemma is exported tied
    return make_tiny_model(arch, root / f"{arch}-model", tie=arch.startswith("gemma"), **kwargs)


def export(model_dir: Path, root: Path, type: str, template: dict | None = None) -> tuple[Path, dict]:
    out = root / f"export-{type}"
    out.mkdir()
    info = gguf_export.export(model_dir, out, type=type, template=template or CHATML, log=LOG)
    return out, info


def hf_tensor(model_dir: Path, name: str) -> np.ndarray:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return f.get_tensor(name).float().numpy()


def gguf_tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(n) for n in t.shape])))


def field(reader, key: str):
    return reader.fields[key].contents()


# ------------------------------------------------------------------------------------ metadata
# (GGUF arch, HF tensor, GGUF tensor, transform applied by the export)
TRANSFORMED = {
    "llama": ("llama", "model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", lambda w: permute_rotary(w, 4)),
    "mistral": (
        "llama",
        "model.layers.1.self_attn.k_proj.weight",
        "blk.1.attn_k.weight",
        lambda w: permute_rotary(w, 2),
    ),
    "qwen2": ("qwen2", "model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias", lambda w: w),
    "qwen3": ("qwen3", "model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight", lambda w: w),
    "gemma": ("gemma", "model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight", lambda w: w + 1),
    "gemma2": (
        "gemma2",
        "model.layers.1.post_feedforward_layernorm.weight",
        "blk.1.post_ffw_norm.weight",
        lambda w: w + 1,
    ),
    "phi3": ("phi3", "model.layers.0.self_attn.qkv_proj.weight", "blk.0.attn_qkv.weight", lambda w: w),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_holds_what_llama_cpp_reads(arch, tmp_path):
    import transformers

    model_dir = tiny(arch, tmp_path)
    out, info = export(model_dir, tmp_path, "f32")
    reader = gguf.GGUFReader(out / "model.gguf")
    name, hf_name, gguf_name, transform = TRANSFORMED[arch]
    config = tiny_config(arch)
    assert field(reader, "general.architecture") == name == info["arch"]
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, f"{name}.context_length") == 512
    assert field(reader, f"{name}.embedding_length") == 64
    assert field(reader, f"{name}.feed_forward_length") == 128
    assert field(reader, f"{name}.block_count") == 2
    assert field(reader, f"{name}.attention.head_count") == 4
    assert field(reader, f"{name}.attention.head_count_kv") == 2
    assert field(reader, f"{name}.attention.key_length") == 16
    assert field(reader, f"{name}.rope.dimension_count") == 16
    assert field(reader, f"{name}.rope.freq_base") == 10000.0
    assert field(reader, f"{name}.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    if arch == "gemma2":
        assert field(reader, "gemma2.attn_logit_softcapping") == 50.0
        assert field(reader, "gemma2.final_logit_softcapping") == 30.0
        assert field(reader, "gemma2.attention.sliding_window") == 256

    # the tensor, as llama.cpp's graph reads it; gemma writes no output tensor (tied)
    hf = hf_tensor(model_dir, hf_name)
    np.testing.assert_array_equal(gguf_tensor(reader, gguf_name), transform(hf))
    if arch in ("llama", "mistral", "gemma", "gemma2"):
        assert not np.array_equal(transform(hf), hf)  # the transform did something
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not arch.startswith("gemma"))
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)

    # the tokenizer: tokens in id order, merges, special ids, the chat template of the model dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(vocab) == field(reader, f"{name}.vocab_size")
    assert all(tokens[i] == t for t, i in vocab.items())
    types = field(reader, "tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == [0, 1, 2]
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    assert field(reader, "tokenizer.ggml.merges") == [
        " ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]
    ]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id == 0
    assert field(reader, "tokenizer.ggml.padding_token_id") == 0
    assert "tokenizer.ggml.bos_token_id" not in reader.fields
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == (model_dir / "chat_template.jinja").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "type, tolerance", [("f16", 1e-3), ("bf16", 8e-3), ("q8_0", 1e-2), ("q5_1", 4e-2), ("q4_0", 0.15)]
)
def test_quantized_tensors_dequantize_to_the_hf_weights(type, tolerance, tmp_path):
    model_dir = tiny("llama", tmp_path)
    out, _ = export(model_dir, tmp_path, type)
    reader = gguf.GGUFReader(out / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == type.upper()
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    # 4/5-bit files keep the output projection at Q8_0 (llama.cpp's quantizer: Q6_K)
    assert types["output.weight"] == ("Q8_0" if type in ("q5_1", "q4_0") else type.upper())
    assert field(reader, "general.file_type") == gguf.LlamaFileType[gguf_export.FILE_TYPES[type]]
    hf = hf_tensor(model_dir, "model.layers.1.mlp.down_proj.weight")
    got = gguf_tensor(reader, "blk.1.ffn_down.weight")
    assert np.abs(got - hf).max() <= tolerance * np.abs(hf).max()
    assert not np.array_equal(got, hf) or type == "f32"
    np.testing.assert_array_equal(
        gguf_tensor(reader, "blk.1.ffn_norm.weight"),
        hf_tensor(model_dir, "model.layers.1.post_attention_layernorm.weight"),
    )


@pytest.mark.slow
def test_tied_embeddings_are_written_once(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "tied", tie=True)
    out, _ = export(model_dir, tmp_path, "q8_0")
    names = [t.name for t in gguf.GGUFReader(out / "model.gguf").tensors]
    assert "output.weight" not in names and names.count("token_embd.weight") == 1


@pytest.mark.slow
def test_gemma_with_its_own_lm_head_is_refused(tmp_path):
    model_dir = make_tiny_model("gemma", tmp_path / "untied", tie=False)
    with pytest.raises(UserError, match="lm_head separate from its embeddings"):
        export(model_dir, tmp_path, "f16")


def test_bad_type_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="'q9_9' is not one of") as err:
        gguf_export.export(tmp_path, tmp_path, type="q9_9", template=CHATML, log=LOG)
    assert "llama-cpp-python" in err.value.details[0]


def test_k_quant_without_llama_cpp_names_the_package(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    shutil.copyfile(Path(__file__).parents[1] / "examples/models/tiny-llama/config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="needs llama-cpp-python") as err:
        gguf_export.export(tmp_path, tmp_path, type="q4_k_m", template=CHATML, log=LOG)
    assert "pip install llama-cpp-python" in err.value.details[0]


# ----------------------------------------------------------------------------------- Modelfile
CHATML_MODELFILE = '''FROM ./model.gguf

TEMPLATE """{{- if .System }}{{ "<|im_start|>system\\n" }}{{ $.System }}{{ "<|im_end|>\\n" }}{{- end }}
{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}
{{- else if eq .Role "tool" }}{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}
{{- else if eq .Role "assistant" }}{{ "<|im_start|>assistant\\n" }}{{ .Content }}{{- if not $last }}{{ "<|im_end|>\\n" }}{{- end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}{{ "<|im_start|>assistant\\n" }}{{- end }}
{{- end }}"""

PARAMETER stop "<|im_end|>"
'''


def test_modelfile_for_chatml():
    assert modelfile.modelfile(CHATML, "model.gguf") == CHATML_MODELFILE


def test_modelfile_recognises_a_jinja_chatml_and_keeps_a_default_system():
    jinja = (Path(__file__).parents[1] / "examples/models/tiny-llama/chat_template.jinja").read_text()
    auto = {
        "name": "auto",
        "source": "tokenizer",
        "chat_template": jinja,
        "stop_words": [],
        "eos_token": "<|endoftext|>",
    }
    assert modelfile.modelfile(auto, "model.gguf") == CHATML_MODELFILE.replace(
        "FROM ./model.gguf\n",
        "FROM ./model.gguf\n\n# the Jinja chat template renders as the built-in 'chatml' template",
    )
    unknown = dict(auto, chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    text = modelfile.modelfile(unknown, "model.gguf")
    assert "TEMPLATE" not in text and "tokenizer.chat_template" in text
    with_system = {**CHATML, "default_system": "Be kind.", "slots": {**CHATML["slots"], "default_system": "Be kind."}}
    assert 'SYSTEM """Be kind."""' in modelfile.modelfile(with_system, "model.gguf")


GO_RENDER = r"""package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string; Content string }

func main() {
	var v struct { Template string; System string; Messages []Message }
	json.NewDecoder(os.Stdin).Decode(&v)
	t := template.Must(template.New("").Parse(v.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": v.System, "Messages": v.Messages}); err != nil { panic(err) }
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (renders the Modelfile TEMPLATE)")
@pytest.mark.parametrize(
    "name, added_bos",
    [
        ("chatml", ""),
        ("qwen3", ""),
        ("phi3", ""),
        ("gemma", ""),
        ("gemma", "<s>"),
        ("llama2", "<s>"),
        ("llama3", "<s>"),
    ],
)
def test_modelfile_template_renders_the_pipeline_prompt_in_go(name, added_bos, tmp_path):
    """Ollama's template data (.System = the system messages, .Messages = all messages) through Go's
    text/template, against tunepipe's own prompt rendering of the same conversation; when llama.cpp
    adds the bos itself (added_bos) the TEMPLATE renders the rest."""
    from tunepipe.runtime import template_registry
    from tunepipe.runtime.chat_template import SlotRenderer

    slots = SlotRenderer.build(template_registry.get(name), "<s>", "</s>", None).slots
    program = tmp_path / "render.go"
    program.write_text(GO_RENDER)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And now?"},
    ]
    for messages in (conversation, conversation[1:]):
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        data = {
            "Template": modelfile.go_template(slots, added_bos=added_bos),
            "System": system,
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
        }
        go = subprocess.run(
            ["go", "run", str(program)], input=json.dumps(data), capture_output=True, text=True, check=True, timeout=120
        )
        assert added_bos + go.stdout == SlotRenderer(slots).prompt(messages)


# ------------------------------------------------------------------------------- in llama.cpp
# f32 bounds from what llama.cpp's own convert_hf_to_gguf.py reaches on these tiny models
# (`python bench/gguf.py --fidelity`: ~2e-6 for all but gemma 7e-4 and gemma2 4e-4, whose GELU llama.cpp
# computes through an f16 table); tunepipe's f32/f16/bf16/q8_0 files are bit-identical to the converter's.
F32_REL = {"gemma": 2e-3, "gemma2": 2e-3}
DEFAULT_F32_REL = 1e-4


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_export_computes_the_hf_logits_in_llama_cpp(arch, tmp_path):
    model_dir = tiny(arch, tmp_path)
    out, _ = export(model_dir, tmp_path, "f32")
    figures = gguf_export.verify(out, model_dir, PROBES, type="f32", template=CHATML, log=LOG)
    assert figures["probes"] == 2 and figures["positions"] == len(PROBES[0]) + len(PROBES[1]) + 16
    assert figures["max_rel_logit_error"] < F32_REL.get(arch, DEFAULT_F32_REL), figures
    assert figures["greedy_agreement"] == 1.0, figures
    assert figures["chat_template_tokens_match"] is True, figures["chat_template"]


def memorize(model_dir: Path, sequences: int = 4, length: int = 24, steps: int = 60) -> list[list[int]]:
    """Train the model in place until it has memorized a few random sequences (a stand-in for a
    fine-tuned model: its next-token choices are clear, unlike a random model's near-ties); returns
    their first 10 tokens as probes."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = torch.randint(3, model.config.vocab_size, (sequences, length), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05
    model.save_pretrained(model_dir)
    return data[:, :10].tolist()


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("type, rel", [("f16", 1e-2), ("bf16", 3e-2), ("q8_0", 0.1), ("q5_1", 0.4), ("q4_0", 0.8)])
def test_quantized_export_keeps_the_greedy_tokens_in_llama_cpp(type, rel, tmp_path):
    """On a model with clear next tokens (memorized sequences) every quantized type keeps every greedy
    token; the logit error grows as bits go. (A random model's near-ties flip under any rounding.)"""
    model_dir = tiny("qwen2", tmp_path)
    probes = memorize(model_dir)
    out, _ = export(model_dir, tmp_path, type)
    figures = gguf_export.verify(out, model_dir, probes, type=type, template=CHATML, log=LOG)
    assert figures["greedy_agreement"] == 1.0, figures
    assert rel / 20 < figures["max_rel_logit_error"] < rel, figures  # quantization did change the weights


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_rope_scaling_travels_to_llama_cpp(rope, tmp_path):
    model_dir = tiny("llama", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (model_dir / "config.json").write_text(json.dumps(config))
    out, _ = export(model_dir, tmp_path, "f32")
    figures = gguf_export.verify(out, model_dir, PROBES, type="f32", template=CHATML, log=LOG)
    assert figures["max_rel_logit_error"] < DEFAULT_F32_REL and figures["greedy_agreement"] == 1.0, figures


@needs_llama_cpp
@pytest.mark.slow
def test_chat_template_mismatch_is_reported(tmp_path):
    """A GGUF whose embedded template differs from the model's renders other tokens: verify says so."""
    model_dir = tiny("llama", tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    other = {**CHATML, "slots": {**CHATML["slots"], "user": "<|im_start|>human\n{{content}}<|im_end|>\n"}}
    (model_dir / "chat_template.jinja").rename(tmp_path / "moved.jinja")  # the export takes template.json's
    gguf_export.export(model_dir, out, type="f32", template=other, log=LOG)
    (tmp_path / "moved.jinja").rename(model_dir / "chat_template.jinja")
    figures = gguf_export.verify(out, model_dir, PROBES[:1], type="f32", template=CHATML, log=LOG)
    assert figures["chat_template_tokens_match"] is False
    case = figures["chat_template"]["conversation"]
    assert (
        case["match"] is False
        and case["gguf_ids"][: case["first_difference"]] == case["hf_ids"][: case["first_difference"]]
    )


@needs_llama_cpp
@pytest.mark.slow
def test_k_quant_goes_through_llama_cpp(tmp_path):
    """A model wide enough for 256-wide k-quant blocks, quantized by llama.cpp's own quantizer."""
    import torch
    import transformers

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64
    torch.manual_seed(0)
    model_dir = tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER / name, model_dir / name)
    probes = memorize(model_dir)
    out, info = export(model_dir, tmp_path, "q4_k_m")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"] and info["k_quant_from"] == "f32"
    reader = gguf.GGUFReader(out / "model.gguf")
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "F32"} <= types
    assert field(reader, "tokenizer.chat_template") == (model_dir / "chat_template.jinja").read_text()
    figures = gguf_export.verify(out, model_dir, probes, type="q4_k_m", template=CHATML, log=LOG)
    assert figures["greedy_agreement"] == 1.0 and figures["chat_template_tokens_match"], figures


# ------------------------------------------------------------------------------- SentencePiece
SPM_VOCAB = 600


def spm_model(root: Path) -> Path:
    """A tiny llama whose tokenizer is a freshly trained SentencePiece BPE model (tokenizer.model)."""
    import torch
    import transformers

    spm = pytest.importorskip("sentencepiece")
    corpus = root / "corpus.txt"
    corpus.write_text((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(root / "sp"),
        vocab_size=SPM_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        # as Llama's: no normalization, whitespace kept
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    model_dir = root / "spm-model"
    model_dir.mkdir()
    shutil.copyfile(root / "sp.model", model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "chat_template": CHATML_JINJA,
            }
        )
    )
    config = tiny_config("llama")
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = SPM_VOCAB, 1, 2, None
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0 if p.ndim == 1 else 0.0, 0.1 if p.ndim == 1 else 0.2)
    model.save_pretrained(model_dir)
    return model_dir


CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.slow
def test_sentencepiece_tokenizer_becomes_a_llama_vocab(tmp_path):
    import sentencepiece
    import transformers

    model_dir = spm_model(tmp_path)
    out, info = export(model_dir, tmp_path, "f16")
    assert info["tokenizer"]["model"] == "llama"
    reader = gguf.GGUFReader(out / "model.gguf")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.pre") == "default"
    assert field(reader, "tokenizer.ggml.tokens") == [processor.IdToPiece(i) for i in range(SPM_VOCAB)]
    assert field(reader, "tokenizer.ggml.scores") == pytest.approx([processor.GetScore(i) for i in range(SPM_VOCAB)])
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE  # <0x00>: byte fallback
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert transformers.AutoTokenizer.from_pretrained(model_dir)("a")["input_ids"][0] == 1
    if HAVE_LLAMA_CPP:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), verbose=False, n_ctx=64)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        text = "Declarative fine-tuning, cached steps: data → template → train.\nNext  line ü"
        assert llm.tokenize(text.encode()) == tokenizer(text)["input_ids"] == processor.encode(text, add_bos=True)
        # leading spaces: llama.cpp tokenizes as SentencePiece does (transformers' conversion differs there)
        assert llm.tokenize(b"  two") == processor.encode("  two", add_bos=True)

    # without tokenizer.model (transformers ≥ 5 saves only tokenizer.json) the scores are gone: say so
    transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(model_dir)
    (model_dir / "tokenizer.model").unlink()
    (tmp_path / "export-f16" / "model.gguf").unlink()
    with pytest.raises(UserError, match="without its tokenizer.model") as err:
        gguf_export.export(model_dir, tmp_path / "export-f16", type="f16", template=CHATML, log=LOG)
    assert "copy the base model's tokenizer.model" in err.value.details[0]


def test_general_name_only_where_llama_cpp_keys_token_rules_on_it():
    """llama.cpp strips whitespace after special tokens only for files named like phi3 (and then needs
    Phi-3's </s> <unk> <s> <|endoftext|>): a Phi-3 tokenizer with such tokens gets the name, nothing else."""
    from types import SimpleNamespace

    from tokenizers import AddedToken

    from tunepipe.runtime.export.gguf_vocab import llama_cpp_name

    def tokenizer(rstrip: bool, vocab: tuple[str, ...]):
        added = {i: AddedToken(t, special=True, rstrip=rstrip) for i, t in enumerate(vocab)}
        return SimpleNamespace(added_tokens_decoder=added, get_vocab=lambda: {t: i for i, t in enumerate(vocab)})

    phi3_vocab = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>")
    assert llama_cpp_name(tokenizer(True, phi3_vocab), {"model_type": "phi3"}) == "phi3"
    assert llama_cpp_name(tokenizer(False, phi3_vocab), {"model_type": "phi3"}) is None
    assert llama_cpp_name(tokenizer(True, ("<|endoftext|>", "<|end|>")), {"model_type": "phi3"}) is None
    assert llama_cpp_name(tokenizer(True, phi3_vocab), {"model_type": "llama"}) is None


def test_modelfile_leaves_out_the_bos_llama_cpp_adds():
    from tunepipe.runtime import template_registry
    from tunepipe.runtime.chat_template import SlotRenderer

    slots = SlotRenderer.build(template_registry.get("llama3"), "<|begin_of_text|>", "<|eot_id|>", None).slots
    llama3 = {"slots": slots, "stop_words": slots["stop_words"]}
    added = modelfile.modelfile(llama3, "model.gguf", added_bos="<|begin_of_text|>")
    assert "# <|begin_of_text|> opens the prompt: llama.cpp adds it" in added
    assert 'TEMPLATE """{{- if .System }}' in added and 'begin_of_text|>" }}' not in added
    kept = modelfile.modelfile(llama3, "model.gguf")
    assert 'TEMPLATE """{{ "<|begin_of_text|>" }}{{- if .System }}' in kept
