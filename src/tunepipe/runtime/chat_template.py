"""Chat templates: render conversations to text, tokenize them in batches, mask everything but answers.

Two kinds of renderer share one interface, `segments(messages, tools) -> [(text, trained)]`:
- `SlotRenderer`: a template from templates.yaml (or a YAML `template_file`) — slots filled per turn;
- `JinjaRenderer`: a Jinja chat template (`template: auto` = the tokenizer's own, or a `.jinja`
  `template_file` rendered in a sandbox); answer spans are found by rendering conversation prefixes.

`encode(...)` then renders a batch of conversations, tokenizes the whole strings in one call to the
tokenizer (so the ids equal `apply_chat_template`'s: BPE merges see the same text), and labels a token
as trained when its last character lies in an answer segment (character offsets from the tokenizer).
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunepipe.errors import UserError
from tunepipe.runtime import fast_bpe, template_registry

IGNORE = -100
Segments = list[tuple[str, bool]]


# ----------------------------------------------------------------------------- slot templates
@dataclass
class SlotRenderer:
    slots: dict[str, Any]  # every key of template_registry.SLOTS, bos/eos already substituted

    @classmethod
    def build(cls, entry: dict[str, Any], bos: str, eos: str, default_system: str | None) -> SlotRenderer:
        slots = {k: entry.get(k, v) for k, v in template_registry.SLOTS.items()}
        for key, value in slots.items():
            if isinstance(value, str):
                slots[key] = value.replace("{{bos_token}}", bos).replace("{{eos_token}}", eos)
        if default_system is not None:
            slots["default_system"] = default_system
        slots["stop_words"] = [w.replace("{{eos_token}}", eos) for w in slots["stop_words"]]
        return cls(slots)

    def _system(self, messages: list[dict], tools: str | None) -> tuple[str, list[dict]]:
        s = self.slots
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        system = system or s["default_system"]
        if s["strip_content"]:
            system = system.strip()
        tools_text = render_tools(s["tools"], tools)
        if tools_text:
            system = f"{system}\n\n{tools_text}" if system else tools_text
        return system, messages

    def segments(self, messages: list[dict], tools: str | None = None) -> Segments:
        s = self.slots
        system, turns = self._system(messages, tools)
        system_block = s["system"].replace("{{content}}", system) if system else ""
        source = s["prefix"] + ("" if s["system_in_user"] else system_block)
        fold_system = bool(s["system_in_user"] and system_block)
        out: Segments = []
        last = len(turns) - 1
        for i, message in enumerate(turns):
            role, content = message["role"], message["content"]
            if s["strip_content"]:
                content = content.strip()
            if role == "user":
                if fold_system:
                    content, fold_system = system_block + content, False
                source += s["user"].replace("{{content}}", content)
            elif role == "tool":
                source += (s["observation"] or s["user"]).replace("{{content}}", content)
            elif role in ("assistant", "function"):
                source += s["assistant_header"] + (s["last_assistant_prefix"] if i == last else "")
                out.append((source, False))
                source = ""
                if role == "function":
                    calls = "\n".join(s["tool_call"].replace("{{content}}", c) for c in tool_calls(content))
                    answer = (s["function"] or s["assistant"]).replace("{{content}}", calls)
                else:
                    answer = s["assistant"].replace("{{content}}", content)
                out.append((answer + (s["suffix"] if i == last else ""), True))
            else:
                raise UserError(f"message role {role!r} is not one of system, user, assistant, function, tool")
        if source:
            out.append((source, False))
        return self._train_opening_stop_words(out)

    def _train_opening_stop_words(self, segments: Segments) -> Segments:
        """When the turn right after an answer opens with a stop word (chatglm3's `<|user|>`, cpm's
        `<用户>`), that token is what the model must emit to end the answer: it is trained with the
        answer, as ChatGLM3's own fine-tuning code does. The text is unchanged; only the label moves."""
        words = sorted((w for w in self.slots["stop_words"] if w), key=len, reverse=True)
        out = list(segments)
        for i in range(1, len(out)):
            (answer, after_answer), (text, trained) = out[i - 1], out[i]
            word = next((w for w in words if text.startswith(w)), None) if after_answer and not trained else None
            if word is not None:
                out[i - 1], out[i] = (answer + word, True), (text[len(word) :], False)
        return out

    def prompt(self, messages: list[dict], tools: str | None = None) -> str:
        """The text that asks the model for the next answer (inference)."""
        text = "".join(t for t, _ in self.segments(messages, tools))
        return text + self.slots["assistant_header"] + self.slots["last_assistant_prefix"]

    def to_jinja(self) -> str:
        """An equivalent Jinja chat template, saved with the tokenizer so exports and `apply_chat_template`
        prompt the trained model the way it was trained (tool turns are not included)."""
        s = self.slots
        q = lambda v: json.dumps(v, ensure_ascii=False)  # a Jinja string literal
        sys_before, _, sys_after = s["system"].partition("{{content}}")
        user_before, _, user_after = s["user"].partition("{{content}}")
        asst_before, _, asst_after = s["assistant"].partition("{{content}}")
        content = "message['content'] | trim" if s["strip_content"] else "message['content']"
        system = "messages[0]['content'] | trim" if s["strip_content"] else "messages[0]['content']"
        standalone = (
            ""
            if s["system_in_user"]
            else ("{%- if ns.system %}{{ " + q(sys_before) + " + ns.system + " + q(sys_after) + " }}{% endif %}")
        )
        fold = (
            (
                "{%- if loop.first and ns.system %}{% set content = "
                + q(sys_before)
                + " + ns.system + "
                + q(sys_after)
                + " + content %}{% endif %}"
            )
            if s["system_in_user"]
            else ""
        )
        return (
            "{%- set ns = namespace(system=" + q(s["default_system"]) + ") %}"
            "{%- if messages and messages[0]['role'] == 'system' %}"
            "{%- set ns.system = " + system + " %}{%- set loop_messages = messages[1:] %}"
            "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- "
            + q(s["prefix"])
            + " }}"
            + standalone
            + "{%- for message in loop_messages %}{%- set content = "
            + content
            + " %}"
            "{%- if message['role'] == 'user' %}"
            + fold
            + "{{- "
            + q(user_before)
            + " + content + "
            + q(user_after)
            + " }}"
            "{%- elif message['role'] == 'assistant' %}{{- " + q(s["assistant_header"]) + " }}"
            "{%- if loop.last %}{{- " + q(s["last_assistant_prefix"]) + " }}{% endif %}"
            "{{- " + q(asst_before) + " + content + " + q(asst_after) + " }}"
            "{%- if loop.last %}{{- " + q(s["suffix"]) + " }}{% endif %}"
            "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- "
            + q(s["assistant_header"] + s["last_assistant_prefix"])
            + " }}{% endif %}"
        )


