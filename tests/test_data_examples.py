"""The bundled example assets are what scripts/build_examples.py builds, byte for byte, and they load offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def test_examples_rebuild_identically():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_examples.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "examples are up to date" in result.stdout


def test_tiny_llama_is_small_and_loads_offline():
    transformers = pytest.importorskip("transformers")
    model_dir = EXAMPLES / "models" / "tiny-llama"
    assert sum(p.stat().st_size for p in model_dir.iterdir()) < 1_000_000
    assert not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin"))  # config only
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.max_position_embeddings,
        config.tie_word_embeddings,
    ) == (64, 2, 4, 2, 128, 512, False)
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am TinyPipe."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am TinyPipe.<|im_end|>\n"
    )
    ids = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[0] == "<|im_start|>" and len(ids) == 3


def test_identity_data_is_consistent():
    rows = json.loads((EXAMPLES / "data" / "identity.json").read_text())
    assert 30 <= len(rows) <= 60
    assert all("TinyPipe" in r["output"] and "tunepipe" in r["output"] for r in rows)
    assert len({r["instruction"] for r in rows}) == len(rows) and len({r["output"] for r in rows}) <= 4
    info = json.loads((EXAMPLES / "data" / "dataset_info.json").read_text())
    assert {"identity", "tiny_corpus", "tiny_chat", "tiny_openai"} <= set(info)
    assert info["tiny_corpus"]["columns"] == {"prompt": "text"}
