"""An Ollama Modelfile for an exported GGUF: FROM, TEMPLATE (Go template), SYSTEM, PARAMETER stop.

    text = modelfile(template_json, "model.gguf")

TEMPLATE is written in Ollama's message form (`.Messages`, each `.Role`/`.Content`, with `.System`
the system prompt): it renders a conversation as tunepipe's slot template does — prefix, system block
(standalone, or folded into the first user turn), user and tool turns, assistant turns, and for the
generation prompt the assistant header plus `last_assistant_prefix`. Every piece of template text is
a Go string literal (`{{ "…" }}`), so Go's whitespace trimming around actions never touches it.
A Jinja chat template (template.json `chat_template`) is matched by behaviour against the registry's
slot templates: when one renders the same text for a set of conversations, that one is written; else
the Modelfile has no TEMPLATE and Ollama falls back to the GGUF's `tokenizer.chat_template`.
Ollama adds SYSTEM as the system message when a request has none: that is the template's default system.
"""

from __future__ import annotations

import json
from typing import Any

from tunepipe.runtime import template_registry


def modelfile(template: dict[str, Any], gguf_file: str, *, added_bos: str = "") -> str:
    """The Modelfile text. `added_bos`: the bos token llama.cpp puts before every prompt by itself (the
    GGUF's add_bos_token), which the TEMPLATE then leaves out of its opening so it is not doubled."""
    slots, note = resolved_slots(template)
    lines = [f"FROM ./{gguf_file}", ""]
    if slots is None:
        lines += [f"# {note}", ""]
    else:
        if note:
            lines += [f"# {note}"]
        if slots.get("strip_content"):
            lines += [
                "# the pipeline's template strips whitespace around message contents; Ollama passes them as given"
            ]
        if added_bos and _opening_bos(slots, added_bos):
            lines += [f"# {added_bos} opens the prompt: llama.cpp adds it (tokenizer.ggml.add_bos_token)"]
        lines += ['TEMPLATE """' + go_template(slots, added_bos=added_bos) + '"""', ""]
        if slots.get("default_system"):
            lines += ['SYSTEM """' + slots["default_system"] + '"""', ""]
    for word in (slots or template).get("stop_words") or []:
        lines.append(f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}")
    return "\n".join(lines).rstrip("\n") + "\n"


def _opening_bos(slots: dict[str, Any], bos: str) -> str | None:
    """Which slot opens every rendered prompt with `bos`: "prefix", or "user" (the first user turn, when
    nothing comes before it: no prefix, the system folded into it), or None."""
    if slots["prefix"].startswith(bos):
        return "prefix"
    if not slots["prefix"] and slots["system_in_user"] and slots["user"].startswith(bos):
        return "user"
    return None


def resolved_slots(template: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(slots, note): the template's slots, those of the registry template a Jinja one renders like, or None."""
    if template.get("slots"):
        return template["slots"], ""
    source = template.get("chat_template")
    if not source:
        return None, "no chat template: Ollama uses the GGUF's tokenizer.chat_template, if any"
    name = matching_registry_template(source, template.get("eos_token") or "")
    if name is None:
        return None, (
            "the pipeline's Jinja chat template matches no built-in template: "
            "Ollama reads the GGUF's tokenizer.chat_template"
        )
    return _registry_slots(
        name, template.get("eos_token") or ""
    ), f"the Jinja chat template renders as the built-in {name!r} template"


# ------------------------------------------------------------------------------ Go template
def go_template(slots: dict[str, Any], *, added_bos: str = "") -> str:
    """The slot template as an Ollama (Go text/template) TEMPLATE over .System and .Messages; without the
    opening `added_bos` (see modelfile)."""
    q = lambda text: "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""
    opening_bos = _opening_bos(slots, added_bos) if added_bos else None
    prefix = slots["prefix"][len(added_bos) :] if opening_bos == "prefix" else slots["prefix"]
    sys_before, _, sys_after = slots["system"].partition("{{content}}")
    user_before, _, user_after = slots["user"].partition("{{content}}")
    first_before = user_before[len(added_bos) :] if opening_bos == "user" else user_before
    tool_before, _, tool_after = (slots.get("observation") or slots["user"]).partition("{{content}}")
    asst_before, _, asst_after = slots["assistant"].partition("{{content}}")
    header, last_prefix = slots["assistant_header"], slots["last_assistant_prefix"]
    system_block = q(sys_before) + "{{ $.System }}" + q(sys_after)
    turn = lambda before, system: q(before) + system + "{{ .Content }}" + q(user_after)
    if slots["system_in_user"]:  # the first user turn carries the system block
        opening = "{{- $first := true }}"
        first = (
            "{{- if $.System }}"
            + turn(first_before, system_block)
            + "{{- else }}"
            + turn(first_before, "")
            + "{{- end }}"
        )
        user = "{{- if $first }}" + first + "{{- else }}" + turn(user_before, "") + "{{- end }}{{- $first = false }}"
    else:
        opening = "{{- if .System }}" + system_block + "{{- end }}"
        user = turn(user_before, "")
    last = ("{{- if $last }}" + q(last_prefix) + "{{- end }}") if last_prefix else ""
    return "\n".join(
        [
            q(prefix) + opening,
            "{{- range $i, $m := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}",
            '{{- if eq .Role "user" }}' + user,
            '{{- else if eq .Role "tool" }}' + q(tool_before) + "{{ .Content }}" + q(tool_after),
            '{{- else if eq .Role "assistant" }}'
            + q(header)
            + last
            + q(asst_before)
            + "{{ .Content }}"
            + "{{- if not $last }}"
            + q(asst_after)
            + "{{- end }}",
            "{{- end }}",
            '{{- if and $last (ne .Role "assistant") }}' + q(header + last_prefix) + "{{- end }}",
            "{{- end }}",
        ]
    )


# ----------------------------------------------------------------------- Jinja → registry slots
PROBES: list[tuple[list[dict[str, str]], bool]] = [
    ([{"role": "user", "content": "Hi there"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}], True),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "And now?"},
        ],
        True,
    ),
    ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}], False),
]


def matching_registry_template(source: str, eos: str) -> str | None:
    """The built-in template whose rendering equals the Jinja template's on every probe conversation."""
    import jinja2

    try:
        jinja = template_registry.sandbox_env().from_string(source)
    except jinja2.TemplateError:
        return None
    for entry in template_registry.list_templates():
        name = entry["name"]
        if name == template_registry.AUTO:
            continue
        slots = _registry_slots(name, eos)
        try:
            if all(
                jinja.render(messages=m, add_generation_prompt=g, bos_token="", eos_token=eos)
                == render_slots(slots, m, g)
                for m, g in PROBES
            ):
                return name
        except (jinja2.TemplateError, ValueError, TypeError):  # it rejects a probe (raise_exception on a system turn)
            continue
    return None


def _registry_slots(name: str, eos: str) -> dict[str, Any]:
    from tunepipe.runtime.chat_template import SlotRenderer

    return SlotRenderer.build(template_registry.get(name), "", eos, None).slots


def render_slots(slots: dict[str, Any], messages: list[dict], generation_prompt: bool) -> str:
    from tunepipe.runtime.chat_template import SlotRenderer

    renderer = SlotRenderer(slots)
    if generation_prompt:
        return renderer.prompt(messages)
    return "".join(text for text, _ in renderer.segments(messages))