def render_tools(slot: str, tools: str | None) -> str:
    """The tools block: each tool as one JSON line (OpenAI's {"type": "function", "function": …} shape)."""
    if not tools:
        return ""
    try:
        parsed = json.loads(tools)
    except ValueError:
        return slot.replace("{{tools}}", "\n" + tools)
    items = parsed if isinstance(parsed, list) else [parsed]
    wrapped = [
        t if isinstance(t, dict) and t.get("type") == "function" else {"type": "function", "function": t} for t in items
    ]
    return slot.replace("{{tools}}", "".join("\n" + json.dumps(t, ensure_ascii=False) for t in wrapped))


def tool_calls(content: str) -> list[str]:
    """A function turn's content (one call or a list, as JSON) → one canonical JSON text per call."""
    try:
        parsed = json.loads(content)
    except ValueError:
        return [content]
    calls = parsed if isinstance(parsed, list) else [parsed]
    out = []
    for call in calls:
        if not isinstance(call, dict) or "name" not in call:
            return [content]
        args = call.get("arguments", {})
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append('{"name": ' + json.dumps(call["name"], ensure_ascii=False) + ', "arguments": ' + args + "}")
    return out


# ---------------------------------------------------------------------------- jinja templates
# The sandbox lives with the registry (light), so that validation compiles templates the same way.
sandbox_env = template_registry.sandbox_env


def compile_jinja(source: str, where: str):
    import jinja2

    try:
        return sandbox_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}:{e.lineno}: Jinja syntax error: {e.message}") from None


