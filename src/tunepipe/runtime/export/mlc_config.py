"""mlc-chat-config.json: mlc-llm's model config, conversation template and tokenizer info for an HF model.

    config = chat_config(hf_config, layout, type, conv, tokenizer_files=..., tokenizer_info=..., generation=...)
    conv, report = conversation(render, history, name=..., bos_token=..., bos_token_id=..., stop_words=..., stop_token_ids=...)
    report = check(conv, render, bos_token)    # mlc-llm's prompts == the pipeline's?

Field names and defaults follow mlc-llm's own generator (python/mlc_llm/interface/gen_config.py,
protocol/mlc_chat_config.py, the `*Config` dataclasses of python/mlc_llm/model/<arch>/<arch>_model.py,
the `mlc_llm gen_config` command-line defaults), checked against its output for the tiny test models.
mlc-llm is not on PyPI, so these are written here; the values mlc-llm would fill in itself at
compile time are written out in full, as `mlc_llm gen_config` does.

The conversation template is derived from the pipeline's own renderer (runtime/chat_template.py),
whatever the template's kind (registry slots or Jinja): prompts are rendered with marker contents
and cut into mlc-llm's pieces (system_template, roles, role_templates, seps, role_empty_sep), then
`mlc_prompt` — mlc-llm's prompt assembly (cpp/json_ffi/conv_template.cc, CreatePrompt) — renders test
conversations that must equal the pipeline's prompts; the result of that check is reported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tunepipe.errors import UserError

CHAT_CONFIG_VERSION = "0.1.0"  # mlc_llm.support.constants.MLC_CHAT_CONFIG_VERSION
MAX_BATCH_SIZE = 128  # `mlc_llm gen_config --max-batch-size` default
PREFILL_CAP = {"qwen3": 2048}  # min(context window, cap) is mlc-llm's prefill chunk default
DEFAULT_PREFILL_CAP = 8192
ATTENTION_SINK_SIZE = 4  # MistralConfig.attention_sink_size default
SAMPLING_DEFAULTS = {
    "temperature": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_p": 1.0,
}  # MLC_CHAT_SYSTEM_DEFAULT
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
)  # gen_config.TOKENIZER_FILES, the files mlc-llm copies
ROPE_SCALINGS = {"llama": "llama3", "phi3": "longrope"}  # the only RoPE scaling each mlc model implements


# ------------------------------------------------------------------------------------ model config
def _rope(config) -> tuple[float, dict | None]:
    """(rope theta, the RoPE scaling dict or None) from a transformers 5 (rope_parameters) or 4 config."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    allowed = ROPE_SCALINGS.get(config.model_type)
    if kind != allowed:
        raise UserError(
            f"mlc-llm's {config.model_type} does not implement RoPE scaling {kind!r}",
            [
                f"it implements: {allowed or 'none'}",
                "export without rope_scaling, or use another export format (gguf, onnx)",
            ],
        )
    params.pop("partial_rotary_factor", None)
    return float(theta), {**params, "rope_type": kind, "type": kind}  # mlc's llama reads rope_type, its phi3 type


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_supported(config) -> None:
    """Model features mlc-llm's implementation of the architecture does not compute."""
    problems = []
    if getattr(config, "attention_bias", False) and config.model_type not in ("qwen2", "qwen3"):
        problems.append("attention_bias: true (mlc-llm's model has no attention biases)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias: true (mlc-llm's model has no MLP biases)")
    if config.model_type in ("qwen2", "phi3") and _head_dim(config) * config.num_attention_heads != config.hidden_size:
        problems.append("head_dim × num_attention_heads ≠ hidden_size (mlc-llm's model requires it)")
    if config.model_type.startswith("gemma"):
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act not in ("gelu", "gelu_pytorch_tanh"):
            problems.append(f"hidden_activation {act!r} (mlc-llm's gemma runs GeLU only)")
    if problems:
        raise UserError(f"mlc-llm cannot run this {config.model_type} model", problems)


