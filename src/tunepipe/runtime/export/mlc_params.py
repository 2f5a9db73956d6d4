"""MLC-LLM's parameter names for each architecture, from a Hugging Face state dict and back.

    layout = layout_for(hf_config)                 # UserError for an architecture mlc-llm cannot run
    params = to_mlc(state, layout, hf_config)      # {hf name: float32 array} -> {mlc name: float32 array}
    state = from_mlc(params, layout, hf_config)    # the inverse (verify loads the export into HF)

What mlc-llm's loaders (python/mlc_llm/model/<arch>/<arch>_loader.py) do to HF weights, per arch:
- q/k/v projections are concatenated on the output axis into one `qkv_proj` (llama, mistral, gemma,
  gemma2) or `c_attn` (qwen2, qwen3; with their biases when the model has them); phi3's HF weights
  are already fused;
- gate/up projections are concatenated into `gate_up_proj` (phi3's already are);
- gemma's RMSNorm scales by (1 + w) where mlc-llm's scales by w: every `*norm.weight` is stored + 1;
- phi3's modules are renamed (transformer.h.{i}.mixer.qkv_proj, transformer.embd, ...);
- the output head: mlc-llm's gemma always reads the embedding (an untied gemma cannot be exported),
  its mistral always has `lm_head` (a tied mistral gets a copy of the embedding), the others follow
  `tie_word_embeddings`.
Every other parameter keeps its HF name. Quantization is applied afterwards (mlc.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunepipe.errors import UserError

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Layout:
    model_type: str  # mlc-llm's model type (mlc-chat-config.json)
    qkv: str | None  # mlc's fused q/k/v module name; None: HF fuses it already
    fuse_gate_up: bool  # False: HF fuses gate_up_proj already
    norm_offset: float  # added to every *norm.weight (gemma: 1)
    head: str  # "follows_config" | "always_tied" | "never_tied"
    renames: tuple[tuple[str, str], ...] = ()  # HF → mlc name fragments, applied in order


PHI3_RENAMES = (
    ("model.layers.", "transformer.h."),
    ("model.embed_tokens.", "transformer.embd."),
    ("model.norm.", "transformer.norm."),
    (".self_attn.o_proj.", ".mixer.out_proj."),
    (".self_attn.qkv_proj.", ".mixer.qkv_proj."),
    (".input_layernorm.", ".ln."),
)

LAYOUTS = {
    "llama": Layout("llama", "qkv_proj", True, 0.0, "follows_config"),
    "mistral": Layout("mistral", "qkv_proj", True, 0.0, "never_tied"),
    "qwen2": Layout("qwen2", "c_attn", True, 0.0, "follows_config"),
    "qwen3": Layout("qwen3", "c_attn", True, 0.0, "follows_config"),
    "gemma": Layout("gemma", "qkv_proj", True, 1.0, "always_tied"),
    "gemma2": Layout("gemma2", "qkv_proj", True, 1.0, "always_tied"),
    "phi3": Layout("phi3", None, False, 0.0, "follows_config", PHI3_RENAMES),
}


def layout_for(config) -> Layout:
    """The layout of an HF config's architecture, or a UserError naming the supported ones."""
    layout = LAYOUTS.get(config.model_type)
    if layout is None:
        raise UserError(
            f"MLC export does not support model_type {config.model_type!r}", [f"supported: {', '.join(LAYOUTS)}"]
        )
    if layout.head == "always_tied" and not config.tie_word_embeddings:
        raise UserError(
            f"mlc-llm's {layout.model_type} always computes logits with the embedding matrix, "
            "but this model has its own lm_head (tie_word_embeddings: false)",
            ["export a model with tied embeddings, or use another export format (gguf, onnx)"],
        )
    return layout


def _rename(name: str, layout: Layout) -> str:
    for hf, mlc in layout.renames:
        name = name.replace(hf, mlc)
    return name


def _unrename(name: str, layout: Layout) -> str:
    for hf, mlc in reversed(layout.renames):
        name = name.replace(mlc, hf)
    return name


def _fusions(layout: Layout) -> dict[str, tuple[str, ...]]:
    """{mlc module: the HF modules concatenated into it} for this layout."""
    fusions = {layout.qkv: QKV} if layout.qkv else {}
    if layout.fuse_gate_up:
        fusions["gate_up_proj"] = GATE_UP
    return fusions


def _split_name(name: str) -> tuple[str, str, str]:
    """("model.layers.0.self_attn", "q_proj", "weight") for "model.layers.0.self_attn.q_proj.weight"."""
    prefix, _, leaf = name.rpartition(".")
    prefix, _, module = prefix.rpartition(".")
    return prefix, module, leaf


def _fused(name: str, layout: Layout) -> tuple[str, int] | None:
    """(mlc name, position) when HF `name` is one part of a fused mlc parameter."""
    prefix, module, leaf = _split_name(name)
    for target, members in _fusions(layout).items():
        if module in members:
            return f"{prefix}.{target}.{leaf}", members.index(module)
    return None


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def to_mlc(state: dict[str, np.ndarray], layout: Layout, config) -> dict[str, np.ndarray]:
    """mlc-llm's parameters (float32, unquantized) from an HF state dict, in HF name order."""
    tied = bool(config.tie_word_embeddings)
    params: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for name in sorted(state):
        array = np.asarray(state[name], dtype=np.float32)
        if name == LM_HEAD and tied:
            continue  # the embedding; added back below where mlc-llm needs its own lm_head
        fused = _fused(name, layout)
        if fused is not None:
            target, position = fused
            parts.setdefault(target, {})[position] = array
            params.setdefault(target, None)  # keeps the position of the first part
            continue
        if layout.norm_offset and _is_norm(name):
            array = array + np.float32(layout.norm_offset)
        params[_rename(name, layout)] = array
    for target, pieces in parts.items():
        params[target] = np.concatenate([pieces[i] for i in sorted(pieces)], axis=0)
    if tied and layout.head == "never_tied":
        params[LM_HEAD] = params[_rename(EMBED, layout)].copy()
    return params


def _split_sizes(module: str, config) -> list[int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if module == "gate_up_proj":
        return [config.intermediate_size] * 2
    kv = (config.num_key_value_heads or config.num_attention_heads) * head_dim
    return [config.num_attention_heads * head_dim, kv, kv]


def from_mlc(params: dict[str, np.ndarray], layout: Layout, config) -> dict[str, np.ndarray]:
    """The HF state dict (float32) that mlc-llm's parameters stand for; the inverse of `to_mlc`."""
    fusions = _fusions(layout)
    state: dict[str, np.ndarray] = {}
    for name, array in params.items():
        array = np.asarray(array, dtype=np.float32)
        prefix, module, leaf = _split_name(name)
        if module in fusions:
            bounds = np.cumsum(_split_sizes(module, config))[:-1]
            for part, piece in zip(fusions[module], np.split(array, bounds, axis=0)):
                state[f"{prefix}.{part}.{leaf}"] = piece
            continue
        hf_name = _unrename(name, layout)
        if layout.norm_offset and _is_norm(hf_name):
            array = array - np.float32(layout.norm_offset)
        state[hf_name] = array
    if config.tie_word_embeddings:
        state.pop(LM_HEAD, None)  # mistral's copy; HF ties it to the embedding
    return state
