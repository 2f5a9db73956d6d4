"""Tiny random causal LMs of every architecture the exporters claim, built offline from a config.

    make_tiny_model("qwen2", tmp_path / "m")  # config + safetensors + the bundled BPE tokenizer

Every model has 2 layers, hidden 64, 4 heads of 16 with 2 KV heads, and the vocabulary of the
bundled tokenizer (examples/models/tiny-llama, chatml chat template in chat_template.jinja). Weights are drawn from a
seeded generator with a larger spread than the configs' init (std 0.02 makes every logit ~0 and
every argmax a tie, which would test nothing), so logits differ clearly between tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-llama"
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
INIT_STD = 0.2


def tiny_config(arch: str, *, tie: bool = False):
    import transformers

    vocab = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    common = dict(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=vocab.eos_token_id,
        pad_token_id=vocab.pad_token_id,
        bos_token_id=None,
    )
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "phi3": transformers.Phi3Config,
    }
    if arch not in classes:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    extra = {}
    if arch == "phi3":
        extra = {"original_max_position_embeddings": 512}
    if arch == "gemma2":
        extra = {"sliding_window": 256, "query_pre_attn_scalar": 16}
    return classes[arch](**common, **extra)


def make_tiny_model(arch: str, path: Path, *, seed: int = 0, dtype: str = "float32", tie: bool | None = None) -> Path:
    """Save a tiny random `arch` model with the bundled tokenizer into `path`; returns `path`.
    Embeddings are tied for gemma/gemma2 (as the real models are), untied otherwise, unless `tie` says."""
    import torch
    import transformers

    tie = arch.startswith("gemma") if tie is None else tie
    config = tiny_config(arch, tie=tie)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.ndim == 1:  # norms: around their neutral value (1, or 0 for gemma's 1 + w)
                neutral = 0.0 if arch.startswith("gemma") else 1.0
                param.copy_(neutral + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(INIT_STD * torch.randn(param.shape, generator=generator))
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER / name, path / name)
    return path