def run_jinja(template, where: str, **context) -> str:
    """Render a template compiled by `compile_jinja` within the sandbox's limits; whatever goes wrong
    in it (a limit, Python internals, raise_exception, an error in its own expressions) is a template
    error naming `where`."""
    import jinja2

    try:
        return template_registry.render(template, **context)
    except UserError as e:  # raise_exception() in the template
        raise UserError(f"{where}: {e.message}", e.details) from None
    except jinja2.TemplateError as e:
        violation = template_registry.sandbox_violation(e, where)
        raise violation or UserError(f"{where}: template error: {e}") from None
    except Exception as e:  # noqa: BLE001 - the template's own code failed: its error, not tunepipe's
        violation = template_registry.sandbox_violation(e, where)
        raise violation or UserError(f"{where}: template error: {type(e).__name__}: {e}") from None


def hf_messages(messages: list[dict]) -> list[dict]:
    """Artifact messages → the shape HF chat templates expect (a function turn becomes tool_calls)."""
    out = []
    for m in messages:
        if m["role"] == "function":
            calls = [json.loads(c) for c in tool_calls(m["content"]) if c.startswith("{")]
            out.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                        for c in calls
                    ],
                }
            )
        else:
            out.append(dict(m))
    return out


@dataclass
class JinjaRenderer:
    render: Callable[[list[dict], Any, bool], str]  # (hf messages, tools list, add_generation_prompt) → text
    where: str

    def _render(self, messages, tools, gen):
        return self.render(hf_messages(messages), _tools_list(tools), gen)

    def segments(self, messages: list[dict], tools: str | None = None) -> Segments:
        full = self._render(messages, tools, False)
        out: Segments = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] not in ("assistant", "function"):
                continue
            head = self._render(messages[:i], tools, True)
            if not full.startswith(head) or len(head) < cursor:
                raise UserError(
                    f"{self.where}: cannot locate answer {i} — rendering the conversation up to it "
                    "is not a prefix of the whole conversation",
                    ["use a registry template (tunepipe templates) or a YAML template_file"],
                )
            start, end = len(head), self._answer_end(full, messages, i, tools, len(head))
            out += [(full[cursor:start], False), (full[start:end], True)]
            cursor = end
        if cursor < len(full):
            out.append((full[cursor:], False))
        return [(t, trained) for t, trained in out if t]

    def _answer_end(self, full: str, messages, i: int, tools, start: int) -> int:
        upto = self._render(messages[: i + 1], tools, False)
        if full.startswith(upto):
            return len(upto)
        # The template writes turns differently once later turns follow (e.g. qwen3 drops the think
        # block of earlier answers): end after the answer text and what closes it in both renderings.
        common = _common_prefix(full[start:], upto[start:])
        content = messages[i]["content"].strip()
        k = full.find(content, start) if content else -1
        if k < 0 or k + len(content) <= start + common:
            return start + common
        closing = upto[upto.rfind(content) + len(content) :]
        return k + len(content) + _common_prefix(full[k + len(content) :], closing)

    def prompt(self, messages: list[dict], tools: str | None = None) -> str:
        return self._render(messages, tools, True)


def _tools_list(tools: str | None):
    if not tools:
        return None
    try:
        parsed = json.loads(tools)
    except ValueError:
        return None
    return parsed if isinstance(parsed, list) else [parsed]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenizer_jinja(tokenizer) -> JinjaRenderer:
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise UserError(
            f"template: auto needs a tokenizer with a chat_template; {tokenizer.name_or_path} has none",
            ["set template: to one of `tunepipe templates`, or give a template_file"],
        )

    where = f"chat_template of {tokenizer.name_or_path}"

    def render(messages, tools, gen):
        # transformers renders the tokenizer's own template in its sandbox (jinja2's limits: ranges of 100000)
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - the template's code failed on this conversation
            raise UserError(
                f"{where}: template error: {type(e).__name__}: {e}",
                ["set template: to one of `tunepipe templates`, or give a template_file"],
            ) from None

    return JinjaRenderer(render, where)


def file_jinja(source: str, where: str, tokenizer) -> JinjaRenderer:
    template = compile_jinja(source, where)
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    def render(messages, tools, gen):
        return run_jinja(
            template,
            where,
            messages=messages,
            tools=tools,
            add_generation_prompt=gen,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
            **{k: v for k, v in specials.items() if k not in ("bos_token", "eos_token")},
        )

    return JinjaRenderer(render, where)


