"""Greedy answers through the pipeline's template, from a transformers model or a GGUF file in
llama.cpp: shared by the infer stage and `tunepipe chat`. Imports torch / llama_cpp lazily.

`HFChat(model, tokenizer, template)` prompts the model exactly as it was trained (the template
artifact's `template.json`, `chat_template.encode_prompt`) and stops at the template's stop tokens.
`LlamaCppChat(gguf, template)` renders the conversation with the chat template embedded in the
GGUF (what llama.cpp and Ollama users get) and stops at the same stop words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.errors import UserError


@dataclass
class Answer:
    text: str
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # generated, the stop token included when it stopped
    stopped: bool = False


def encode(tokenizer, template: dict | None, messages: list[dict[str, str]]) -> list[int]:
    """The generation prompt, as the model saw prompts in training."""
    if template is None or template.get("source") == "pt":  # plain-text model: continue the text
        return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
    from tunepipe.runtime.chat_template import encode_prompt

    return encode_prompt(tokenizer, template, messages)


def stop_token_ids(tokenizer, template: dict | None) -> list[int]:
    ids = list((template or {}).get("stop_token_ids") or [])
    for word in (template or {}).get("stop_words", []):
        token = tokenizer.convert_tokens_to_ids(word)
        if token is not None and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the model has neither an eos token nor template stop words to stop at")
    return ids


class HFChat:
    def __init__(self, model, tokenizer, template: dict | None, *, use_cache: bool = True, device: str | None = None):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer, self.template, self.use_cache = (
            model.to(self.device).eval(),
            tokenizer,
            template,
            use_cache,
        )
        self.stop_ids = stop_token_ids(tokenizer, template)
        self.stop_strings = [w for w in (template or {}).get("stop_words", []) if len(tokenizer.tokenize(w)) > 1]

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int) -> Answer:
        import torch

        prompt_ids = encode(self.tokenizer, self.template, messages)
        tokenizer = self.tokenizer
        with torch.no_grad():
            output = self.model.generate(
                input_ids=torch.tensor([prompt_ids], device=self.device),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0],
                use_cache=self.use_cache,
                **({"stop_strings": self.stop_strings, "tokenizer": tokenizer} if self.stop_strings else {}),
            )
        new_ids = output[0, len(prompt_ids) :].tolist()
        stopped = bool(new_ids) and new_ids[-1] in self.stop_ids
        text = tokenizer.decode(new_ids[:-1] if stopped else new_ids, skip_special_tokens=True)
        for word in self.stop_strings:  # a multi-token stop word ends the text but is not part of the answer
            text = text.split(word)[0]
        return Answer(text, prompt_ids, new_ids, stopped)


class LlamaCppChat:
    def __init__(self, gguf: Path, template: dict | None, *, n_ctx: int = 0, threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError("the llama-cpp backend needs llama-cpp-python: pip install llama-cpp-python") from None
        import os

        # n_ctx 0: the context the model was trained with (the GGUF says)
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads or os.cpu_count(), seed=0, verbose=False)
        self.stop = list((template or {}).get("stop_words") or [])

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int) -> Answer:
        # The GGUF's embedded chat template renders the conversation (llama-cpp-python's Jinja formatter).
        result: dict[str, Any] = self.llm.create_chat_completion(
            messages=messages, max_tokens=max_new_tokens, temperature=0.0, top_k=1, stop=self.stop or None, seed=0
        )
        choice = result["choices"][0]
        return Answer(choice["message"]["content"] or "", stopped=choice.get("finish_reason") == "stop")
