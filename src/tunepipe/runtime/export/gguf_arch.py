"""What llama.cpp needs per architecture: its arch name, hyperparameters and weight transforms.

    arch = architecture(config)                 # UserError for a model llama.cpp's export here lacks
    write_hparams(writer, config, arch, n_vocab)
    for t in plan_tensors(model_dir, config, arch): t.name, t.shape, t.load() -> float32 numpy, transformed

Mirrors llama.cpp's own converter (convert_hf_to_gguf.py, conversion/{llama,qwen,gemma,phi}.py), which
is a script, not a library, so these rules are restated here: the rotary Q/K permutation of llama and
mistral (HF stores the rotate-half layout, llama.cpp's LLAMA graph wants interleaved pairs), none for
qwen2/qwen3/phi3/gemma (NEOX rope in llama.cpp), gemma's RMSNorm `(1 + w)` folded into the weight,
phi3's fused qkv_proj/gate_up_proj kept fused (llama.cpp's PHI3 graph splits them), tied embeddings
written once. Tensor names come from gguf's own map (`gguf.get_tensor_name_map`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunepipe.errors import UserError


@dataclass(frozen=True)
class Arch:
    name: str  # the HF model_type
    gguf_arch: str  # key of gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's LLAMA graph: undo HF's rotate-half Q/K layout
    norm_offset: float  # gemma stores RMSNorm weights as w for (1 + w)
    tied_only: bool  # llama.cpp's graph always reads the output from token_embd


ARCHS = {
    "llama": Arch("llama", "LLAMA", permute_qk=True, norm_offset=0.0, tied_only=False),
    "mistral": Arch("mistral", "LLAMA", permute_qk=True, norm_offset=0.0, tied_only=False),
    "qwen2": Arch("qwen2", "QWEN2", permute_qk=False, norm_offset=0.0, tied_only=False),
    "qwen3": Arch("qwen3", "QWEN3", permute_qk=False, norm_offset=0.0, tied_only=False),
    "gemma": Arch("gemma", "GEMMA", permute_qk=False, norm_offset=1.0, tied_only=True),
    "gemma2": Arch("gemma2", "GEMMA2", permute_qk=False, norm_offset=1.0, tied_only=True),
    "phi3": Arch("phi3", "PHI3", permute_qk=False, norm_offset=0.0, tied_only=False),
}


def architecture(config: dict[str, Any]) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UserError(
            f"GGUF export does not support model_type {model_type!r}",
            [f"supported: {', '.join(ARCHS)}", "or export another format (safetensors, onnx) for this model"],
        )
    return ARCHS[model_type]


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers ≥ 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    return params


# ------------------------------------------------------------------------------ hyperparameters
def write_hparams(writer, config: dict[str, Any], arch: Arch, n_vocab: int, log) -> None:
    n_head = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(n_vocab)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(head_dim(config) * rope.get("partial_rotary_factor", 1.0)))
    _write_rope_scaling(writer, rope, config)
    if arch.name == "gemma2":
        if config.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        if config.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    if arch.name == "phi3":
        writer.add_rope_scaling_orig_ctx_len(
            config.get("original_max_position_embeddings") or config["max_position_embeddings"]
        )
        writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: no window (as llama.cpp's converter)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if arch.gguf_arch in ("LLAMA", "QWEN2", "QWEN3") and window and window < config["max_position_embeddings"]:
        log.warning(
            "llama.cpp's %s graph has no sliding window: contexts beyond %d tokens attend further than the HF model",
            arch.gguf_arch.lower(),
            window,
        )


def _write_rope_scaling(writer, rope: dict[str, Any], config: dict[str, Any]) -> None:
    import gguf

    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(
            rope.get("original_max_position_embeddings") or config["max_position_embeddings"]
        )
        for key, add in (
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
        ):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind == "longrope" and config.get("model_type") == "phi3":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(_longrope_attn_factor(config, rope))
    elif kind not in ("default", "llama3"):  # llama3 scaling travels as the rope_freqs tensor
        raise UserError(
            f"GGUF export does not support rope scaling {kind!r}",
            ["supported: default, linear, yarn, llama3 (and longrope for phi3)"],
        )


def _longrope_attn_factor(config: dict[str, Any], rope: dict[str, Any]) -> float:
    original = config.get("original_max_position_embeddings") or rope["original_max_position_embeddings"]
    scale = config["max_position_embeddings"] / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


# ------------------------------------------------------------------------------------- tensors
@dataclass
class PlannedTensor:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # numpy (row-major) shape after the transform
    load: Callable[[], np.ndarray]  # reads the tensor from its shard, transformed, float32
    hf_name: str | None = None  # None for tensors llama.cpp needs but HF computes (rope factors)


def plan_tensors(model_dir: Path, config: dict[str, Any], arch: Arch) -> list[PlannedTensor]:
    """Every tensor of the GGUF in file order, without reading any tensor data yet."""
    import gguf

    shards = _shard_index(model_dir)
    shapes = _shapes(set(shards.values()))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config["num_hidden_layers"])
    tied = _tied(config, shards, arch)
    plan = list(_extra_tensors(config))
    for hf_name in sorted(shards, key=_natural):
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(
                f"GGUF export: no llama.cpp tensor for {hf_name!r} of a {arch.name} model",
                ["the checkpoint has weights this architecture's llama.cpp graph does not read"],
            )
        plan.append(PlannedTensor(gguf_name, shapes[hf_name], _loader(shards[hf_name], hf_name, config, arch), hf_name))
    return plan


def _natural(name: str):
    """Layer order: model.layers.2 before model.layers.10 (as the HF state dict iterates)."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _shard_index(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(
            f"{model_dir}: no model.safetensors or model.safetensors.index.json",
            ["GGUF export reads a merged model directory (safetensors weights)"],
        )
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _shapes(paths: set[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the shards' headers (no tensor data is read)."""
    from safetensors import safe_open

    shapes = {}
    for path in paths:
        with safe_open(path, "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118
    return shapes


def read_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor as float32. The shard is opened per tensor so its memory map (and the pages it
    touched) is released before the next tensor: peak memory stays about one tensor."""
    import torch
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


def _tied(config: dict[str, Any], shards: dict[str, Path], arch: Arch) -> bool:
    """Whether the output projection is the token embedding (then lm_head is not written)."""
    if "lm_head.weight" not in shards:
        return True
    if config.get("tie_word_embeddings", False):
        return True
    if not arch.tied_only:
        return False
    embed = read_tensor(shards["model.embed_tokens.weight"], "model.embed_tokens.weight")
    head = read_tensor(shards["lm_head.weight"], "lm_head.weight")
    if not np.array_equal(embed, head):
        raise UserError(
            f"GGUF export: this {arch.name} model has an lm_head separate from its embeddings",
            [
                f"llama.cpp's {arch.name} graph always uses the token embeddings as the output layer",
                "train with tied embeddings (tie_word_embeddings: true, gemma's default)",
            ],
        )
    return True


def _loader(path: Path, hf_name: str, config: dict[str, Any], arch: Arch) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return transform(read_tensor(path, hf_name), hf_name, config, arch)

    return load


def transform(data: np.ndarray, hf_name: str, config: dict[str, Any], arch: Arch) -> np.ndarray:
    """The HF tensor as llama.cpp's graph for `arch` reads it."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        data = permute_rotary(data, n_head)
    elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        data = permute_rotary(data, n_kv)
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        data = data + np.float32(arch.norm_offset)
    return data


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows → llama.cpp's interleaved pairs, per head (llama.cpp's LlamaModel.permute)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _extra_tensors(config: dict[str, Any]) -> list[PlannedTensor]:
    """Rope frequency factors llama.cpp reads as tensors: llama3 scaling (rope_freqs), phi3 longrope."""
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3":
        factors = _llama3_rope_factors(rope, head_dim(config))
        return [PlannedTensor("rope_freqs.weight", factors.shape, lambda: factors)]
    if rope["rope_type"] == "longrope" and config.get("model_type") == "phi3":
        long_f = np.asarray(rope["long_factor"], dtype=np.float32)
        short_f = np.asarray(rope["short_factor"], dtype=np.float32)
        return [
            PlannedTensor("rope_factors_long.weight", long_f.shape, lambda: long_f),
            PlannedTensor("rope_factors_short.weight", short_f.shape, lambda: short_f),
        ]
    return []


def _llama3_rope_factors(rope: dict[str, Any], dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency scaling, computed as transformers' _compute_llama3_parameters does."""
    base = rope["rope_theta"]
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_context / high,
        1.0,
        np.where(wavelen > old_context / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)
