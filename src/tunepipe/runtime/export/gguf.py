"""GGUF export (llama.cpp, Ollama) of a merged model directory, and its verification in llama.cpp.

    export(model_dir, out, type="q8_0", template=template_json, log=log)
        → out/model.gguf + out/Modelfile; returns the manifest info
    verify(out, model_dir, probes, type="q8_0", template=template_json, log=log)
        → {"max_rel_logit_error", "max_abs_logit_error", "greedy_agreement", "probes", "positions",
           "chat_template_tokens_match", ...}   (gguf_verify.py)

The file is written with the `gguf` package: GGUFWriter, gguf's tensor-name maps, `gguf.quants` for
f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1. Tensors are streamed: every tensor's name, shape and type is
declared first (their sizes are known from the safetensors headers), then each is read from its
shard, transformed, quantized and written before the next is read — memory holds about one tensor.
k-quants (q4_k_m, …) are llama.cpp's own C++ quantizer: the model is written losslessly (in its stored
precision) to a temporary GGUF that `llama_cpp.llama_model_quantize` (llama-cpp-python) rewrites.
Which tensors stay f32 follows llama.cpp's converter: 1-D tensors, norms and biases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunepipe.errors import UserError
from tunepipe.runtime.export import gguf_arch, gguf_vocab

FILE = "model.gguf"
MODELFILE = "Modelfile"
# Written by gguf.quants (the GGUF's name of each type is the upper-cased name).
WRITTEN_TYPES = ("f16", "f32", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# Quantized by llama.cpp's llama_model_quantize: type → gguf.LlamaFileType member.
K_QUANTS = {
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q2_k": "MOSTLY_Q2_K",
}
SUPPORTED_TYPES: tuple[str, ...] = (*WRITTEN_TYPES, *K_QUANTS)
REQUIRES: tuple[tuple[str, str], ...] = (
    ("gguf", "gguf"),
    ("safetensors", "safetensors"),
    ("llama_cpp", "llama-cpp-python"),
)
LLAMA_CPP = ("llama_cpp", "llama-cpp-python")
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
}
# The lossless intermediate a k-quant starts from, by the weights' stored dtype.
LOSSLESS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def requires(type: str, verify: bool) -> tuple[tuple[str, str], ...]:
    """(import, pip) names an export of `type` needs: llama-cpp-python for k-quants and for verify."""
    base = REQUIRES[:2]
    return (*base, LLAMA_CPP) if verify or type in K_QUANTS else base


def export(model_dir: Path, out: Path, *, type: str, template: dict, log: logging.Logger) -> dict:
    from tunepipe.runtime.export import modelfile

    model_dir, out = Path(model_dir), Path(out)
    check_type(type)
    config = _config(model_dir)
    arch = gguf_arch.architecture(config)
    chat_template, chat_source = embedded_chat_template(model_dir, template)
    if type in K_QUANTS:
        _import_llama_cpp(f"type {type} (a k-quant)")
        lossless = LOSSLESS.get(str(config.get("dtype") or config.get("torch_dtype")), "f32")
        staging = out / f"model.{lossless}.gguf"
        try:
            info = write_gguf(model_dir, staging, config, arch, lossless, chat_template, log)
            quantize_k(staging, out / FILE, type, log)
        finally:
            staging.unlink(missing_ok=True)
        info.update(type=type, k_quant_from=lossless, tensor_types=tensor_type_counts(out / FILE))
    else:
        info = write_gguf(model_dir, out / FILE, config, arch, type, chat_template, log)
    modelfile_text = modelfile.modelfile(template, FILE, added_bos=info["tokenizer"].get("added_bos") or "")
    (out / MODELFILE).write_text(modelfile_text, encoding="utf-8")
    info["chat_template_source"] = chat_source
    info["files"] = {name: (out / name).stat().st_size for name in (FILE, MODELFILE)}
    return info


def tensor_type_counts(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def check_type(type: str) -> None:
    if type not in SUPPORTED_TYPES:
        raise UserError(
            f"GGUF type {type!r} is not one of {', '.join(SUPPORTED_TYPES)}",
            [
                (
                    f"{', '.join(WRITTEN_TYPES)} are written directly; {', '.join(K_QUANTS)} by llama.cpp's "
                    "quantizer (needs llama-cpp-python)"
                )
            ],
        )


def _config(model_dir: Path) -> dict[str, Any]:
    """The model's effective config (defaults of its class filled in), as transformers loads it."""
    import transformers

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no config.json", ["GGUF export reads a merged model directory"])
    return transformers.AutoConfig.from_pretrained(model_dir).to_dict()