def model_config(config, model_type: str) -> dict[str, Any]:
    """mlc-chat-config.json's `model_config`: the fields of mlc-llm's `<Arch>Config`, resolved."""
    _check_supported(config)
    theta, rope_scaling = _rope(config)
    context = config.max_position_embeddings
    common = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads or config.num_attention_heads,
        "head_dim": _head_dim(config),
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "context_window_size": context,
        "tensor_parallel_shards": 1,
        "max_batch_size": MAX_BATCH_SIZE,
    }
    tie = {"tie_word_embeddings": bool(config.tie_word_embeddings)}
    if model_type == "llama":
        extra = {
            **tie,
            "position_embedding_base": theta,
            "rope_scaling": rope_scaling,
            "pipeline_parallel_stages": 1,
            "disaggregation": False,
        }
    elif model_type == "mistral":
        window = getattr(config, "sliding_window", None) or -1
        extra = {
            "position_embedding_base": theta,
            "sliding_window_size": window,
            "attention_sink_size": ATTENTION_SINK_SIZE,
            "context_window_size": context if window == -1 else -1,
        }
    elif model_type in ("qwen2", "qwen3"):
        extra = {
            **tie,
            "hidden_act": config.hidden_act,
            "rope_theta": theta,
            "dtype": str(getattr(config, "dtype", None) or "float32").removeprefix("torch."),
        }
        if model_type == "qwen3":
            extra.update(attention_bias=bool(config.attention_bias), weight_block_size=None)
    elif model_type in ("gemma", "gemma2"):
        extra = {
            "attention_bias": False,
            "position_embedding_base": theta,
            "hidden_activation": getattr(config, "hidden_activation", None) or config.hidden_act,
        }
        if model_type == "gemma2":
            extra.update(
                attn_logit_softcapping=config.attn_logit_softcapping,
                final_logit_softcapping=config.final_logit_softcapping,
                query_pre_attn_scalar=config.query_pre_attn_scalar,
                sliding_window=config.sliding_window,
                context_window_size=config.sliding_window,
            )  # Gemma2Config.__post_init__
    else:  # phi3
        rope = getattr(config, "rope_parameters", None) or {}
        extra = {
            **tie,
            "model_type": "phi3",
            "max_position_embeddings": context,
            "position_embedding_base": theta,
            "rope_scaling": rope_scaling,
            "original_max_position_embeddings": getattr(config, "original_max_position_embeddings", context),
            "partial_rotary_factor": rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)),
        }
    result = {**common, **extra}
    result["prefill_chunk_size"] = _prefill(result, model_type)
    return result


def runtime_notes(config) -> list[str]:
    """Where mlc-llm's implementation computes differently from transformers' (its own documented choices)."""
    notes = []
    if config.model_type == "gemma2":
        if getattr(config, "attn_logit_softcapping", None):
            notes.append(
                "mlc-llm's gemma2 ignores attn_logit_softcapping (Gemma2Config in mlc_llm/model/gemma2), "
                "so its attention logits are not capped as transformers' are"
            )
        notes.append(
            "mlc-llm's gemma2 runs every layer with a context window of sliding_window "
            f"({config.sliding_window}) instead of alternating sliding and full attention"
        )
    return notes


def _prefill(fields: dict[str, Any], model_type: str) -> int:
    """mlc-llm's default prefill chunk: the smallest of the windows and the arch's cap."""
    windows = [w for w in (fields["context_window_size"], fields.get("sliding_window_size", -1)) if w != -1]
    return min(*windows, PREFILL_CAP.get(model_type, DEFAULT_PREFILL_CAP))


# ------------------------------------------------------------------------------------ tokenizer
def tokenizer_info(tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """mlc-llm's TokenizerInfo as its C++ Tokenizer::DetectTokenizerInfo reads it from tokenizer.json
    (written here: that detector ships only in mlc-llm's compiled library)."""

    def parts(node: Any, key: str) -> list[dict]:
        if not isinstance(node, dict):
            return []
        return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]

    decoders = parts(tokenizer_json.get("decoder"), "decoders")
    normalizers = parts(tokenizer_json.get("normalizer"), "normalizers")
    types = [d.get("type") for d in decoders]
    method = "byte_level" if "ByteLevel" in types and "ByteFallback" not in types else "byte_fallback"
    return {
        "token_postproc_method": method,
        "prepend_space_in_encode": any(
            n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in normalizers
        ),
        "strip_space_in_decode": any(
            d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1 and d.get("stop") == 0
            for d in decoders
        ),
    }


