"""Verify stage: does an export — or a quantized model — compute what the model it came from computes?

Inputs: `export` (the export artifact) or `quantized` (a quantize artifact, loaded by its method's
library and compared in torch), `reference` (the merged or fully trained model it was made
from) and `probes` (the pipeline's tokenized data: the validation split, else the training split).
`verify_prompts` probes are drawn, seeded, from that data: each is a sample's prompt (its tokens
before the first trained label; the first tokens of a `pt` sample). The format's module runs them
through the export in its own runtime and through the HF model (`verify(export_dir, model_dir,
probes, ...)` → figures); this stage compares the figures with the thresholds — the flags
`max_rel_logit_error` / `min_greedy_agreement` when set, else the catalog's value for the export's
type (a quantized model's type is `<method><bits>`, e.g. bnb4) — and writes `report.json` (figures, thresholds, pass/fail). A failed check fails the step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.runtime.stages.export import format_module, model_dir, template_of

MAX_PROBE_TOKENS = 48
GREEDY_STEPS = 8  # greedy tokens appended to each probe of a quantized model
MIN_PROBE_TOKENS = 2


class VerifyFailed(UserError):
    """The export disagrees with its model beyond the thresholds: the step fails (exit status 1)."""

    exit_code = 1


def probes(data: Path, count: int, seed: int) -> list[list[int]]:
    import numpy as np

    split = "val" if (data / "val.offsets.npy").is_file() and len(np.load(data / "val.offsets.npy")) > 1 else "train"
    ids, labels, offsets = (np.load(data / f"{split}.{name}.npy") for name in ("input_ids", "labels", "offsets"))
    order = list(range(len(offsets) - 1))
    random.Random(seed).shuffle(order)
    chosen = []
    for i in order:
        start, end = int(offsets[i]), int(offsets[i + 1])
        trained = np.nonzero(labels[start:end] != -100)[0]
        prompt_end = int(trained[0]) if len(trained) and trained[0] >= MIN_PROBE_TOKENS else min(end - start, 16)
        probe = ids[start : start + min(prompt_end, MAX_PROBE_TOKENS)].tolist()
        if len(probe) >= MIN_PROBE_TOKENS:
            chosen.append(probe)
        if len(chosen) == count:
            break
    if not chosen:
        raise UserError(f"no probe prompts of {MIN_PROBE_TOKENS} tokens or more in the {split} split to verify with")
    return chosen


def thresholds(params: dict, kind: str) -> dict[str, float]:
    from tunepipe.spec.catalog import load_catalog

    flags = load_catalog().flags
    chosen = {}
    for name in ("max_rel_logit_error", "min_greedy_agreement"):
        value = params.get(name)
        if value is None:
            value = (flags[name].by_type or {}).get(kind)
        if value is not None:
            chosen[name] = float(value)
    return chosen


def quantized_figures(quantized: Path, reference_dir: Path, prompts: list[list[int]]) -> tuple[str, str, dict]:
    """("quantize", "<method><bits>", figures) of a quantize artifact against the model it was made from,
    on the probes each extended by greedy tokens (runtime/quantize.py `compare`)."""
    from transformers import AutoModelForCausalLM

    from tunepipe.runtime import quantize

    record = json.loads((quantized / "quantize.json").read_text())
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).eval()
    model = quantize.load(record["method"], quantized / "model")
    figures = quantize.compare(reference, model, prompts, greedy_steps=GREEDY_STEPS)
    return "quantize", f"{record['method']}{record['bits']}", figures


def judge(figures: dict, limits: dict[str, float]) -> list[str]:
    failures = []
    if "max_rel_logit_error" in limits and figures.get("max_rel_logit_error", 0.0) > limits["max_rel_logit_error"]:
        failures.append(
            f"max relative logit error {figures['max_rel_logit_error']:.3g} > {limits['max_rel_logit_error']:.3g}"
        )
    if "min_greedy_agreement" in limits and figures.get("greedy_agreement", 1.0) < limits["min_greedy_agreement"]:
        failures.append(f"greedy agreement {figures['greedy_agreement']:.3f} < {limits['min_greedy_agreement']:.3f}")
    if figures.get("chat_template_tokens_match") is False:
        failures.append("the export's embedded chat template does not tokenize like the pipeline's template")
    return failures


def run(ctx) -> dict:
    reference = Path(ctx.inputs["reference"])
    prompts = probes(Path(ctx.inputs["probes"]), int(ctx.params["verify_prompts"]), int(ctx.seed))
    if "quantized" in ctx.inputs:  # a quantize step's model, in the library that reads its format
        fmt, kind, figures = quantized_figures(Path(ctx.inputs["quantized"]), model_dir(reference, ctx.work), prompts)
    else:
        fmt, kind = ctx.params["format"], ctx.params["type"]
        figures = format_module(fmt).verify(
            Path(ctx.inputs["export"]),
            model_dir(reference, ctx.work),
            prompts,
            type=kind,
            template=template_of(reference),
            log=ctx.log,
        )
    limits = thresholds(ctx.params, kind)
    failures = judge(figures, limits)
    report = {
        "format": fmt,
        "type": kind,
        "figures": figures,
        "thresholds": limits,
        "passed": not failures,
        "failures": failures,
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False))
    ctx.log.info("verify %s %s: %s", fmt, kind, json.dumps(report, sort_keys=True))
    if failures:
        what = "the quantized model" if fmt == "quantize" else "the export"
        raise VerifyFailed(f"verify {fmt} {kind}: {what} does not compute what the model computes", failures)
    return {
        "format": fmt,
        "type": kind,
        "passed": True,
        **{k: v for k, v in figures.items() if isinstance(v, (int, float, bool))},
        **{f"threshold_{k}": v for k, v in limits.items()},
    }
