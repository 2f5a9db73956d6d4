"""A fast, exact encoder for byte-level BPE tokenizers (GPT-2, Qwen2, Llama 3 …) on (mostly) ASCII text.

HF tokenizers' `encode_batch` spends about three quarters of its time on bookkeeping: per-character
alignments of every normalized string, a `String` per token, offsets (measured with `perf`: malloc,
memmove and hashing lead; the BPE merges and the regex are a fifth). This module computes the same ids
by doing what the tokenizer does, in the same order, with the costly part done once per distinct word:

1. split the text at the added tokens, leftmost-longest, first those matched on the raw text, then
   (in what is left) those matched on the normalized text — what tokenizers' `AddedVocabulary` does
   (the normalizer is none or NFC, which leaves ASCII as it is); the pieces between added tokens
   are normalized and pre-tokenized independently;
2. split each piece with the pre-tokenizer's regex, `Isolated` (matches and the gaps between them),
   the regex translated from Oniguruma to Python's `re` *for SAFE_CHARS text* (ASCII and common
   punctuation), where the two read it alike (`\\p{L}` is `A-Za-z`, `\\s` is space, tab, CR, LF …;
   anything the translation does not know makes the tokenizer ineligible);
3. BPE each distinct word once with the tokenizer's own model (`backend.model.tokenize`), after the
   ByteLevel byte-to-character map (read from the tokenizer's ByteLevel pre-tokenizer itself), and
   gather the words' tokens by index.

It takes the texts whose characters (added tokens aside) are all in SAFE_CHARS (`takes`); callers
give the others to the tokenizer itself, whole. `FastBPE.of(backend)` is None unless the tokenizer's
pipeline is one this reproduces (`ineligible` says why). tests/test_fast_bpe.py holds the ids and the
token boundaries to the tokenizer's own on adversarial text, for the GPT-2, Qwen2, Llama 3 and o200k
patterns.

Written here because no well-kept library encodes exactly like HF's BPE but faster: tiktoken merges by
token rank, which differs from a tokenizer's merges list in general (a token can be reachable by a
merge the list does not hold).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import unicodedata
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import numpy as np

# The characters on which Oniguruma's and Python's readings of the pre-tokenizer regex are the same:
# printable ASCII, tab, LF, CR, and the punctuation and symbols of Latin-1 and of the General
# Punctuation and Currency blocks (curly quotes, dashes, ellipsis, €, ×, ©, …), which no pattern
# counts as a letter, number, mark or space (categories fixed since Unicode 1.1–6.0; not one changes
# under NFC).
ASCII_CHARS = "\t\n\r" + "".join(map(chr, range(0x20, 0x7F)))
OTHER_CHARS = "".join(
    c
    for lo, hi in ((0xA1, 0xBF), (0xD7, 0xD7), (0xF7, 0xF7), (0x2010, 0x2027), (0x2030, 0x205E), (0x20A0, 0x20C0))
    for c in map(chr, range(lo, hi + 1))
    if unicodedata.category(c)[0] in "PS"
)
SAFE_CHARS = ASCII_CHARS + OTHER_CHARS
UNSAFE = re.compile("[^\t\n\r\x20-\x7e" + "".join(map(re.escape, OTHER_CHARS)) + "]")

# tokenizers' ByteLevel pre-tokenizer with use_regex (pre_tokenizers/byte_level.rs).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# What `\p{X}` matches in SAFE_CHARS: ASCII letters and digits (none of OTHER_CHARS is in a category here).
ASCII_CATEGORIES = {
    "L": "A-Za-z",
    "Lu": "A-Z",
    "Ll": "a-z",
    "Lt": "",
    "Lm": "",
    "Lo": "",
    "M": "",
    "Mn": "",
    "Mc": "",
    "Me": "",
    "N": "0-9",
    "Nd": "0-9",
    "Nl": "",
    "No": "",
}
LETTER_ESCAPES = set("sSdDwWrnt")  # same meaning in both engines on SAFE_CHARS (Python's under re.ASCII)
GROUP_OPENERS = ("(?:", "(?i:", "(?!", "(?=", "(?>")
# An empty class and its complement on SAFE_CHARS text, which never holds a NUL.
NOTHING, ANYTHING = r"[\x00]", r"[^\x00]"


def translate(pattern: str) -> str | None:
    """The Oniguruma `pattern` as a Python regex (for re.ASCII) that splits SAFE_CHARS text alike,
    capturing groups made non-capturing; None when it uses anything this does not translate."""
    out: list[str] = []
    in_class: list[str] | None = None  # the items of the class being read
    negated = False
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern):
                return None
            nxt = pattern[i + 1]
            if nxt == "p":
                m = re.match(r"\\p\{(\w+)\}", pattern[i:])
                if not m or m.group(1) not in ASCII_CATEGORIES:
                    return None
                chars, i = ASCII_CATEGORIES[m.group(1)], i + m.end()
                if in_class is not None:
                    in_class.append(chars)
                else:
                    out.append(f"[{chars}]" if chars else NOTHING)
                continue
            if nxt.isalnum() and nxt not in LETTER_ESCAPES:
                return None
            (in_class if in_class is not None else out).append(pattern[i : i + 2])
            i += 2
            continue
        if in_class is not None:
            if c == "[" or pattern.startswith("&&", i):
                return None  # nested classes and intersections: Oniguruma only
            if c == "]":
                items = "".join(in_class)
                out.append(f"[{'^' if negated else ''}{items}]" if items else (ANYTHING if negated else NOTHING))
                in_class = None
            else:
                in_class.append(c)
            i += 1
            continue
        if c == "[":
            negated = pattern.startswith("[^", i)
            i += 2 if negated else 1
            if i < len(pattern) and pattern[i] == "]":
                return None  # a leading ']' is literal in one engine, an error in the other
            in_class = []
            continue
        if c in "^$":
            return None  # line anchors: Oniguruma's match at every line
        if c == "(":
            opener = next((g for g in GROUP_OPENERS if pattern.startswith(g, i)), None)
            if opener is None and pattern.startswith("(?", i):
                return None
            out.append(opener or "(?:")
            i += len(opener or "(")
            continue
        out.append(c)
        i += 1
    if in_class is not None:
        return None
    try:
        re.compile("".join(out), re.ASCII)
    except re.error:  # e.g. possessive quantifiers before Python 3.11
        return None
    return "".join(out)


# ------------------------------------------------------------------------------- eligibility
def ineligible(config: dict[str, Any], encode_special_tokens: bool = False) -> str | None:
    """Why the tokenizer described by `config` (its tokenizer.json) is not one FastBPE reproduces;
    None when it is."""
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return "not a BPE model without dropout"
    if config.get("truncation") or config.get("padding"):
        return "truncation or padding set on the tokenizer"
    if encode_special_tokens:
        return "split_special_tokens is set"
    normalizer = config.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":  # NFC leaves ASCII as it is
        return f"normalizer {normalizer.get('type')}"
    if _pattern(config.get("pre_tokenizer")) is None:
        return "pre-tokenizer is not a regex split followed by ByteLevel"
    if not _keeps_offsets(config.get("post_processor")):
        return "post-processor trims offsets"
    for token in config.get("added_tokens") or []:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} strips spaces or matches whole words only"
    return None


def _pattern(pre: dict[str, Any] | None) -> str | None:
    """The Oniguruma pattern of a byte-level pre-tokenizer: ByteLevel(use_regex) alone, or one
    Isolated regex Split followed by ByteLevel without a regex; neither adding a prefix space."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers") or []) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in (split.get("pattern") or {})
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    return split["pattern"]["Regex"]