# ------------------------------------------------------------------------------------ conversation
MARK = {"system": "\ue000S\ue000", "user": "\ue000U\ue000", "assistant": "\ue000A\ue000", "user2": "\ue000V\ue000"}


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _between(text: str, start: str, end: str | None) -> str:
    """The text between marker `start` (or the beginning, for "") and marker `end` (or the end)."""
    head = text.index(start) + len(start) if start else 0
    return text[head : text.index(end, head)] if end else text[head:]


def _msg(role: str, mark: str) -> dict[str, str]:
    return {"role": role, "content": MARK[mark]}


def conversation(
    render: Callable[[list[dict]], str],
    history: Callable[[list[dict]], str],
    *,
    name: str,
    bos_token: str | None,
    bos_token_id: int | None,
    stop_words: list[str],
    stop_token_ids: list[int],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mlc-llm conv_template, check) for the pipeline's template.

    render(messages) is the generation prompt the pipeline builds (ending with a user turn),
    history(messages) the same conversation without the generation prompt."""
    user, exchange = [_msg("user", "user")], [_msg("user", "user"), _msg("assistant", "assistant")]
    one = render(user)
    three = render([*exchange, _msg("user", "user2")])
    generation = one[len(history(user)) :]
    before_user = _between(one, "", MARK["user"])
    after_user = _between(one, MARK["user"], None)[: -len(generation) or None]  # the user turn's end
    to_answer = _between(three, MARK["user"], MARK["assistant"])[len(after_user) :]  # header + answer start
    turn_gap = _between(three, MARK["assistant"], MARK["user2"])  # answer end + next user turn's start
    answer_end = _common_prefix(turn_gap, _between(history(exchange), MARK["assistant"], None))
    user_start = turn_gap[len(answer_end) :]
    header = _common_prefix(to_answer, generation)
    conv = {
        "name": name,
        "system_template": before_user.removesuffix(user_start),
        "system_message": "",
        "system_prefix_token_ids": None,
        "add_role_after_system_message": True,
        "roles": {"user": user_start, "assistant": header},
        "role_templates": {
            "user": "{user_message}",
            "assistant": to_answer[len(header) :] + "{assistant_message}",
            "tool": "{tool_message}",
        },
        "messages": [],
        "seps": [after_user, answer_end] if after_user != answer_end else [after_user],
        "role_content_sep": "",
        "role_empty_sep": generation[len(header) :],
        "stop_str": list(stop_words),
        "stop_token_ids": list(stop_token_ids),
        "strip_reasoning_in_history": False,
        "function_string": "",
        "use_function_calling": False,
    }
    system = _system_template(render, before_user, user_start)
    if system is not None:
        conv.update(system)
    _move_bos(conv, bos_token, bos_token_id)
    _share_role_separator(conv)
    return conv, check(conv, render, bos_token)


def _system_template(render, before_user: str, user_start: str) -> dict[str, Any] | None:
    """system_template/system_message/add_role_after_system_message for a template with a default system
    prompt (`before_user`: what precedes the first user message without a system message); None when
    it has none (see README-mlc.txt's note, written by mlc.py) or refuses a system turn."""
    try:
        text = render([_msg("system", "system"), _msg("user", "user")])
    except UserError:
        return None
    head, tail = _between(text, "", MARK["system"]), _between(text, MARK["system"], MARK["user"])
    standalone = tail.endswith(user_start)  # else the system text is folded into the first user turn
    end = tail.removesuffix(user_start) if standalone else tail
    block = before_user.removesuffix(user_start) if standalone else before_user
    if not (block.startswith(head) and block.endswith(end) and len(block) > len(head) + len(end)):
        return None
    return {
        "system_template": head + "{system_message}" + end,
        "add_role_after_system_message": standalone,
        "system_message": block[len(head) : len(block) - len(end)],
    }


def _move_bos(conv: dict[str, Any], bos_token: str | None, bos_token_id: int | None) -> None:
    """A leading bos token becomes system_prefix_token_ids, as mlc-llm's own templates write it."""
    if bos_token and bos_token_id is not None and conv["system_template"].startswith(bos_token):
        conv["system_template"] = conv["system_template"][len(bos_token) :]
        conv["system_prefix_token_ids"] = [bos_token_id]


def _share_role_separator(conv: dict[str, Any]) -> None:
    """Trailing whitespace common to both roles becomes role_content_sep ("<|im_start|>user" + "\\n")."""
    user, assistant = conv["roles"]["user"], conv["roles"]["assistant"]
    n = 0
    while n < min(len(user), len(assistant)) and user[-1 - n] == assistant[-1 - n] and user[-1 - n].isspace():
        n += 1
    if n and n < min(len(user), len(assistant)):
        sep = user[-n:]
        conv["roles"] = {"user": user[:-n], "assistant": assistant[:-n]}
        conv["role_content_sep"], conv["role_empty_sep"] = sep, sep + conv["role_empty_sep"]


def mlc_prompt(conv: dict[str, Any], messages: list[dict[str, str]], bos_token: str = "") -> str:
    """The prompt text mlc-llm builds from `conv` for `messages` (ending with a user turn), with the
    system prefix tokens spelled as `bos_token`: CreatePrompt of cpp/json_ffi/conv_template.cc."""
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    text = conv["system_template"].replace("{system_message}", system or conv["system_message"])
    seps = conv["seps"]
    count = 0
    for message in (m for m in messages if m["role"] != "system"):
        role, count = message["role"], count + 1
        if conv["add_role_after_system_message"] or not text or count != 1:
            text += conv["roles"][role] + conv["role_content_sep"]
        placeholder = "{" + role + "_message}"
        text += conv["role_templates"][role].replace(placeholder, message["content"])
        text += seps[(role == "assistant") % len(seps)]
    text += conv["roles"]["assistant"] + conv["role_empty_sep"]
    return (bos_token if conv["system_prefix_token_ids"] else "") + text


CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ],
)
CHECK_SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def check(conv: dict[str, Any], render: Callable[[list[dict]], str], bos_token: str | None) -> dict[str, Any]:
    """Whether mlc-llm's prompts from `conv` equal the pipeline's for the check conversations (with a
    system message when `conv` renders one), and the first that differs."""
    system = "{system_message}" in conv["system_template"]
    cases = [*CHECK_CONVERSATIONS, CHECK_SYSTEM] if system else list(CHECK_CONVERSATIONS)
    for messages in cases:
        ours, theirs = render(messages), mlc_prompt(conv, messages, bos_token or "")
        if ours != theirs:
            return {
                "matches": False,
                "conversations": len(cases),
                "system_messages": system,
                "differs": {"messages": messages, "pipeline": ours, "mlc": theirs},
            }
    return {"matches": True, "conversations": len(cases), "system_messages": system}


