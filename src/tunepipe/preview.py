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
    legend = Text.assemble(
        ("trained", TRAINED),
        "  ",
        ("masked", MASKED),
        "  ",
        ("<special>", SPECIAL),
        "  ↵ newline" + ("   ⟦ ⟧ = trained" if plain else ""),
    )
    console.print(legend)
    for step in steps:
        data_step = plan.step(step.inputs["data"])
        _preview_step(step, data_step, plan, n, console, plain)


def _preview_step(step, data_step, plan, n: int, console, plain: bool) -> None:
    """The template stage's own code path (template.prepare + template.tokenize_split: stop words
    added, vocabulary checked, truncation, packing), on the first records of the train split."""
    from tunepipe.runtime import chat_template as ct
    from tunepipe.runtime.stages import data, template

    params = step.params
    with tempfile.TemporaryDirectory() as tmp:
        train, _, _ = data.load(
            data_step.params,
            Path(data_step.files.get("dataset_dir") or plan.spec_dir),
            plan.seed if plan.seed is not None else 42,
            Path(tmp),
        )
    tokenizer, renderer, info, _ = template.prepare(params, step.files, plan.spec_dir)
    cutoff_len = int(params.get("cutoff_len") or 512)
    stage = params.get("stage") or "sft"
    packing = stage == "pt" or bool(params.get("packing"))
    if stage == "pt":
        name, unit = "none (pt)", f"block {{i}} (texts + eos, {cutoff_len}-token blocks)"
    elif packing:
        name, unit = info["name"], f"row {{i}} (samples packed into {cutoff_len}-token rows)"
    else:
        name, unit = info["name"], f"sample {{i}} of {len(train)}"
    records = train[: max(n * 8, 16)] if packing else train[:n]
    arrays, stats = template.tokenize_split(records, tokenizer, renderer, params)
    offsets = arrays["offsets"].tolist()
    rows = [(arrays["input_ids"][a:b].tolist(), arrays["labels"][a:b].tolist(),
             int((arrays["position_ids"][a:b] == 0).sum()) if "position_ids" in arrays else 1)
            for a, b in zip(offsets[:n], offsets[1: n + 1])]  # fmt: skip
    specials = set(tokenizer.all_special_ids)
    for i, (ids, labels, packed) in enumerate(rows, 1):
        trained = sum(label != ct.IGNORE for label in labels)
        title = (
            f"{step.id} · template {name} · {unit.format(i=i)} · {len(ids)} tokens, {trained} trained, "
            f"{len(ids) - trained} masked" + (f" · {packed} samples" if stage != "pt" and packing else "")
        )
        console.rule(Text(title), align="left")
        console.print(render_tokens(tokenizer, ids, labels, specials, plain))
    if stats["truncated"] or stats["dropped"]:
        console.print(
            f"of the first {stats['samples']} samples: {stats['truncated']} truncated to cutoff_len "
            f"{cutoff_len}, {stats['dropped']} dropped (nothing left to train on)"
        )


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
