"""FastBPE encodes exactly like the tokenizer it stands in for: the same ids, the same token ends, on
adversarial text for each pre-tokenizer pattern it translates — and declines the tokenizers it cannot."""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tunepipe.runtime import chat_template as ct
from tunepipe.runtime import fast_bpe

QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# A made-up pattern whose \p{Lo} matches nothing in SAFE_CHARS, curly quotes included.
EMPTY_CLASS = r"\p{Lo}[a-z]|\p{L}+|[^\s\p{L}\p{N}]+|\p{N}+|\s+"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im"]  # "<|im": a prefix of two others
# Pieces the random texts are made of: whitespace runs, contractions in both cases, digits runs,
# punctuation runs, a special token inside a word, punctuation outside ASCII (several bytes a
# character), and characters the fast path leaves to the tokenizer (accents, CJK, emoji, a no-break
# space, a vertical tab and a file separator that the two regex engines read differently, a micro
# sign that is a letter, a superscript that is a number).
PIECES = (
    ["Hello", "world", "THE", "caf", "a", "I", "x1", "b2b", "don", "tunepipe", "CamelCase"]
    + [" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "\n  ", "\t\t "]
    + ["'s", "'S", "'ll", "'LL", "'re", "'t", "'", "''"]
    + ["0", "12", "1234567", "3.14", "2026-12-07", "1999", "89"]
    + [".", ",", "!?", "...", "--", "/", "//", "(", ")", "{}", "<", ">", "|", "<|", "|>", "#", "@", "$", "~", '"']
    + SPECIALS
    + ["’", "don’t", "“quoted”", "—", "–", "…", "€5", "×", "©", "«»", "‰", "¿", "·"]  # safe, outside ASCII
    + ["é", "café", "中文", "🙂", "\u00a0", "\x0b", "\x1c", "\u2028", "e\u0301", "µ", "²"]
)


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> str:
    """A small byte-level BPE trained on text like the tests', serialised."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        random_texts(2000, seed=1),
        trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    return tok.to_str()


def tokenizer(trained: str, pattern: str | None, **options) -> Tokenizer:
    """The trained BPE with `pattern` split before ByteLevel (None: ByteLevel's own GPT-2 regex)."""
    tok = Tokenizer.from_str(trained)
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.add_special_tokens(SPECIALS)
    tok.add_tokens(["tunepipe"])  # a non-special added token, matched inside words too
    if "normalizer" in options:
        tok.normalizer = options["normalizer"]
    if "post_processor" in options:
        tok.post_processor = options["post_processor"]
    return tok


def assert_same(tok: Tokenizer, texts: list[str]) -> None:
    """FastBPE's tokens of the texts it takes are the tokenizer's; it takes exactly those whose
    characters, added tokens aside, are all in SAFE_CHARS."""
    fast = fast_bpe.FastBPE.of(tok)
    assert fast is not None
    taken = [t for t in texts if fast.takes(t)]
    for text in texts:
        bare = text
        for special in sorted(SPECIALS + ["tunepipe"], key=len, reverse=True):
            bare = bare.replace(special, "")
        assert fast.takes(text) == all(c in fast_bpe.SAFE_CHARS for c in bare), repr(text)
    got = fast.encode(taken)
    ref = tok.encode_batch(taken, add_special_tokens=False)
    assert got.lengths.tolist() == [len(e) for e in ref]
    assert got.ids.tolist() == [i for e in ref for i in e.ids]
    # the same token boundaries: each token's end in characters of the texts back to back
    base = np.cumsum([0] + [len(t) for t in taken])
    assert got.ends.tolist() == [b + end for e, b in zip(ref, base) for _, end in e.offsets]
    assert fast.table.entries == len(fast.index)


@pytest.mark.parametrize(
    "pattern", [None, QWEN2, LLAMA3, O200K, EMPTY_CLASS], ids=["gpt2", "qwen2", "llama3", "o200k", "empty-class"]
)
def test_same_ids_and_boundaries_as_the_tokenizer(trained, pattern):
    tok = tokenizer(trained, pattern)
    texts = random_texts(400, seed=7)
    assert_same(tok, texts[:200])  # new words
    assert_same(tok, texts)  # known words, from the same FastBPE's tables too
    assert_same(tok, ["", "<|im_start|>", "<|im", "tunepipetunepipe", " \n\n ", "é"])


def test_a_full_table_starts_over_and_stays_exact(trained, monkeypatch):
    """Past MAX_WORDS distinct words the table starts again from the added tokens; its arrays grow
    past their first capacity on the way. The ids stay the tokenizer's throughout."""
    monkeypatch.setattr(fast_bpe, "MAX_WORDS", 300)
    starts = []
    start_over = fast_bpe.FastBPE._start_over
    monkeypatch.setattr(fast_bpe.FastBPE, "_start_over", lambda self: (starts.append(1), start_over(self))[1])
    tok = tokenizer(trained, QWEN2)
    fast = fast_bpe.FastBPE.of(tok)
    texts = [t for t in random_texts(6000, seed=13) if fast.takes(t)][:900]
    capacity = []
    rng = random.Random(2)
    words = [" " + "".join(rng.choice("abcdefghij") for _ in range(7)) for _ in range(3000)]  # ~3000 distinct
    for batch in (texts[:300], texts[300:600], ["".join(words)], texts[600:], texts[:300], []):
        got = fast.encode(batch)
        assert got.ids.tolist() == [i for e in tok.encode_batch(batch, add_special_tokens=False) for i in e.ids]
        capacity.append(len(fast.table.ids))
    assert len(starts) >= 3  # the first build, then at least two starts over
    assert max(capacity) > 1 << 12  # grown


def test_an_nfc_normalizer_changes_nothing_taken(trained):
    """Text not in NFC (e + combining accent) is not taken: it goes to the tokenizer, normalizer and all."""
    tok = tokenizer(trained, QWEN2, normalizer=normalizers.NFC())
    assert_same(tok, random_texts(200, seed=3) + ["cafe ok", "“quoted” – fine…"])
    assert not fast_bpe.FastBPE.of(tok).takes("cafe\u0301 ok")


def test_an_added_token_outside_safe_chars_does_not_keep_a_text_from_the_fast_path(trained):
    tok = tokenizer(trained, QWEN2)
    tok.add_special_tokens(["<｜begin▁of▁sentence｜>"])
    fast = fast_bpe.FastBPE.of(tok)
    text = "<｜begin▁of▁sentence｜>Hello world<|im_end|>"
    assert fast.takes(text) and not fast.takes(text + "é")
    assert fast.encode([text]).ids.tolist() == tok.encode(text, add_special_tokens=False).ids


def test_fast_path_labels_equal_the_tokenizer_path(trained, monkeypatch):
    """ct.encode's ids, labels and truncation are the same through FastBPE and through the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_ = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer(trained, QWEN2), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    renderer, _ = ct.resolve({"template": "qwen"}, tokenizer_, None)
    rng = random.Random(5)
    texts = random_texts(300, seed=11)
    records = [
        {"messages": [{"role": r, "content": rng.choice(texts)} for r in ("user", "assistant") * rng.randint(1, 3)]}
        for _ in range(60)
    ]
    fast = ct.encode(tokenizer_, renderer, records, cutoff_len=160, batch_size=16)
    taken = [
        fast_bpe.FastBPE.of(tokenizer_.backend_tokenizer).takes(m["content"]) for r in records for m in r["messages"]
    ]
    assert any(taken) and not all(taken)  # batches of both kinds of text, put back in order
    monkeypatch.setattr(fast_bpe.FastBPE, "of", classmethod(lambda cls, backend: None))
    slow = ct.encode(tokenizer_, renderer, records, cutoff_len=160, batch_size=16)
    assert fast.truncated.any() and not fast.truncated.all()
    for name in ("input_ids", "labels", "offsets", "truncated"):
        assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
    pt = ct.encode_texts(tokenizer_, texts[:50], batch_size=16)
    assert [a.tolist() for a in pt] == tokenizer_(texts[:50], add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------- declining
def config_of(tok: Tokenizer) -> dict:
    return json.loads(tok.to_str())


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda c: c["model"].update(dropout=0.1), "dropout"),
        (
            lambda c: c.update(
                truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
            ),
            "truncation",
        ),
        (lambda c: c.update(normalizer={"type": "Lowercase"}), "normalizer Lowercase"),
        (lambda c: c.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
        (lambda c: c["pre_tokenizer"]["pretokenizers"][0].update(behavior="MergedWithPrevious"), "pre-tokenizer"),
        (lambda c: c["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "pre-tokenizer"),
        (
            lambda c: c.update(
                post_processor={
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                }
            ),
            "trims offsets",
        ),
        (lambda c: c["added_tokens"][0].update(lstrip=True), "strips"),
        (lambda c: c["added_tokens"][0].update(single_word=True), "whole words"),
    ],
)
def test_ineligible_tokenizers_are_declined_with_a_reason(trained, change, reason):
    config = config_of(tokenizer(trained, QWEN2))
    assert fast_bpe.ineligible(config) is None
    change(config)
    assert reason in fast_bpe.ineligible(config)
    assert fast_bpe.FastBPE.of(Tokenizer.from_str(json.dumps(config))) is None


def test_a_model_other_than_bpe_is_declined():
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert "not a BPE model" in fast_bpe.ineligible(config_of(tok))
    assert fast_bpe.FastBPE.of(tok) is None


def test_split_special_tokens_is_declined(trained):
    tok = tokenizer(trained, QWEN2)
    tok.encode_special_tokens = True
    assert fast_bpe.FastBPE.of(tok) is None


def test_the_safe_characters_outside_ascii_are_no_letter_number_mark_or_space_to_oniguruma():
    """What the translated regexes rely on, asked of the tokenizer's own regex engine."""
    for category in (r"\p{L}", r"\p{N}", r"\p{M}", r"\s"):
        split = pre_tokenizers.Split(Regex(category), behavior="removed")
        kept = "".join(piece for piece, _ in split.pre_tokenize_str(fast_bpe.OTHER_CHARS))
        assert kept == fast_bpe.OTHER_CHARS, category
    assert all(unicodedata.is_normalized("NFC", c) for c in fast_bpe.OTHER_CHARS)  # an NFC normalizer keeps them
    assert len(fast_bpe.OTHER_CHARS) > 100 and "’" in fast_bpe.OTHER_CHARS and "µ" not in fast_bpe.OTHER_CHARS


@pytest.mark.parametrize(
    "pattern, python",
    [
        (r"\p{L}+|[^\s\p{L}\p{N}]+", r"[A-Za-z]+|[^\sA-Za-z0-9]+"),
        (r"[\p{Lo}]|[^\p{M}]|\p{Lt}", r"[\x00]|[^\x00]|[\x00]"),  # empty on SAFE_CHARS, and its complement
        (r"(a)(?:b)(?i:'s)\.", r"(?:a)(?:b)(?i:'s)\."),
    ],
)
def test_translate(pattern, python):
    assert fast_bpe.translate(pattern) == python


@pytest.mark.parametrize(
    "pattern", [r"\p{Han}", r"^\s+", r"a$", r"[a[b]]", r"[a&&b]", r"(?<x>a)", r"\bword", r"[]a]", r"\p{L"]
)
def test_translate_declines_what_it_does_not_know(pattern):
    assert fast_bpe.translate(pattern) is None
