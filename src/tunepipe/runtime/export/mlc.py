"""MLC-LLM export: the weight package `mlc_llm` serves, written from a merged model, and its verify.

    info = export(model_dir, out, type="q4f16_1", template=template_json, log=log)
    figures = verify(out, model_dir, probes, type="q4f16_1", template=template_json, log=log)

`out` receives what `mlc_llm convert_weight` + `mlc_llm gen_config` would write:
- `tensor-cache.json` + `params_shard_*.bin`, written and read with apache-tvm's `tvm.contrib.tvmjs`
  (dump_tensor_cache / load_tensor_cache): mlc-llm's parameter names per architecture (mlc_params.py),
  cast to the type's dtype, and for q4 types mlc-llm's group quantization (mlc_quant.py) of every
  Linear and embedding weight into `<module>.q_weight` (uint32) + `<module>.q_scale`;
- `mlc-chat-config.json` (mlc_config.py) with the conversation template derived from the pipeline's
  template, and the tokenizer files mlc-llm copies;
- `README-mlc.txt`: what is in the directory and the exact `mlc_llm compile` command that builds the
  model library. mlc-llm is not on PyPI; when `mlc_llm` is importable anyway, export runs that
  command and the library lands beside the weights.
For the tests' tiny llama, mistral, qwen2, qwen3, gemma, gemma2 and phi3 models the tensors are byte
for byte those of mlc-llm's own `convert_weight` (run from its sources on apache-tvm), and
`model_config` is its `gen_config`'s, with one deliberate difference: float32 tensors are stored
"raw", not "f32-to-bf16", so q0f32 and the q4f32_1 scales keep every bit (mlc-llm's runtime reads both).

verify loads the shards with tvm, dequantizes them, maps them back to HF names, loads them into a
float32 copy of the HF model and compares its logits with the original's on the probes (and on a
greedy continuation of each); it also reports the dequantization error of every stored parameter
against the exact float32 parameter computed from the HF weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tunepipe.errors import UserError
from tunepipe.runtime.export import mlc_config, mlc_params
from tunepipe.runtime.export.mlc_quant import dequantize_group, quantize_group

# type → (quantization bits or None, model dtype); mlc_llm/quantization/quantization.py
QUANTIZATIONS = {
    "q4f16_1": (4, "float16"),
    "q4f32_1": (4, "float32"),
    "q0f16": (None, "float16"),
    "q0f32": (None, "float32"),
}
SUPPORTED_TYPES = tuple(QUANTIZATIONS)
REQUIRES = (("tvm", "apache-tvm"), ("torch", "torch"), ("transformers", "transformers"))
GROUP_SIZE = 32  # the group size of every `_1` group quantization of mlc-llm
GREEDY_STEPS = 8  # verify: greedy tokens appended to each probe
TENSOR_CACHE = "tensor-cache.json"
CHAT_CONFIG = "mlc-chat-config.json"
README = "README-mlc.txt"


# ------------------------------------------------------------------------------------ shared
def _quantization(type: str) -> tuple[int | None, str]:
    if type not in QUANTIZATIONS:
        raise UserError(f"unknown MLC export type {type!r}", [f"MLC types: {', '.join(SUPPORTED_TYPES)}"])
    return QUANTIZATIONS[type]


def _tvmjs():
    try:
        from tvm.contrib import tvmjs
    except ImportError:
        raise UserError(
            "MLC export needs apache-tvm (its tensor-cache writer and loader)", ["pip install apache-tvm"]
        ) from None
    return tvmjs


def _load_hf(model_dir: Path):
    """(model in float32, tokenizer, config) of a merged model directory."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, transformers.AutoTokenizer.from_pretrained(model_dir), model.config


def _state(model) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}


def _renderer(template: dict[str, Any], tokenizer):
    """(render, history) of the pipeline's template: the generation prompt, and the conversation alone."""
    from tunepipe.runtime import chat_template

    if not template or not (
        "slots" in template or "chat_template" in template or template.get("source") == "tokenizer"
    ):
        raise UserError(
            "MLC export needs the pipeline's resolved template (template.json) for conv_template",
            ["export a model that went through the template stage"],
        )
    renderer = chat_template.renderer_from_json(template, tokenizer)
    return renderer.prompt, lambda messages: "".join(text for text, _ in renderer.segments(messages))