# ------------------------------------------------------------------------------- resolution
def resolve(params: dict[str, Any], tokenizer, template_file: Path | None) -> tuple[Any, dict[str, Any]]:
    """(renderer, template.json) for the template flags. template.json holds what inference needs."""
    name = params.get("template") or template_registry.AUTO
    kind = params.get("template_type") or "default"
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    default_system = params.get("default_system")
    info: dict[str, Any] = {"template_type": kind, "eos_token": eos}
    if kind == "completion":
        name, template_file = "empty", None
    if template_file is not None:
        where = str(template_file)
        content, problems = template_registry.read_template_file(template_file)
        if problems:  # unreadable, not UTF-8, bad YAML, unknown or mistyped slots
            raise UserError(f"template_file {problems[0]}", problems[1:])
        if isinstance(content, dict):
            renderer = SlotRenderer.build(content, bos, eos, default_system)
            info.update(name=template_file.stem, source="file", slots=renderer.slots)
        else:
            text = content
            renderer = file_jinja(text, where, tokenizer)
            info.update(name=template_file.stem, source="file", chat_template=text, stop_words=[])
    elif name == template_registry.AUTO:
        renderer = tokenizer_jinja(tokenizer)
        info.update(name="auto", source="tokenizer", chat_template=tokenizer.chat_template, stop_words=[])
    else:
        entry = template_registry.get(name)
        if entry is None:
            raise UserError(
                f"unknown template {name!r}",
                [
                    "known templates: " + ", ".join(template_registry.template_names()),
                    "or give a template_file (Jinja chat template or YAML slots)",
                ],
            )
        renderer = SlotRenderer.build(entry, bos, eos, default_system)
        info.update(name=name, source="registry", slots=renderer.slots)
    if isinstance(renderer, SlotRenderer):
        info["stop_words"] = list(renderer.slots["stop_words"])
        info["default_system"] = renderer.slots["default_system"]
        info["generation_prompt"] = renderer.slots["assistant_header"] + renderer.slots["last_assistant_prefix"]
    return renderer, info


def renderer_from_json(info: dict[str, Any], tokenizer):
    if "slots" in info:
        return SlotRenderer(info["slots"])
    if info.get("source") == "tokenizer":
        return tokenizer_jinja(tokenizer)
    return file_jinja(info["chat_template"], info.get("name", "template_file"), tokenizer)


