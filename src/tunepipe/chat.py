"""`tunepipe chat SPEC|ARTIFACT`: talk to the trained, merged or exported model through the pipeline's template.

With a SPEC, the model is the plan's final model (the merge step's, else the last train step's) —
or, with `--backend llama-cpp`, its GGUF export — taken from the store, which must hold it (`tunepipe
run SPEC` first). With an ARTIFACT directory, it must stand alone: a merge or full train artifact
(`model/`), or a GGUF export (`model.gguf`). Generation is the infer stage's (runtime/generate.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import UserError

HELP = "  /reset starts a new conversation, /exit (or Ctrl-D) ends."


def _from_plan(plan, backend: str) -> tuple[Path, dict[str, Path], Path | None]:
    """(artifact, its chain by key, the base model dir) of the plan's final model or GGUF export."""
    from .store import open_store

    store = open_store(plan.cache_dir)
    if backend == "llama-cpp":
        steps = [s for s in plan.steps if s.kind == "export" and s.params.get("format") == "gguf"]
        if not steps:
            raise UserError("--backend llama-cpp talks to a GGUF export: the spec has no export: [{format: gguf}]")
    else:
        steps = [s for s in plan.steps if s.kind in ("merge", "train")][-1:]
        if not steps:
            raise UserError("the spec trains no model: nothing to chat with")
    step = steps[-1]
    if not store.has(step.key):
        raise UserError(f"{step.id} is not built yet: run `tunepipe run {plan.spec_path.name}` first")
    chain = {
        plan.step(dep).key: store.fetch(plan.step(dep).key)
        for dep in step.inputs.values()
        if store.has(plan.step(dep).key)
    }
    return store.fetch(step.key), chain, step.files.get("model")


def open_chat(target: Path, overrides: list, backend: str):
    from .runtime import generate

    target = Path(target)
    if target.is_file():
        from .compiler.plan import compile_plan
        from .spec import load_spec

        resolved = load_spec(target, overrides)
        artifact, chain, model_dir = _from_plan(compile_plan(resolved.data, resolved.path), backend)
        spec_dir = resolved.spec_dir
    elif target.is_dir():
        artifact, chain, model_dir, spec_dir = target, {}, None, None
    else:
        raise UserError(f"{target}: no such spec file or artifact directory")
    template_path = artifact / "template.json"
    template = json.loads(template_path.read_text()) if template_path.is_file() else None
    if backend == "llama-cpp" or (artifact / "model.gguf").is_file():
        if not (artifact / "model.gguf").is_file():
            raise UserError(f"{artifact} holds no model.gguf: give a GGUF export artifact or the spec")
        return generate.LlamaCppChat(artifact / "model.gguf", template)
    if not (artifact / "model").is_dir() and not chain and not (artifact / "train.json").is_file():
        raise UserError(f"{artifact} is not a trained model (no model/ or adapter/)")
    from .runtime import modeling

    model, tokenizer = modeling.load_trained(artifact, None, model_dir=model_dir, spec_dir=spec_dir, artifacts=chain)
    return generate.HFChat(model, tokenizer, template)


def chat(target: Path, overrides: list, backend: str, prompt: str | None, max_new_tokens: int, console) -> None:
    from rich.text import Text

    session = open_chat(target, overrides, backend)
    if prompt is not None:
        print(session.answer([{"role": "user", "content": prompt}], max_new_tokens).text)
        return
    console.print(Text(f"chatting with {target} ({backend}).\n{HELP}", style="dim"))
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = []
            console.print(Text("(new conversation)", style="dim"))
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer = session.answer(messages, max_new_tokens)
        messages.append({"role": "assistant", "content": answer.text})
        console.print(Text(answer.text, style="bold green"))