# ------------------------------------------------------------------------------------ export
def _mlc_tensors(params: dict[str, np.ndarray], bits: int | None, dtype: str) -> dict[str, np.ndarray]:
    """The stored tensors: every parameter in `dtype`; with `bits`, 2-D weights (mlc-llm's Linear and
    Embedding modules, in these architectures) group-quantized into q_weight + q_scale."""
    tensors: dict[str, np.ndarray] = {}
    for name, array in params.items():
        if bits is None or array.ndim != 2:
            tensors[name] = array.astype(dtype)
            continue
        module = name.removesuffix(".weight")
        tensors[f"{module}.q_weight"], tensors[f"{module}.q_scale"] = quantize_group(
            array, bits=bits, group_size=GROUP_SIZE, dtype=dtype
        )
    return tensors


def _write_tensor_cache(
    tvmjs, tensors: dict[str, np.ndarray], out: Path, source_params: int, log: logging.Logger
) -> dict[str, Any]:
    nbytes = float(sum(t.nbytes for t in tensors.values()))
    metadata = {"ParamSize": len(tensors), "ParamBytes": nbytes, "BitsPerParam": nbytes * 8.0 / source_params}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # tvmjs reports progress with print()
        tvmjs.dump_tensor_cache(tensors, str(out), encode_format="raw", meta_data=metadata, show_progress=False)
    log.info("tvmjs: %s", " ".join(printed.getvalue().split()))
    return metadata


