"""The tokenizer as GGUF metadata: `tokenizer.ggml.*` and `tokenizer.chat_template`.

    info = write_vocab(writer, model_dir, config, chat_template, log)

Two kinds, as llama.cpp's converter writes them:
- byte-level BPE (tokenizer.json with a BPE model and a ByteLevel decoder): `tokenizer.ggml.model` =
  "gpt2", tokens in id order (ids the tokenizer lacks up to the model's vocab size as [PADi], UNUSED),
  token types (CONTROL for special added tokens, USER_DEFINED for other added ones), merges;
- SentencePiece (a tokenizer.model is present): "llama", pieces with their scores and types.
`tokenizer.ggml.pre` names llama.cpp's pre-tokenizer. llama.cpp's converter picks it by hashing the
tokens of a fixed text against a table of known models; a fine-tuned or bundled tokenizer is in no
such table, so here the name is chosen from what the pre-tokenizer *is* (its regex), see PRE_TOKENIZERS.
Special ids, add_bos/add_eos and merges come from gguf's SpecialVocab; add_bos/add_eos are then set
from what the HF tokenizer actually does, so llama.cpp adds exactly the tokens transformers adds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.errors import UserError

# The split regex of a tokenizer.json `Split` pre-tokenizer → the llama.cpp pre-tokenizer applying
# the same regex (llama-vocab.cpp). A bare `ByteLevel` pre-tokenizer with use_regex applies GPT-2's
# regex ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), which is
# llama.cpp's "gpt-2" (LLAMA_VOCAB_PRE_TYPE_GPT2): that is tunepipe's bundled tokenizer.
GPT2 = "gpt-2"
PRE_TOKENIZERS = {
    # Llama 3 (tiktoken cl100k's regex)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2 / Qwen2.5 / Qwen3 (transformers' tokenization_qwen2.PRETOKENIZE_REGEX)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": GPT2,
}


def write_vocab(writer, model_dir: Path, config: dict[str, Any], chat_template: str | None, log) -> dict[str, Any]:
    import gguf
    import transformers

    n_vocab = config["vocab_size"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        info = _write_sentencepiece(writer, model_dir, tokenizer, n_vocab)
    else:
        info = _write_bpe(writer, model_dir, tokenizer, n_vocab)
    special = gguf.SpecialVocab(model_dir, load_merges=info["model"] == "gpt2", n_vocab=n_vocab)
    special.chat_template = None  # written below, from the pipeline's template
    special.add_special_token.update(adds_special_tokens(tokenizer))
    special.add_to_gguf(writer, quiet=True)
    if info["model"] == "gpt2" and not special.merges:
        raise UserError(
            f"{model_dir}/tokenizer.json: a BPE tokenizer without merges",
            ["llama.cpp needs the BPE merges to tokenize"],
        )
    if chat_template:
        writer.add_chat_template(chat_template)
    else:
        log.warning("no chat template to embed in the GGUF: llama.cpp and Ollama will not know the prompt format")
    if name := llama_cpp_name(tokenizer, config):
        info["llama_cpp_name"] = name
    if special.add_special_token.get("bos"):
        info["added_bos"] = tokenizer.bos_token
    info.update(
        merges=len(special.merges),
        special_token_ids=dict(special.special_token_ids),
        add_special_tokens=dict(special.add_special_token),
        chat_template=bool(chat_template),
    )
    return info


def llama_cpp_name(tokenizer, config: dict[str, Any]) -> str | None:
    """`general.name` when llama.cpp must see one. GGUF has no per-token strip flags: llama.cpp strips
    the whitespace after special tokens (as Phi-3's tokenizer does) only for a model whose name
    contains "phi3", and then requires its </s> <unk> <s> <|endoftext|> tokens. Any other name is left
    out: llama.cpp would match it against such model-family rules."""
    added = tokenizer.added_tokens_decoder.values()
    vocab = tokenizer.get_vocab()
    if (
        config["model_type"] == "phi3"
        and any(t.special and t.rstrip for t in added)
        and all(t in vocab for t in ("</s>", "<unk>", "<s>", "<|endoftext|>"))
    ):
        return "phi3"
    return None


def adds_special_tokens(tokenizer) -> dict[str, bool]:
    """{"bos": …, "eos": …}: whether encoding a text adds the bos first / the eos last."""
    text = "a"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    head = full[: len(full) - len(plain)] if full[-len(plain) :] == plain else []
    tail = full[len(plain) :] if full[: len(plain)] == plain else []
    return {
        "bos": tokenizer.bos_token_id is not None and head[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and tail[-1:] == [tokenizer.eos_token_id],
    }


# --------------------------------------------------------------------------------------- BPE
def _write_bpe(writer, model_dir: Path, tokenizer, n_vocab: int) -> dict[str, Any]:
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise UserError(
            f"{model_dir}: a SentencePiece tokenizer converted to tokenizer.json, without its tokenizer.model",
            [
                (
                    "llama.cpp's SentencePiece vocabulary needs the piece scores only tokenizer.model holds: "
                    "copy the base model's tokenizer.model into this directory"
                )
            ],
        )
    if model.get("type") != "BPE" or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            f"{model_dir}: the tokenizer is neither byte-level BPE nor SentencePiece (tokenizer.model)",
            ["GGUF export writes llama.cpp's gpt2 (byte-level BPE) or llama (SentencePiece) vocabularies"],
        )
    pre = pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"), model_dir)
    tokens, types = bpe_tokens(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens)}


def pre_tokenizer_name(pre_tokenizer: dict | None, model_dir: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (see PRE_TOKENIZERS)."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise UserError(
        f"{model_dir}/tokenizer.json: llama.cpp has no pre-tokenizer known to match {json.dumps(pre_tokenizer)}",
        [
            f"known: a ByteLevel pre-tokenizer (gpt-2) or a Split regex of {', '.join(sorted(set(PRE_TOKENIZERS.values())))}",
            "with another pre-tokenizer llama.cpp would split text differently than the trained tokenizer",
        ],
    )


def bpe_tokens(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings in id order and their types (llama.cpp's converter: get_vocab_base)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise UserError(
            f"the tokenizer has token id {max(by_id)} but the model's vocabulary is {n_vocab}",
            ["resize the model's embeddings to the tokenizer (the train stage does when tokens are added)"],
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


# ----------------------------------------------------------------------------- SentencePiece
def _write_sentencepiece(writer, model_dir: Path, tokenizer, n_vocab: int) -> dict[str, Any]:
    """Pieces, scores and types as llama.cpp's converter writes them (_create_vocab_sentencepiece);
    the tokenizer's added tokens beyond the SentencePiece model's own pieces are CONTROL (special)
    or USER_DEFINED."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UserError(
            f"{model_dir} has a SentencePiece tokenizer.model; reading it needs the sentencepiece package",
            ["pip install sentencepiece"],
        ) from None
    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(model_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for i in range(min(processor.vocab_size(), n_vocab)):
        tokens[i] = processor.IdToPiece(i).encode("utf-8")
        scores[i] = processor.GetScore(i)
        types[i] = _piece_type(processor, i)
    for i, added in tokenizer.added_tokens_decoder.items():
        # tokens added to the model (not its own pieces, like <s>, whose types it knows)
        if i < n_vocab and (i >= processor.vocab_size() or processor.IdToPiece(i) != added.content):
            tokens[i] = added.content.encode("utf-8")
            scores[i] = -1000.0
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    return {"model": "llama", "pre": "default", "tokens": len(tokens)}


def _piece_type(processor, i: int) -> int:
    import gguf

    if processor.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if processor.IsControl(i):
        return gguf.TokenType.CONTROL
    if processor.IsUnused(i):
        return gguf.TokenType.UNUSED
    if processor.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL
