"""Quantizing a merged model: bitsandbytes, HQQ and MLC group quantization, and the figures that compare it.

    check(method, bits)                          # UserError for a method/bits this stack cannot quantize
    info = quantize(method, model_dir, out, bits=, group_size=, log=)   # writes an HF-loadable model into out
    model = load(method, out)                    # the quantized model, loaded by its own library
    figures = compare(reference, model, tokenizer, greedy_steps=)      # greedy agreement, logit error

What each method writes into `out` (the tokenizer files are the caller's to copy):
- `bnb`: transformers' bitsandbytes format (`save_pretrained` of a model loaded with a
  `BitsAndBytesConfig`: int8 weights + SCB scales for 8 bits, nf4-packed uint8 + quant state for 4
  bits), `config.json` carrying `quantization_config`; loads back with `from_pretrained` (CPU too,
  bitsandbytes ≥ 0.50).
- `hqq`: transformers 5.x's `HqqConfig` path raises NotImplementedError ("QuantizationMethod.HQQ is
  not available yet"), so the hqq package's own API quantizes (`AutoHQQHFModel.quantize_model`,
  every Linear but lm_head) and saves (`save_quantized`: `config.json` + `qmodel.pt`, the packed
  W_q tensors and their meta); it loads back with `AutoHQQHFModel.from_quantized`, not with
  transformers' `from_pretrained`. `config.json` gets a `quantization_config` block recording it.
- `mlc`: a "fake-quant" HF model: every 2-D weight (mlc-llm's Linear and Embedding modules) is
  replaced by what mlc-llm's 4-bit group quantization stores for it, dequantized
  (`tunepipe.runtime.export.mlc_quant`), in the model's dtype — so it computes what an MLC q4 build
  of the model computes, in plain transformers. `config.json` records that in `quantization_config`
  (quant_method "mlc_fake_quant"), which transformers ignores when loading.
- `gptq`: gptqmodel (7.6 quantizes on CPU; its torch kernel runs the packed int32 weights), calibrated
  on token sequences the caller passes (the pipeline's own data); saved in gptqmodel's `gptq` format
  (`config.json` with `quantization_config`, `quantize_config.json`, packed qweight/qzeros/scales). It
  loads back with `GPTQModel.load`; transformers' `from_pretrained` reads it too once `optimum` is
  installed. Its per-module log (quant_log.csv, with timings) is not kept: the bytes depend on the inputs only.
`awq` and `cpm` raise a UserError in `check` with the reason and what to use instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path

from tunepipe.errors import UserError

REQUIRES = {"bnb": ("bitsandbytes", "bitsandbytes"), "hqq": ("hqq", "hqq"), "gptq": ("gptqmodel", "gptqmodel")}
BITS = {"bnb": (4, 8), "hqq": (2, 3, 4, 8), "gptq": (2, 3, 4, 8), "mlc": (4,)}
UNAVAILABLE = {
    "awq": (
        "quantize method awq cannot run on this stack (CPU, torch 2.13, transformers 5.x)",
        [
            "AutoAWQ is archived and needs CUDA; llmcompressor's AWQModifier pins transformers<=5.17",
            "use method: hqq (calibration-free, 2/3/4/8 bits) or bnb (4/8 bits)",
        ],
    ),
    "cpm": (
        "quantize method cpm is not a quantization this pipeline can produce",
        ["no maintained library quantizes 'cpm'; use bnb, hqq or mlc"],
    ),
}
MLC_GROUP_SIZE = 32  # the group size of mlc-llm's `q4f16_1` / `q4f32_1`


def check(method: str, bits: int) -> None:
    """Raise a UserError when this stack cannot quantize with `method` at `bits`."""
    if method in UNAVAILABLE:
        message, details = UNAVAILABLE[method]
        raise UserError(message, details)
    if method not in BITS:
        raise UserError(f"unknown quantize method {method!r}", [f"one of {', '.join(sorted(BITS))}"])
    if bits not in BITS[method]:
        raise UserError(
            f"quantize method {method} does not quantize to {bits} bits",
            [f"{method} bits: one of {', '.join(map(str, BITS[method]))}"],
        )
    if method in REQUIRES and importlib.util.find_spec(REQUIRES[method][0]) is None:
        raise UserError(
            f"quantize method {method}: the {REQUIRES[method][1]} package is not installed",
            [f"pip install {REQUIRES[method][1]}"],
        )


def versions(method: str) -> dict[str, str]:
    names = ["torch", "transformers"] + ([REQUIRES[method][1]] if method in REQUIRES else [])
    return {name: importlib.metadata.version(name) for name in names}


def _dtype_of(model_dir: Path):
    import torch

    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def quantize(
    method: str,
    model_dir: Path,
    out: Path,
    *,
    bits: int,
    group_size: int,
    log: logging.Logger,
    calibration: list[list[int]] | None = None,
) -> dict:
    """Quantize the HF model in `model_dir` into `out` (an HF directory, no tokenizer); returns what was done.
    `group_size` is HQQ's and GPTQ's (mlc-llm's is fixed at 32; bitsandbytes' nf4 blocks are its own 64);
    `calibration` (token id sequences) is GPTQ's and required by it."""
    check(method, bits)
    if method == "gptq" and not calibration:
        raise UserError("quantize method gptq needs calibration samples (token sequences of the pipeline's data)")
    out.mkdir(parents=True, exist_ok=True)
    quantizers = {
        "bnb": _bnb,
        "hqq": _hqq,
        "mlc": _mlc,
        "gptq": lambda *a, **k: _gptq(*a, **k, calibration=calibration),
    }
    info = quantizers[method](model_dir, out, bits=bits, group_size=group_size)
    log.info("quantized %d modules with %s to %d bits", len(info["modules"]), method, bits)
    return {"method": method, "bits": bits, "versions": versions(method), **info}