def encode_prompt(
    tokenizer, template_json: dict[str, Any], messages: list[dict], tools: str | None = None
) -> list[int]:
    """Token ids of the generation prompt for `messages` (ending with a user turn), as trained."""
    text = renderer_from_json(template_json, tokenizer).prompt(messages, tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------- tokenizing
@dataclass
class Encoded:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where masked
    truncated: bool


@dataclass
class Encodings:
    """Encoded samples back to back: sample i is `input_ids[offsets[i]:offsets[i + 1]]`, its labels
    likewise. The template stage builds its arrays from these without a Python object per sample."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where masked
    offsets: np.ndarray  # int64, one more than samples
    truncated: np.ndarray  # bool, per sample

    def __len__(self) -> int:
        return len(self.truncated)

    def __getitem__(self, i: int) -> Encoded:
        start, end = self.offsets[i], self.offsets[i + 1]
        return Encoded(self.input_ids[start:end], self.labels[start:end], bool(self.truncated[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def of(cls, samples: list[Encoded]) -> Encodings:
        lengths = [len(e.input_ids) for e in samples]
        return cls(
            concat([e.input_ids for e in samples], np.int32),
            concat([e.labels for e in samples], np.int32),
            np.cumsum([0] + lengths).astype(np.int64),
            np.array([e.truncated for e in samples], bool),
        )

    @classmethod
    def join(cls, parts: list[Encodings]) -> Encodings:
        ends = np.cumsum([0] + [len(p.input_ids) for p in parts])
        return cls(
            concat([p.input_ids for p in parts], np.int32),
            concat([p.labels for p in parts], np.int32),
            np.concatenate([[0]] + [p.offsets[1:] + end for p, end in zip(parts, ends)]).astype(np.int64),
            concat([p.truncated for p in parts], bool),
        )


def concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    """The arrays back to back as `dtype`; an empty array of it when there are none."""
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How much of a (prompt, answer) pair fits in `cutoff_len`, keeping the two in proportion."""
    if target_len * 2 < cutoff_len:  # a short answer is kept whole
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:  # a short prompt is kept whole
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def _assemble(ids: np.ndarray, counts: np.ndarray, segments: Segments, cutoff_len: int) -> Encoded:
    """ids + tokens per segment → labels on the answer segments, then balanced truncation per turn."""
    trained_seg = np.array([trained for _, trained in segments], dtype=bool)
    trained = np.repeat(trained_seg, counts)
    truncated = len(ids) > cutoff_len
    if truncated:
        # turn k = the k-th answer and the prompt text before it; (turn, prompt|answer) groups are
        # contiguous in token order, so each keeps its first keep_len tokens
        turn_seg = np.cumsum(trained_seg) - trained_seg
        group = np.repeat(turn_seg * 2 + trained_seg, counts)
        sizes = np.bincount(group, minlength=2 * (int(turn_seg.max()) + 1))
        keep_len = np.zeros_like(sizes)
        total = 0
        for turn in range(len(sizes) // 2):
            if total >= cutoff_len:
                break
            src, tgt = infer_seqlen(int(sizes[2 * turn]), int(sizes[2 * turn + 1]), cutoff_len - total)
            keep_len[2 * turn], keep_len[2 * turn + 1] = src, tgt
            total += src + tgt
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        keep = (np.arange(len(ids)) - first[group]) < keep_len[group]
        ids, trained = ids[keep], trained[keep]
    labels = np.where(trained, ids, IGNORE).astype(np.int32)
    return Encoded(ids.astype(np.int32), labels, truncated)


def _segment_counts(encoding, segments: Segments) -> list[int]:
    """Tokens per segment: a token belongs to the segment holding its last character (so a token that
    BPE merged across a boundary goes with the text it ends in). Found with one char→token lookup per
    segment boundary instead of reading every token's offsets."""
    firsts, pos = [], 0  # first token of each segment; None if it has none
    for text, _ in segments:
        first = None
        for char in range(pos, pos + len(text)):  # a char no token covers (trimmed space): try the next
            first = encoding.char_to_token(char)
            if first is not None:
                break
        firsts.append(first)
        pos += len(text)
    bounds = [len(encoding)] * (len(segments) + 1)
    for j in range(len(segments) - 1, 0, -1):
        bounds[j] = bounds[j + 1] if firsts[j] is None else min(firsts[j], bounds[j + 1])
    bounds[0] = 0
    return [b - a for a, b in zip(bounds, bounds[1:])]


def encode(tokenizer, renderer, records: list[dict[str, Any]], cutoff_len: int, batch_size: int = 1024) -> Encodings:
    """Conversations → ids and labels; one tokenizer call per batch of whole conversations, and the
    labels of a batch computed in one pass over its tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    fast = fast_bpe.FastBPE.of(backend) if backend is not None and records else None
    plain = _without_nfc(backend) if backend is not None and len(records) >= batch_size else None
    parts = []
    for b in range(0, len(records), batch_size):
        batch = records[b : b + batch_size]
        segments = [renderer.segments(r["messages"], r.get("tools")) for r in batch]
        if backend is None:
            parts.append(Encodings.of([_encode_slow(tokenizer, segs, cutoff_len) for segs in segments]))
            continue
        texts = ["".join(t for t, _ in segs) for segs in segments]
        ids, lengths, counts = _encode_batch(fast, plain, backend, texts, segments)
        flags = np.fromiter((trained for segs in segments for _, trained in segs), bool, count=len(counts))
        labels = np.where(np.repeat(flags, counts), ids, IGNORE).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if lengths.max(initial=0) <= cutoff_len:
            parts.append(Encodings(ids, labels, offsets, np.zeros(len(batch), bool)))
            continue
        samples, seg = [], 0  # some conversation is too long: truncate it, keep the others as they are
        for i, (segs, n) in enumerate(zip(segments, lengths.tolist())):
            start = offsets[i]
            if n > cutoff_len:
                samples.append(_assemble(ids[start : start + n], counts[seg : seg + len(segs)], segs, cutoff_len))
            else:
                samples.append(Encoded(ids[start : start + n], labels[start : start + n], False))
            seg += len(segs)
        parts.append(Encodings.of(samples))
    return Encodings.join(parts)


def _encode_batch(fast, plain, backend, texts: list[str], segments: list[Segments]):
    """(ids, tokens per text, tokens per segment): the texts FastBPE takes by it, the others by the
    tokenizer, put back in the texts' order."""
    by_fast = np.array([fast is not None and fast.takes(text) for text in texts], bool)
    if by_fast.all():
        return _encode_fast(fast, texts, segments)
    if not by_fast.any():
        return _encode_tokenizer(plain, backend, texts, segments)
    fast_ones, others = np.flatnonzero(by_fast), np.flatnonzero(~by_fast)
    parts = [
        (fast_ones, *_encode_fast(fast, [texts[i] for i in fast_ones], [segments[i] for i in fast_ones])),
        (others, *_encode_tokenizer(plain, backend, [texts[i] for i in others], [segments[i] for i in others])),
    ]
    return _in_order(parts, [len(segs) for segs in segments])


def _encode_fast(fast: fast_bpe.FastBPE, texts: list[str], segments: list[Segments]):
    """(ids, tokens per text, tokens per segment) by FastBPE: a token belongs to the segment holding its
    last character, as in `_segment_counts`."""
    tokens = fast.encode(texts)
    segment_ends = np.cumsum(np.fromiter((len(t) for segs in segments for t, _ in segs), np.int64))
    counts = np.diff(np.searchsorted(tokens.ends, segment_ends, side="right"), prepend=0)
    return tokens.ids, tokens.lengths, counts


def _encode_tokenizer(plain, backend, texts: list[str], segments: list[Segments]):
    """(ids, tokens per text, tokens per segment) by the tokenizer itself (without its NFC normalizer
    when the texts are in NFC already: `_without_nfc`)."""
    nfc = plain is not None and all(unicodedata.is_normalized("NFC", text) for text in texts)
    encodings = (plain if nfc else backend).encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(e) for e in encodings], np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, count=int(lengths.sum()))
    counts = np.array([c for e, segs in zip(encodings, segments) for c in _segment_counts(e, segs)], np.int64)
    return ids, lengths, counts


