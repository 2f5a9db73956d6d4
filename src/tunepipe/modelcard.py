"""The model card (README.md) written beside an export delivered to `export_dir`. Light: no torch.

It says what the files are and how to run them, and proves where they came from: the spec, every
step's key, the training metrics, and the verify report (figures against thresholds). Written by the
runner after the run, from the store's manifests; the card is not part of any artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .spec.naming import verify_id

HOW_TO_RUN = {
    "gguf": """### llama.cpp

```bash
llama-cli -m model.gguf -cnv            # the chat template is embedded in the file
```

### Ollama

```bash
ollama create {name} -f Modelfile && ollama run {name}
```

### Python (llama-cpp-python)

```python
from llama_cpp import Llama
llm = Llama("model.gguf")
print(llm.create_chat_completion(messages=[{{"role": "user", "content": "Hello"}}])["choices"][0]["message"]["content"])
```
""",
    "onnx": """### onnxruntime

```python
import onnxruntime as ort
session = ort.InferenceSession("model.onnx")   # inputs: input_ids, attention_mask, position_ids, past_key_values.*
```

With onnxruntime-genai: `genai_config.json` is beside the model (`og.Model(".")`).
""",
    "mlc": """### MLC LLM

```bash
mlc_llm compile mlc-chat-config.json --device cpu -o model-lib.so   # see README-mlc.txt
mlc_llm chat . --model-lib model-lib.so
```
""",
}
TRANSFORMERS = """### transformers (the merged model this export was made from)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{model}")
tokenizer = AutoTokenizer.from_pretrained("{model}")
```
"""


def render(plan, export_step, manifests: dict[str, dict[str, Any]], model_path: Path | None) -> str:
    """The card of one export step; `manifests` maps step ids to their artifacts' manifests."""
    fmt = export_step.params.get("format")
    kind = export_step.params.get("type")
    lines = [
        f"# {plan.name} — {fmt} {kind}",
        "",
        f"Built by tunepipe from `{plan.spec_path.name}`. Every file here is a copy of a cached artifact; "
        "the keys below name exactly what produced it.",
        "",
        "## Steps",
        "",
        "| step | key |",
        "|---|---|",
    ]
    lines += [f"| {step.id} | `{step.key[:16]}` |" for step in plan.steps if step.id in manifests]
    trains = [(sid, m.get("metrics", {})) for sid, m in manifests.items() if m.get("kind") == "train"]
    if trains:
        lines += ["", "## Training", "", "| step | method | train loss | eval loss | steps |", "|---|---|---|---|---|"]
        for sid, m in trains:
            lines.append(
                f"| {sid} | {m.get('finetuning_type', '')} {m.get('stage', '')} | {_num(m.get('train_loss'))} "
                f"| {_num(m.get('eval_loss'))} | {m.get('steps', '')} |"
            )
    verify = next(
        (m for sid, m in manifests.items() if m.get("kind") == "verify" and sid == verify_id(export_step.id)),
        None,
    )
    lines += ["", "## Verification", ""]
    if verify is None:
        lines.append("Not verified (`verify: false`): nothing checks that these files compute what was trained.")
    else:
        metrics = verify.get("metrics", {})
        lines.append(
            f"Checked in its own runtime against the merged model on {metrics.get('probes', '?')} probe prompts "
            "from the pipeline's data: **passed**."
        )
        lines += ["", "| figure | value | threshold |", "|---|---|---|"]
        for name, threshold in (
            ("max_rel_logit_error", "threshold_max_rel_logit_error"),
            ("greedy_agreement", "threshold_min_greedy_agreement"),
            ("chat_template_tokens_match", None),
        ):
            if name in metrics:
                lines.append(
                    f"| {name} | {_num(metrics[name])} | {_num(metrics.get(threshold)) if threshold else ''} |"
                )
    lines += ["", "## How to run", "", HOW_TO_RUN.get(fmt, "").format(name=plan.name)]
    if model_path is not None:
        lines.append(TRANSFORMERS.format(model=model_path))
    lines += ["## The spec", "", "```yaml", plan.spec_path.read_text(encoding="utf-8").rstrip(), "```", ""]
    return "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_cards(plan, store) -> list[Path]:
    """README.md in every delivered export's export_dir; returns the cards written."""
    manifests = {step.id: store.manifest(step.key) for step in plan.steps if store.has(step.key)}
    manifests = {k: v for k, v in manifests.items() if v is not None}
    written = []
    for step in plan.steps:
        if step.kind != "export" or step.deliver is None or step.id not in manifests:
            continue
        source = plan.step(step.inputs.get("model") or step.inputs.get("quantize"))
        model_path = store.fetch(source.key) / "model" if source.id in manifests else None
        card = step.deliver / "README.md"
        text = render(plan, step, manifests, model_path)
        if not card.is_file() or card.read_text(encoding="utf-8") != text:
            card.parent.mkdir(parents=True, exist_ok=True)
            card.write_text(text, encoding="utf-8")
        written.append(card)
    return written