def _bnb_config(bits: int, dtype):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _bnb(model_dir: Path, out: Path, *, bits: int, group_size: int) -> dict:
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    dtype = _dtype_of(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=_bnb_config(bits, dtype), device_map="cpu", dtype=dtype
    )
    kind = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    modules = sorted(name for name, module in model.named_modules() if isinstance(module, kind))
    model.save_pretrained(out)
    return {
        "format": "transformers-bitsandbytes",
        "quant_type": "int8" if bits == 8 else "nf4",
        "dtype": str(dtype).removeprefix("torch."),
        "modules": modules,
    }


def _hqq(model_dir: Path, out: Path, *, bits: int, group_size: int) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    dtype = _dtype_of(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=dtype, device="cpu")
    modules = sorted(name for name, module in model.named_modules() if isinstance(module, HQQLinear))
    model.config.quantization_config = {
        "quant_method": "hqq",
        "nbits": bits,
        "group_size": group_size,
        "loader": "hqq.models.hf.base.AutoHQQHFModel.from_quantized",
    }
    AutoHQQHFModel.save_quantized(model, str(out))
    return {"format": "hqq", "group_size": group_size, "dtype": str(dtype).removeprefix("torch."), "modules": modules}


def _mlc(model_dir: Path, out: Path, *, bits: int, group_size: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.runtime.export.mlc_quant import dequantize_group, quantize_group

    dtype = _dtype_of(model_dir)
    numpy_dtype = "float16" if dtype == torch.float16 else "float32"  # numpy has no bfloat16: float32, cast back
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    modules = []
    with torch.no_grad():
        for name, param in model.named_parameters(remove_duplicate=True):  # a tied head is its embedding
            if param.ndim != 2:
                continue
            array = param.detach().to(torch.float32).numpy()
            q_weight, q_scale = quantize_group(array, bits=bits, group_size=MLC_GROUP_SIZE, dtype=numpy_dtype)
            w_hat = dequantize_group(q_weight, q_scale, bits=bits, group_size=MLC_GROUP_SIZE, k=array.shape[-1])
            param.copy_(torch.from_numpy(np.ascontiguousarray(w_hat).astype("float32")).to(dtype))
            modules.append(name.removesuffix(".weight"))
    model.config.quantization_config = {
        "quant_method": "mlc_fake_quant",
        "bits": bits,
        "group_size": MLC_GROUP_SIZE,
        "scale_dtype": numpy_dtype,
    }
    model.save_pretrained(out)
    return {
        "format": "mlc-fake-quant",
        "group_size": MLC_GROUP_SIZE,
        "scale_dtype": numpy_dtype,
        "dtype": str(dtype).removeprefix("torch."),
        "modules": sorted(modules),
        "note": "weights are mlc-llm's group-quantized values, dequantized: the model computes what MLC q4 computes",
    }


def _import_gptqmodel():
    # gptqmodel sizes a CPU thread pool at import from GPTQMODEL_CPU_WORKERS, else cpu_count / 2, and its
    # model loader asks for 2 workers of it: on a 2-core host the default (1) makes loading fail.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
    import gptqmodel

    return gptqmodel


def _gptq(model_dir: Path, out: Path, *, bits: int, group_size: int, calibration: list[list[int]]) -> dict:
    gptqmodel = _import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    # offload_to_disk would write a temporary path into the saved config
    config = gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, offload_to_disk=False)
    model = gptqmodel.GPTQModel.load(str(model_dir), config, device="cpu")
    model.quantize([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration], batch_size=1)
    modules = sorted(name for name, module in model.model.named_modules() if isinstance(module, BaseQuantLinear))
    model.save(str(out))
    (out / "quant_log.csv").unlink(missing_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)  # gptqmodel saves its tokenizer copy; the caller copies the merged one
    return {
        "format": "gptq",
        "group_size": group_size,
        "calibration_samples": len(calibration),
        "calibration_tokens": sum(map(len, calibration)),
        "modules": modules,
    }


