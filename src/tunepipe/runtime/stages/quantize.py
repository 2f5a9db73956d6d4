"""Quantize stage: a merged model → one quantized, loadable model (bnb, hqq or mlc), with its figures.

    inputs["model"] (a merge artifact: model/ + template.json) + params method, bits (group_size:
    hqq's and gptq's) [+ inputs["calibration"], gptq's: a template artifact, the pipeline's tokenized
    data; `calibration_samples` of its train split, seeded, each cut to CALIBRATION_MAX_TOKENS]
    ─► runtime/quantize.py
    ─► artifact: model/          the quantized model (runtime/quantize.py's docstring says, per method,
                                 which files and which loader) + the merged model's tokenizer files
                 template.json   copied from the merge artifact
                 quantize.json   {"method", "bits", "versions": {package: version}, "format", "dtype",
                                  "modules": [quantized module names], "figures": {...}, ...method extras}
The figures compare the quantized model with the merged one on fixed chat conversations rendered by
the model's chat template, each extended by greedy tokens (runtime/quantize.py `probes`, `compare`);
they are returned as the step's metrics. This stage judges nothing: a verify step compares figures
with thresholds. awq and cpm raise a UserError before any work (gptq too, without its calibration input) (the reason and what to use).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from tunepipe.errors import UserError
from tunepipe.runtime import quantize
from tunepipe.runtime.stages.export import TOKENIZER_FILES, model_dir

GREEDY_STEPS = 8  # greedy tokens appended to each probe conversation
CALIBRATION_MAX_TOKENS = 512


def run(ctx) -> dict:
    started = time.perf_counter()
    method, bits = ctx.params["method"], int(ctx.params["bits"])
    quantize.check(method, bits)
    source = Path(ctx.inputs["model"])
    merged = model_dir(source, ctx.work)
    out = Path(ctx.out)
    calibration = None
    if method == "gptq":
        if "calibration" not in ctx.inputs:
            raise UserError(
                "quantize method gptq needs calibration data: this step has no `calibration` input "
                "(the pipeline's tokenized data)",
                ["use method: hqq or bnb, which need no calibration"],
            )
        count = int(ctx.params["calibration_samples"])
        calibration = calibration_samples(Path(ctx.inputs["calibration"]), count, int(ctx.seed))
    info = quantize.quantize(
        method,
        merged,
        out / "model",
        bits=bits,
        log=ctx.log,
        calibration=calibration,
        group_size=int(ctx.params["group_size"]),
    )
    for name in TOKENIZER_FILES:
        if (merged / name).is_file():
            shutil.copyfile(merged / name, out / "model" / name)
    if (source / "template.json").is_file():
        shutil.copyfile(source / "template.json", out / "template.json")
    figures = _figures(method, merged, out / "model")
    record = {**info, "figures": figures}
    (out / "quantize.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    ctx.log.info("quantize %s %d-bit: %s", method, bits, json.dumps(figures, sort_keys=True))
    return {
        "method": method,
        "bits": bits,
        "modules": len(info["modules"]),
        **figures,
        "wall_s": time.perf_counter() - started,
    }


def calibration_samples(data: Path, count: int, seed: int) -> list[list[int]]:
    """`count` sequences of the tokenized train split (all of them when fewer), drawn with `seed`."""
    import numpy as np

    ids, offsets = (np.load(data / f"train.{name}.npy") for name in ("input_ids", "offsets"))
    order = list(range(len(offsets) - 1))
    random.Random(seed).shuffle(order)
    chosen = [
        ids[offsets[i] : min(offsets[i + 1], offsets[i] + CALIBRATION_MAX_TOKENS)].tolist() for i in order[:count]
    ]
    if not chosen:
        raise UserError("quantize method gptq: the calibration data's train split holds no samples")
    return chosen


def _figures(method: str, merged: Path, quantized: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompts = quantize.probes(AutoTokenizer.from_pretrained(quantized))
    return quantize.compare(reference, quantize.load(method, quantized), prompts, greedy_steps=GREEDY_STEPS)