def _keeps_offsets(post: dict[str, Any] | None) -> bool:
    """True when the post-processor leaves the tokens' offsets as the pre-tokenizer made them (the
    token boundaries compare with char offsets); with add_special_tokens=False none adds tokens."""
    if post is None:
        return True
    kind = post.get("type")
    if kind == "Sequence":
        return all(_keeps_offsets(p) for p in post.get("processors") or [])
    if kind in ("ByteLevel", "RobertaProcessing"):
        return not post.get("trim_offsets", True)
    return kind in ("TemplateProcessing", "BertProcessing")


# ------------------------------------------------------------------------------- encoding
@dataclass
class Tokens:
    """Texts' tokens back to back: `ids`, `ends` (each token's end, in characters of the texts back to
    back; a token belongs to the text and segment holding its last character), tokens per text."""

    ids: np.ndarray  # int32
    ends: np.ndarray  # int64
    lengths: np.ndarray  # int64, one per text


MAX_WORDS = 1 << 20  # distinct words a FastBPE keeps (~100 MB); past it, it starts again from the added tokens


class _Table:
    """Entries (words) and their tokens in numpy arrays that grow by doubling: entry k's tokens are
    ids[starts[k]:starts[k + 1]], each with its end in characters of the word; lengths[k] is the word's."""

    def __init__(self) -> None:
        self.ids, self.ends = np.zeros(1 << 12, np.int32), np.zeros(1 << 12, np.int64)
        self.starts, self.lengths = np.zeros((1 << 10) + 1, np.int64), np.zeros(1 << 10, np.int64)
        self.tokens = self.entries = 0

    def append(self, ids: list[int], ends: list[int], counts: list[int], lengths: list[int]) -> None:
        tokens, entries = self.tokens + len(ids), self.entries + len(counts)
        self.ids, self.ends = _fit(self.ids, tokens), _fit(self.ends, tokens)
        self.starts, self.lengths = _fit(self.starts, entries + 1), _fit(self.lengths, entries)
        self.ids[self.tokens : tokens] = ids
        self.ends[self.tokens : tokens] = ends
        self.starts[self.entries + 1 : entries + 1] = self.tokens + np.cumsum(counts, dtype=np.int64)
        self.lengths[self.entries : entries] = lengths
        self.tokens, self.entries = tokens, entries

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.ids[: self.tokens],
            self.ends[: self.tokens],
            self.starts[: self.entries + 1],
            self.lengths[: self.entries],
        )


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    """`array`, or a copy twice as long (or `size` long) when it holds fewer than `size` items."""
    if len(array) >= size:
        return array
    grown = np.zeros(max(size, 2 * len(array)), array.dtype)
    grown[: len(array)] = array
    return grown


