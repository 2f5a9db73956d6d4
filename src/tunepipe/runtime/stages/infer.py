"""The infer stage: the final model's greedy answer to `prompt`, the last line of `tunepipe run`.

Input role `model`: a train artifact (`model/`, or `adapter/` on its recorded base) or a merge
artifact. The prompt goes through the chat template the model was trained with (the artifact's
`template.json`, copied from the template stage), and generation stops at the template's stop
tokens. Writes `answer.txt` (the answer) and `answer.json` (prompt, answer, token ids).

Adapter flags (adapter_name_or_path, lora_weight_path, adapter_folder) were consumed by the
train step that produced the model; they are not applied a second time here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunepipe.errors import UserError
from tunepipe.runtime import modeling


def run(ctx) -> dict:
    p = ctx.params
    prompt = p.get("prompt")
    if not prompt:
        raise UserError("infer.prompt is required: the text to answer")
    artifact = Path(ctx.inputs["model"])
    # train.json names a local base model as the spec wrote it: this step's files["model"] is where it is.
    model, tokenizer = modeling.load_trained(
        artifact, _model_flags(p), model_dir=ctx.files.get("model"), spec_dir=ctx.spec_dir, artifacts=ctx.artifacts
    )
    device = "cuda" if torch.cuda.is_available() and not p.get("no_cuda") else "cpu"
    model.to(device).eval()

    template = json.loads((artifact / "template.json").read_text()) if (artifact / "template.json").is_file() else None
    prompt_ids = encode(tokenizer, template, prompt)
    stop_ids = stop_token_ids(tokenizer, template)
    stop_strings = [w for w in (template or {}).get("stop_words", []) if len(tokenizer.tokenize(w)) > 1]

    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids], device=device),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
            max_new_tokens=int(p["max_new_tokens"]),
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
            use_cache=bool(p["use_cache"]),
            **({"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}),
        )
    new_ids = output[0, len(prompt_ids) :].tolist()
    answer_ids = new_ids[:-1] if new_ids and new_ids[-1] in stop_ids else new_ids
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
    for word in stop_strings:  # a multi-token stop word ends the text but is not part of the answer
        answer = answer.split(word)[0]

    (ctx.out / "answer.txt").write_text(answer + "\n", encoding="utf-8")
    record = {"prompt": prompt, "answer": answer, "prompt_ids": prompt_ids, "token_ids": new_ids,
              "stopped": bool(new_ids) and new_ids[-1] in stop_ids}  # fmt: skip
    (ctx.out / "answer.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    ctx.log.info("answer: %s", answer)
    return {"answer": answer, "new_tokens": len(new_ids)}


def encode(tokenizer, template: dict | None, prompt: str) -> list[int]:
    """The generation prompt, as the model saw prompts in training."""
    if template is None or template.get("source") == "pt":  # plain-text model: continue the text
        return tokenizer(prompt)["input_ids"]
    from tunepipe.runtime.chat_template import encode_prompt

    return encode_prompt(tokenizer, template, [{"role": "user", "content": prompt}])


def stop_token_ids(tokenizer, template: dict | None) -> list[int]:
    ids = list((template or {}).get("stop_token_ids") or [])
    for word in (template or {}).get("stop_words", []):
        token = tokenizer.convert_tokens_to_ids(word)
        if token is not None and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise UserError("infer: the model has neither an eos token nor template stop words to stop at")
    return ids


def _model_flags(params: dict) -> dict:
    adapters = ("adapter_name_or_path", "adapter_folder", "lora_weight_path")
    return {k: v for k, v in params.items() if k not in adapters}