def _tokenizer_files(model_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """(the tokenizer files mlc-llm copies that model_dir has, mlc-llm's tokenizer info)."""
    files = [name for name in mlc_config.TOKENIZER_FILES if (model_dir / name).is_file()]
    tokenizer_json = model_dir / "tokenizer.json"
    info = mlc_config.tokenizer_info(
        json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else {}
    )
    return files, info


def _generation_fields(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults and token ids from generation_config.json, then config.json (gen_config's order)."""
    fields: dict[str, Any] = {}
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            for key, value in json.loads(path.read_text(encoding="utf-8")).items():
                if value is not None:
                    fields.setdefault(key, value)
    return fields


def conv_template(template: dict[str, Any], tokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mlc-llm conv_template, check report) for the pipeline's template.json and tokenizer."""
    render, history = _renderer(template, tokenizer)
    bos = tokenizer.bos_token
    return mlc_config.conversation(
        render,
        history,
        name=f"tunepipe-{template.get('name', 'template')}",
        bos_token=bos,
        bos_token_id=tokenizer.bos_token_id if bos else None,
        stop_words=list(template.get("stop_words") or []),
        stop_token_ids=list(template.get("stop_token_ids") or [tokenizer.eos_token_id]),
    )


def compile_command(model_type: str, type: str) -> list[str]:
    """The `mlc_llm compile` command that builds this package's model library, run in its directory."""
    return ["mlc_llm", "compile", CHAT_CONFIG, "--device", "auto", "-o", f"{model_type}-{type}-auto.so"]


def _build_library(out: Path, command: list[str], log: logging.Logger) -> dict[str, Any]:
    """Run `mlc_llm compile` when mlc_llm is importable; otherwise say what to run."""
    shown = " ".join(command)
    if importlib.util.find_spec("mlc_llm") is None:
        return {
            "built": False,
            "reason": "mlc_llm is not installed (it is not on PyPI)",
            "command": shown,
            "cwd": str(out),
        }
    log.info("building the model library: %s", shown)
    done = subprocess.run([sys.executable, "-m", *command], check=False, cwd=out, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(
            f"`{shown}` failed with exit status {done.returncode}",
            (done.stdout + done.stderr).strip().splitlines()[-20:],
        )
    return {"built": True, "command": shown, "cwd": str(out), "library": command[-1]}


def _readme(model_type: str, type: str, library: dict[str, Any], conv_check: dict[str, Any], notes: list[str]) -> str:
    lines = [
        f"MLC-LLM weight package: {model_type}, quantization {type}, written by tunepipe.",
        "",
        "Files: mlc-chat-config.json, tensor-cache.json + params_shard_*.bin (the weights), tokenizer files.",
        "",
    ]
    if library["built"]:
        lines += [f"The model library {library['library']} was built here with:", f"    {library['command']}"]
    else:
        lines += [
            "The model library is not built: " + library["reason"] + ".",
            "Build it in this directory with mlc-llm installed (replace `auto` with cuda, metal, vulkan, ...",
            "to build for another device):",
            f"    {library['command']}",
            "then serve it with",
            f"    mlc_llm serve . --model-lib {library['command'].split()[-1]}",
        ]
    lines.append("")
    if not conv_check["system_messages"]:
        lines += [
            "Conversation template: the pipeline's template has no default system prompt, and mlc-llm always",
            "renders its system_template, so system_template holds no {system_message}: a request's system",
            "message is not rendered. Prompts without one are exactly the trained ones.",
            "",
        ]
    if not conv_check["matches"]:
        lines += [
            "WARNING: mlc-llm's prompt differs from the pipeline's for "
            + json.dumps(conv_check["differs"]["messages"]),
            "",
        ]
    lines += [f"Note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def export(model_dir: Path, out: Path, *, type: str, template: dict, log: logging.Logger) -> dict:
    """Write the MLC package of the merged model in `model_dir` into `out` (see the module docstring)."""
    bits, dtype = _quantization(type)
    tvmjs = _tvmjs()
    model_dir, out = Path(model_dir), Path(out)
    model, tokenizer, config = _load_hf(model_dir)
    layout = mlc_params.layout_for(config)
    conv, conv_check = conv_template(template, tokenizer)
    tokenizer_files, tokenizer_info = _tokenizer_files(model_dir)
    chat = mlc_config.chat_config(
        config,
        layout.model_type,
        type,
        conv,
        tokenizer_files=tokenizer_files,
        tokenizer_info=tokenizer_info,
        active_vocab_size=len(tokenizer),
        generation=_generation_fields(model_dir),
    )
    state = _state(model)
    tensors = _mlc_tensors(mlc_params.to_mlc(state, layout, config), bits, dtype)
    source_params = sum(
        a.size for n, a in state.items() if not (n == mlc_params.LM_HEAD and config.tie_word_embeddings)
    )
    out.mkdir(parents=True, exist_ok=True)
    metadata = _write_tensor_cache(tvmjs, tensors, out, source_params, log)
    for name in tokenizer_files:
        shutil.copyfile(model_dir / name, out / name)
    mlc_config.dump(out / CHAT_CONFIG, chat)
    if not conv_check["matches"]:
        log.warning("mlc-llm's prompt differs from the pipeline's: %s", conv_check["differs"])
    notes = mlc_config.runtime_notes(config)
    library = _build_library(out, compile_command(layout.model_type, type), log)
    (out / README).write_text(_readme(layout.model_type, type, library, conv_check, notes), encoding="utf-8")
    log.info("MLC %s: %d tensors, %.2f bits per parameter", type, len(tensors), metadata["BitsPerParam"])
    return {
        "format": "mlc",
        "type": type,
        "model_type": layout.model_type,
        "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
        "tensors": len(tensors),
        "param_bytes": int(metadata["ParamBytes"]),
        "bits_per_param": metadata["BitsPerParam"],
        "quantized": sorted(n.removesuffix(".q_weight") for n in tensors if n.endswith(".q_weight")),
        "conv_template": conv_check,
        "library": library,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------ verify
def _load_tensor_cache(tvmjs, export_dir: Path) -> dict[str, np.ndarray]:
    import tvm

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        loaded, _ = tvmjs.load_tensor_cache(str(export_dir / TENSOR_CACHE), tvm.cpu())
    return {name: tensor.numpy() for name, tensor in loaded.items()}


def _dequantize(tensors: dict[str, np.ndarray], bits: int | None, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """mlc-llm's parameters back in float32 (q_weight + q_scale → weight, trimmed to `shapes`)."""
    params: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if name.endswith(".q_scale"):
            continue
        if name.endswith(".q_weight"):
            module = name.removesuffix(".q_weight")
            weight = f"{module}.weight"
            params[weight] = dequantize_group(
                array, tensors[f"{module}.q_scale"], bits=bits, group_size=GROUP_SIZE, k=shapes[weight][-1]
            ).astype(np.float32)
        else:
            params[name] = array.astype(np.float32)
    return params


def _dequant_errors(restored: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per stored parameter (mlc-llm's name): max |restored - original| and that over max |original|,
    where original is the float32 parameter computed from the HF weights; and the worst of each."""
    per_tensor = {}
    for name in sorted(restored):
        delta = float(np.abs(restored[name] - original[name]).max())
        scale = float(np.abs(original[name]).max())
        per_tensor[name] = {"max_abs": delta, "max_rel": delta / scale if scale else delta}
    worst = max(per_tensor, key=lambda n: per_tensor[n]["max_rel"])
    return {
        "max_abs": max(v["max_abs"] for v in per_tensor.values()),
        "max_rel": per_tensor[worst]["max_rel"],
        "worst_tensor": worst,
        "tensors": per_tensor,
    }


def _restored_model(model_dir: Path, state: dict[str, np.ndarray], config):
    import torch

    model, _, _ = _load_hf(model_dir)
    result = model.load_state_dict({n: torch.from_numpy(a) for n, a in state.items()}, strict=False)
    tied = {mlc_params.LM_HEAD} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise RuntimeError(
            f"MLC tensors do not cover the model: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    return model


def _continue_greedily(model, ids: list[int], steps: int) -> list[int]:
    import torch

    sequence = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(logits.argmax()))
    return sequence


def _compare(reference, candidate, probes: list[list[int]]) -> dict[str, Any]:
    import torch

    abs_err = rel_err = 0.0
    agree = positions = 0
    with torch.no_grad():
        for probe in probes:
            sequence = torch.tensor([_continue_greedily(reference, probe, GREEDY_STEPS)])
            want, got = reference(sequence).logits[0], candidate(sequence).logits[0]
            delta = float((want - got).abs().max())
            abs_err = max(abs_err, delta)
            rel_err = max(rel_err, delta / float(want.abs().max()))
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            positions += want.shape[0]
    return {
        "max_rel_logit_error": rel_err,
        "max_abs_logit_error": abs_err,
        "greedy_agreement": agree / positions,
        "probes": len(probes),
        "positions": positions,
    }


def verify(
    export_dir: Path, model_dir: Path, probes: list[list[int]], *, type: str, template: dict, log: logging.Logger
) -> dict:
    """Figures of the MLC package in `export_dir` against the merged model in `model_dir` (module docstring)."""
    bits, _ = _quantization(type)
    tvmjs = _tvmjs()
    export_dir, model_dir = Path(export_dir), Path(model_dir)
    if not probes:
        raise UserError("MLC verify needs at least one probe (token ids of a prompt)")
    chat = json.loads((export_dir / CHAT_CONFIG).read_text(encoding="utf-8"))
    if chat["quantization"] != type:
        raise UserError(f"{export_dir} holds an MLC {chat['quantization']} export, not {type}")
    reference, tokenizer, config = _load_hf(model_dir)
    layout = mlc_params.layout_for(config)
    original = _state(reference)
    expected = mlc_params.to_mlc(original, layout, config)
    params = _dequantize(_load_tensor_cache(tvmjs, export_dir), bits, {n: a.shape for n, a in expected.items()})
    errors = _dequant_errors(params, expected)
    restored = mlc_params.from_mlc(params, layout, config)
    figures = _compare(reference, _restored_model(model_dir, restored, config), probes)
    render, _ = _renderer(template, tokenizer)
    conv_check = mlc_config.check(chat["conv_template"], render, tokenizer.bos_token)
    log.info(
        "MLC %s: greedy agreement %.3f, max rel logit error %.3g, worst dequantized tensor %s (%.3g)",
        type,
        figures["greedy_agreement"],
        figures["max_rel_logit_error"],
        errors["worst_tensor"],
        errors["max_rel"],
    )
    return {
        **figures,
        "type": type,
        "max_dequant_error": errors,
        "conv_template": conv_check,
        "runtime": f"tvm {_tvm_version()} tensor cache, dequantized into transformers' {layout.model_type}",
    }


def _tvm_version() -> str:
    import tvm

    return str(tvm.__version__)