class FastBPE:
    """Encodes like `backend.encode_batch(texts, add_special_tokens=False)`; see the module docstring.
    Each distinct word is an entry of a table that grows as new words come and serves every later call."""

    def __init__(self, backend, pattern: str, added: list[dict[str, Any]], to_bytes: dict[int, str]):
        self.model = backend.model
        self.split_words = re.compile(f"({pattern})", re.ASCII)  # one group: re.split keeps the matches
        self.split_raw = _alternation([t["content"] for t in added if t["content"] and not t.get("normalized")])
        self.split_normalized = _alternation([t["content"] for t in added if t["content"] and t.get("normalized")])
        self.to_bytes = to_bytes  # str.translate table: SAFE_CHARS → ByteLevel's characters
        self.added = {t["content"]: t["id"] for t in added if t["content"]}
        # added tokens written with characters outside SAFE_CHARS (DeepSeek's "<｜…｜>") do not make a text unsafe
        self.strip_added = _alternation([c for c in self.added if UNSAFE.search(c)])
        self._start_over()

    @classmethod
    def of(cls, backend) -> FastBPE | None:
        """The fast encoder for `backend` (a `tokenizers.Tokenizer`), or None when it is ineligible."""
        config = json.loads(backend.to_str())
        if ineligible(config, bool(getattr(backend, "encode_special_tokens", False))) is not None:
            return None
        pattern = translate(_pattern(config["pre_tokenizer"]))
        byte_map = _byte_map()
        vocab = backend.get_vocab(with_added_tokens=False)
        if pattern is None or any(ch not in vocab for ch in set("".join(byte_map.values()))):
            return None  # a byte character outside the vocabulary: BPE would drop it
        return cls(backend, pattern, config.get("added_tokens") or [], str.maketrans(byte_map))

    def _start_over(self) -> None:
        self.index: dict[str, int] = {}  # word → its entry in the table
        self.table = _Table()
        self._append(list(self.added), [[i] for i in self.added.values()], [[len(t)] for t in self.added])

    def takes(self, text: str) -> bool:
        """Whether `text` is one to encode here: its characters, added tokens aside, all in SAFE_CHARS."""
        return UNSAFE.search(self.strip_added.sub("", text) if self.strip_added else text) is None

    def encode(self, texts: list[str]) -> Tokens:
        """The texts' tokens; every text one this `takes`."""
        if len(self.index) > MAX_WORDS:
            self._start_over()
        words: list[str] = []  # the texts' words back to back: added tokens and regex splits
        per_text = [self._split(text, words) for text in texts]
        entry = np.fromiter(map(self.index.get, words, itertools.repeat(-1)), np.int64, count=len(words))
        missing = np.flatnonzero(entry < 0)
        if len(missing):
            new = list(dict.fromkeys(map(words.__getitem__, missing)))
            tokens = [self.model.tokenize(w.translate(self.to_bytes)) for w in new]
            self._append(new, [[t.id for t in ts] for ts in tokens], [_char_ends(w, ts) for w, ts in zip(new, tokens)])
            entry[missing] = np.fromiter(
                map(self.index.__getitem__, map(words.__getitem__, missing)), np.int64, len(missing)
            )
        ids, ends, starts, lengths = self.table.view()
        counts = starts[entry + 1] - starts[entry]  # tokens per word
        take = ranges(starts[entry], counts)
        word_len = lengths[entry]
        token_cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Tokens(
            ids=ids[take],
            ends=np.repeat(np.cumsum(word_len) - word_len, counts) + ends[take],
            lengths=np.diff(token_cum[np.concatenate([[0], np.cumsum(per_text, dtype=np.int64)])]),
        )

    def _split(self, text: str, words: list[str]) -> int:
        """Appends the text's words to `words`; returns how many."""
        before = len(words)
        for k, part in enumerate(self.split_raw.split(text) if self.split_raw else [text]):
            if k % 2:  # an added token
                words.append(part)
            elif self.split_normalized:
                for j, piece in enumerate(self.split_normalized.split(part)):
                    if j % 2:
                        words.append(piece)
                    else:
                        words += filter(None, self.split_words.split(piece))
            else:
                words += filter(None, self.split_words.split(part))
        return len(words) - before

    def _append(self, words: list[str], ids: list[list[int]], ends: list[list[int]]) -> None:
        self.index.update(zip(words, range(self.table.entries, self.table.entries + len(words))))
        self.table.append(
            [i for x in ids for i in x], [e for x in ends for e in x], [len(x) for x in ids], [len(w) for w in words]
        )