# ------------------------------------------------------------------------------------ the file
def chat_config(
    config,
    model_type: str,
    quantization: str,
    conv: dict[str, Any],
    *,
    tokenizer_files: list[str],
    tokenizer_info: dict[str, Any],
    active_vocab_size: int,
    generation: dict[str, Any],
) -> dict[str, Any]:
    """The content of mlc-chat-config.json (MLCChatConfig's fields, in its order)."""
    fields = model_config(config, model_type)
    sampling = {k: generation.get(k, v) for k, v in SAMPLING_DEFAULTS.items()}
    return {
        "version": CHAT_CONFIG_VERSION,
        "model_type": model_type,
        "quantization": quantization,
        "model_config": fields,
        "vocab_size": fields["vocab_size"],
        "context_window_size": fields["context_window_size"],
        "sliding_window_size": fields.get("sliding_window_size", -1),
        "prefill_chunk_size": fields["prefill_chunk_size"],
        "attention_sink_size": fields.get("attention_sink_size", -1),
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": active_vocab_size,
        **sampling,
        "tokenizer_files": tokenizer_files,
        "tokenizer_info": tokenizer_info,
        "conv_template": conv,
        "pad_token_id": generation.get("pad_token_id"),
        "bos_token_id": generation.get("bos_token_id"),
        "eos_token_id": generation.get("eos_token_id"),
        "model_task": "chat",
        "embedding_metadata": None,
    }


def dump(path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