def load(method: str, model_dir: Path):
    """The quantized model in `model_dir`, loaded by the library that reads its format, in eval mode."""
    if method == "hqq":
        from hqq.models.hf.base import AutoHQQHFModel

        return AutoHQQHFModel.from_quantized(str(model_dir), device="cpu", compute_dtype=_dtype_of(model_dir)).eval()
    if method == "gptq":
        return _import_gptqmodel().GPTQModel.load(str(model_dir), device="cpu").model.eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu").eval()


CONVERSATIONS = (  # fixed probe conversations: the quantize step has no data input
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Write one sentence about rivers."},
    ],
    [
        {"role": "user", "content": "Count to five."},
        {"role": "assistant", "content": "1, 2, 3, 4, 5."},
        {"role": "user", "content": "Now backwards."},
    ],
)


def probes(tokenizer) -> list[list[int]]:
    """The fixed conversations rendered with the tokenizer's chat template, with the generation prompt."""
    rendered = []
    for messages in CONVERSATIONS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rendered.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return rendered


def compare(reference, model, prompts: list[list[int]], *, greedy_steps: int) -> dict:
    """Figures of `model` against `reference`: each prompt is extended by `greedy_steps` tokens the
    reference picks greedily, then both score the whole sequence; greedy agreement is the fraction of
    positions whose argmax agrees, the relative logit error max|Δ| / max|reference logit| per sequence."""
    import torch

    agree = positions = 0
    rel = absolute = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(greedy_steps):
                next_id = reference(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            want = reference(ids).logits[0].float()
            got = model(ids).logits[0].float()
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            positions += want.shape[0]
            diff = float((want - got).abs().max())
            absolute = max(absolute, diff)
            rel = max(rel, diff / float(want.abs().max()))
    return {
        "greedy_agreement": agree / positions,
        "max_rel_logit_error": rel,
        "max_abs_logit_error": absolute,
        "probes": len(prompts),
        "positions": positions,
    }
