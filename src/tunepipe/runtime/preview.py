"""`tunepipe preview SPEC`: the first samples as the model will see them, answers told from prompts.

For each template step of the plan, the data and template stages run in-process on the spec's own
parameters (nothing is cached or written to the store) and the first `n` training samples are shown:
trained tokens bold green, masked tokens dim, special tokens magenta, newlines as ↵. Without colour
(a pipe, NO_COLOR) trained runs are wrapped in ⟦ ⟧ instead.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.text import Text

TRAINED, MASKED, SPECIAL = "bold green", "dim", "magenta"


def preview(spec: dict[str, Any], spec_dir: Path, n: int, console) -> None:
    from tunepipe.compiler.plan import compile_plan

    plan = compile_plan(spec, Path(spec_dir) / ".preview.yaml")
    steps = [s for s in plan.steps if s.kind == "template"]
    if not steps:
        console.print("nothing to preview: the spec has no data/template step")
        return
    plain = console.no_color or console.color_system is None
    legend = Text.assemble(("trained", TRAINED), "  ", ("masked", MASKED), "  ", ("<special>", SPECIAL),
                           "  ↵ newline" + ("   ⟦ ⟧ = trained" if plain else ""))
    console.print(legend)
    for step in steps:
        data_step = plan.step(step.inputs["data"])
        _preview_step(step, data_step, plan, n, console, plain)


def _preview_step(step, data_step, plan, n: int, console, plain: bool) -> None:
    from tunepipe.runtime import chat_template as ct
    from tunepipe.runtime.stages import data, template

    params = step.params
    with tempfile.TemporaryDirectory() as tmp:
        train, _, _ = data.load(data_step.params, Path(data_step.files.get("dataset_dir") or plan.spec_dir),
                                plan.seed if plan.seed is not None else 42, Path(tmp))
    model_dir = step.files.get("model") or params.get("model_name_or_path")
    tokenizer = template.load_tokenizer(params, model_dir)
    cutoff_len = int(params.get("cutoff_len") or 512)
    stage = params.get("stage") or "sft"
    if stage == "pt":
        name, unit = "none (pt)", f"block {{i}} (texts + eos, {cutoff_len}-token blocks)"
        arrays, _ = template.tokenize_split(train[: max(n * 8, 16)], tokenizer, None, params)
        offsets = arrays["offsets"].tolist()
        samples = [(arrays["input_ids"][a:b].tolist(), arrays["labels"][a:b].tolist(), False)
                   for a, b in zip(offsets[:n], offsets[1: n + 1])]
    else:
        renderer, info = ct.resolve(params, tokenizer, template.template_file_path(params, plan.spec_dir, step.files))
        template.add_tokens(tokenizer, params, info["stop_words"])
        name, unit = info["name"], f"sample {{i}} of {len(train)}"
        samples = [(e.input_ids.tolist(), e.labels.tolist(), e.truncated)
                   for e in ct.encode(tokenizer, renderer, train[:n], cutoff_len)]
    specials = set(tokenizer.all_special_ids)
    for i, (ids, labels, truncated) in enumerate(samples, 1):
        trained = sum(label != ct.IGNORE for label in labels)
        title = (f"{step.id} · template {name} · {unit.format(i=i)} · {len(ids)} tokens, {trained} trained, "
                 f"{len(ids) - trained} masked" + (" · truncated" if truncated else ""))
        console.rule(Text(title), align="left")
        console.print(render_tokens(tokenizer, ids, labels, specials, plain))


def render_tokens(tokenizer, ids: list[int], labels: list[int], specials: set[int], plain: bool) -> Text:
    """Runs of equally-labelled tokens decoded together (so multi-byte characters stay whole)."""
    from tunepipe.runtime.chat_template import IGNORE

    text = Text()
    runs: list[tuple[bool, bool, list[int]]] = []  # (trained, special, ids)
    for token, label in zip(ids, labels):
        key = (label != IGNORE, token in specials)
        if runs and runs[-1][:2] == key and not key[1]:
            runs[-1][2].append(token)
        else:
            runs.append((*key, [token]))
    open_mark = False
    for trained, special, run in runs:
        if plain and trained != open_mark:
            text.append("⟦" if trained else "⟧")
            open_mark = trained
        piece = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        style = SPECIAL if special else MASKED
        if trained:
            style = f"{TRAINED} underline" if special else TRAINED
        text.append(piece.replace("\n", "↵\n"), style=style)
    if open_mark:
        text.append("⟧")
    return text
