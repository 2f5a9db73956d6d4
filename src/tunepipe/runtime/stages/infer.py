"""The infer stage: the final model's greedy answer to `prompt`, the last line of `tunepipe run`.

Input role `model`: a train artifact (`model/`, or `adapter/` on its recorded base) or a merge
artifact; with `infer_backend: llama-cpp`, also `gguf` (a GGUF export), answered by llama.cpp. The prompt goes through the chat template the model was trained with (the artifact's
`template.json`, copied from the template stage), and generation stops at the template's stop
tokens. Writes `answer.txt` (the answer) and `answer.json` (prompt, answer, token ids).

Adapter flags (adapter_name_or_path, lora_weight_path, adapter_folder) were consumed by the
train step that produced the model; they are not applied a second time here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunepipe.runtime import generate, modeling


def run(ctx) -> dict:
    p = ctx.params
    prompt = p["prompt"]
    messages = [{"role": "user", "content": prompt}]
    artifact = Path(ctx.inputs["model"])
    template = json.loads((artifact / "template.json").read_text()) if (artifact / "template.json").is_file() else None
    if p["infer_backend"] == "llama-cpp":  # the exported GGUF, in llama.cpp, through its embedded chat template
        gguf = Path(ctx.inputs["gguf"]) / "model.gguf"
        answer = generate.LlamaCppChat(gguf, template).answer(messages, int(p["max_new_tokens"]))
    else:
        # train.json names a local base model as the spec wrote it: this step's files["model"] is where it is.
        model, tokenizer = modeling.load_trained(
            artifact, _model_flags(p), model_dir=ctx.files.get("model"), spec_dir=ctx.spec_dir, artifacts=ctx.artifacts
        )
        device = "cuda" if torch.cuda.is_available() and not p.get("no_cuda") else "cpu"
        chat = generate.HFChat(model, tokenizer, template, use_cache=bool(p["use_cache"]), device=device)
        answer = chat.answer(messages, int(p["max_new_tokens"]))

    (ctx.out / "answer.txt").write_text(answer.text + "\n", encoding="utf-8")
    record = {"prompt": prompt, "answer": answer.text, "prompt_ids": answer.prompt_ids, "token_ids": answer.token_ids,
              "stopped": answer.stopped, "backend": p["infer_backend"]}  # fmt: skip
    (ctx.out / "answer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ctx.log.info("answer: %s", answer.text)
    return {"answer": answer.text, "new_tokens": len(answer.token_ids)}


def _model_flags(params: dict) -> dict:
    adapters = ("adapter_name_or_path", "adapter_folder", "lora_weight_path")
    return {k: v for k, v in params.items() if k not in adapters}