def _alternation(contents: list[str]) -> re.Pattern | None:
    """A regex splitting at these strings, leftmost-longest, keeping them (one group); None if none."""
    by_length = sorted(contents, key=len, reverse=True)  # at one position the longest matches first
    return re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if contents else None


@functools.cache
def _byte_map() -> dict[str, str]:
    """SAFE_CHARS → the characters tokenizers' ByteLevel maps their UTF-8 bytes to, asked of ByteLevel."""
    from tokenizers import pre_tokenizers

    [(mapped, _)] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(SAFE_CHARS)
    ends = list(itertools.accumulate(len(c.encode()) for c in SAFE_CHARS))
    assert len(mapped) == ends[-1]  # one character per byte
    return {c: mapped[end - len(c.encode()) : end] for c, end in zip(SAFE_CHARS, ends)}


def _char_ends(word: str, tokens) -> list[int]:
    """Each token's end in characters of `word`, from the tokens' lengths in bytes: a token ending
    inside a character's bytes ends with that character (as tokenizers' char offsets have it)."""
    byte_ends = list(itertools.accumulate(len(t.value) for t in tokens))
    if word.isascii():
        return byte_ends
    char_ends = list(itertools.accumulate(len(c.encode()) for c in word))
    return [bisect_left(char_ends, end) + 1 for end in byte_ends]


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions `starts[k], …, starts[k] + lengths[k] - 1` for each k, back to back."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(ends - lengths - starts, lengths)