def embedded_chat_template(model_dir: Path, template: dict) -> tuple[str | None, str]:
    """(Jinja chat template, where it came from): the model directory's own — what merge saved with the
    tokenizer, the template the pipeline trained with — else the template.json's."""
    config_file = model_dir / "tokenizer_config.json"
    if config_file.is_file():
        text = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(text, str):
            return text, "tokenizer_config.json"
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja"
    if template.get("chat_template"):
        return template["chat_template"], "template.json"
    if template.get("slots"):
        from tunepipe.runtime.chat_template import SlotRenderer

        return SlotRenderer(template["slots"]).to_jinja(), "template.json"
    return None, "none"


# ------------------------------------------------------------------------------------ writing
def write_gguf(
    model_dir: Path,
    path: Path,
    config: dict,
    arch: gguf_arch.Arch,
    type: str,
    chat_template: str | None,
    log: logging.Logger,
) -> dict[str, Any]:
    import gguf

    plan = gguf_arch.plan_tensors(model_dir, config, arch)
    qtypes = [tensor_type(t, type, plan) for t in plan]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    writer.add_type("model")
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_arch.write_hparams(writer, config, arch, config["vocab_size"], log)
    vocab = gguf_vocab.write_vocab(writer, model_dir, config, chat_template, log)
    if vocab.get("llama_cpp_name"):
        writer.add_name(vocab["llama_cpp_name"])
    for tensor, qtype in zip(plan, qtypes):
        writer.add_tensor_info(tensor.name, *_stored_layout(tensor.shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor, qtype in zip(plan, qtypes):
        writer.write_tensor_data(gguf.quants.quantize(tensor.load(), qtype))
    writer.close()
    counts: dict[str, int] = {}
    for qtype in qtypes:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    log.info("wrote %s: %s, %d tensors (%s)", path.name, arch.gguf_arch.lower(), len(plan), counts)
    return {
        "type": type,
        "arch": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]],
        "tensors": len(plan),
        "tensor_types": counts,
        "tokenizer": vocab,
    }


def tensor_type(tensor: gguf_arch.PlannedTensor, type: str, plan: list[gguf_arch.PlannedTensor]):
    """The GGML type of one tensor in a file of `type` (llama.cpp's converter's rules: 1-D tensors,
    norms and biases stay F32; a row length the block size does not divide falls back to F16).
    4/5-bit files keep the output projection (or the tied embedding serving as it) at Q8_0:
    llama.cpp's quantizer gives it Q6_K, which gguf.quants cannot write."""
    import gguf

    if len(tensor.shape) <= 1 or tensor.name.endswith("_norm.weight") or not tensor.name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[type.upper()]
    has_output = any(t.name == "output.weight" for t in plan)
    is_output = tensor.name == "output.weight" or (tensor.name == "token_embd.weight" and not has_output)
    if is_output and type in ("q4_0", "q4_1", "q5_0", "q5_1"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _stored_layout(shape: tuple[int, ...], qtype) -> tuple[tuple[int, ...], Any, int]:
    """(shape, numpy dtype, bytes) of what gguf.quants.quantize returns for a tensor of `shape`:
    the float array itself for F32/F16, the packed bytes (uint8) for every block type and BF16."""
    import gguf
    import numpy as np

    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    if qtype in floats:
        return shape, floats[qtype], int(np.prod(shape)) * np.dtype(floats[qtype]).itemsize
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.uint8, int(np.prod(byte_shape))


# ----------------------------------------------------------------------------------- k-quants
def _import_llama_cpp(what: str):
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"GGUF {what} needs llama-cpp-python (llama.cpp's quantizer and runtime)",
            [
                (
                    "pip install llama-cpp-python (builds llama.cpp from source; for a portable CPU "
                    "build CMAKE_ARGS='-DGGML_NATIVE=OFF')"
                ),
                "or choose one of " + ", ".join(WRITTEN_TYPES),
            ],
        ) from None
    return llama_cpp


def quantize_k(source: Path, dest: Path, type: str, log: logging.Logger) -> None:
    """llama.cpp's llama_model_quantize: the same mixes as `llama-quantize <src> <dst> Q4_K_M`."""
    import ctypes

    import gguf

    llama_cpp = _import_llama_cpp(f"type {type} (a k-quant)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[K_QUANTS[type]])
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama_model_quantize({source.name} → {type}) failed with status {status}")
    log.info("quantized %s → %s (%s) with llama.cpp", source.name, dest.name, type)


# ------------------------------------------------------------------------------------- verify
def verify(
    export_dir: Path, model_dir: Path, probes: list[list[int]], *, type: str, template: dict, log: logging.Logger
) -> dict:
    from tunepipe.runtime.export import gguf_verify

    _import_llama_cpp("verification")
    return gguf_verify.verify(Path(export_dir) / FILE, Path(model_dir), probes, template=template, log=log)