def _in_order(parts, segments_per_text: list[int]):
    """(ids, tokens per text, tokens per segment) of a batch in its texts' order, from parts
    (text indices, ids, tokens per text, tokens per segment) that each encoded some of its texts."""
    order = np.concatenate([picked for picked, *_ in parts])  # the texts in the parts' order
    where = np.empty_like(order)
    where[order] = np.arange(len(order))  # text t is the where[t]-th of that order
    ids, lengths, counts = (np.concatenate([part[k] for part in parts]) for k in (1, 2, 3))
    n_segments = np.asarray(segments_per_text, np.int64)
    first_token = (np.cumsum(lengths) - lengths)[where]
    first_segment = (np.cumsum(n_segments[order]) - n_segments[order])[where]
    return (
        ids[fast_bpe.ranges(first_token, lengths[where])],
        lengths[where],
        counts[fast_bpe.ranges(first_segment, n_segments)],
    )


def _without_nfc(backend):
    """A copy of `backend` without its normalizer, when that normalizer is NFC alone (Qwen2's, for one),
    else None. On text already in NFC — nearly all text, checked per batch by `unicodedata` in C — NFC
    changes nothing, and the copy skips its per-character alignment bookkeeping: the same ids and
    offsets, ~15% less encoding time (bench/preprocess.py)."""
    from tokenizers import Tokenizer

    if type(backend.normalizer).__name__ != "NFC":
        return None
    plain = Tokenizer.from_str(backend.to_str())
    plain.normalizer = None
    plain.encode_special_tokens = backend.encode_special_tokens  # a runtime setting, not serialised
    return plain


def _encode_slow(tokenizer, segments: Segments, cutoff_len: int) -> Encoded:
    """Tokenizers without offsets (slow ones): encode segment by segment."""
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for text, _ in segments]
    ids = np.array([i for piece in pieces for i in piece], dtype=np.int32)
    return _assemble(ids, np.array([len(p) for p in pieces], dtype=np.int64), segments, cutoff_len)


def encode_texts(tokenizer, texts: list[str], batch_size: int = 1024) -> list[np.ndarray]:
    """Plain texts (stage pt) → ids, batched; by FastBPE where it takes a whole batch."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    fast = fast_bpe.FastBPE.of(backend) if backend is not None and texts else None
    out = []
    for b in range(0, len(texts), batch_size):
        batch = texts[b : b + batch_size]
        if fast is not None and all(fast.takes(text) for text in batch):
            tokens = fast.encode(batch)
            out += np.split(tokens.ids, np.cumsum(tokens.lengths)[:-1])
        else:
            out += [np.array(e, dtype=np.int32) for e in tokenizer(batch, add_special_tokens=False)["input_ids"]]
    return out
