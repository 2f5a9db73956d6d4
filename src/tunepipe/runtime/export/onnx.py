"""ONNX export of a merged causal LM with its KV cache, verified in onnxruntime.

`export(model_dir, out, type=..., template=..., log=...)` writes into `out`:

    model.onnx + model.onnx.data   one decoder graph, its weights in the external-data file:
        inputs   input_ids [batch_size, sequence_length] int64
                 attention_mask [batch_size, total_sequence_length] int64 (1 = attend, 0 = padding)
                 position_ids [batch_size, sequence_length] int64
                 past_key_values.{i}.key / .value [batch_size, kv_heads, past_sequence_length, head_dim]
        outputs  logits [batch_size, sequence_length, vocab]
                 present.{i}.key / .value [batch_size, kv_heads, total_sequence_length, head_dim]
        A prefill passes past tensors of length 0; each decode step passes the presents back as past.
    genai_config.json               onnxruntime-genai's description of that graph and its search defaults
    generation_config.json          the model's, with the template's stop tokens among its eos ids
    the tokenizer files             copied from model_dir

`type`: fp32 (the graph as traced, float32), int8 (onnxruntime's dynamic quantization: MatMul weights
int8, their activations quantized at run time) or int4 (onnxruntime's MatMulNBits: 4-bit symmetric
blocks of INT4_BLOCK_SIZE weights).

The graph comes from transformers' own exporter (`transformers.exporters.OnnxExporter`: torch.export,
then torch.onnx/onnxscript, with transformers' patches for its models), traced with a real DynamicCache
as its `cache`; this module only renames the graph's inputs, outputs and dims to
onnxruntime-genai's convention.

`verify(...)` runs each probe in an onnxruntime CPU session, a prefill of the probe then
onnx_common.DECODE_STEPS steps that feed the presents back as past, next to the HF model in float32
with its own cache. Both are fed the same tokens (the HF model's greedy continuation), so one
disagreement does not derail the rest; it returns the logit errors and the argmax agreement, and
decides nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from tunepipe.runtime.export import onnx_common as common

SUPPORTED_TYPES = ("fp32", "int8", "int4")
REQUIRES = (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"))

MODEL_FILE = "model.onnx"
DATA_FILE = f"{MODEL_FILE}.data"
INT4_BLOCK_SIZE = 32
PAST_NAMES = ("past_key_values.{}.key", "past_key_values.{}.value")
PRESENT_NAMES = ("present.{}.key", "present.{}.value")


# ── export ──────────────────────────────────────────────────────────────────


def export(model_dir: Path, out: Path, *, type: str, template: dict, log: logging.Logger) -> dict:
    """Write the graph for `type`, its configs and the tokenizer into `out`; returns the manifest info."""
    common.check_type("ONNX", type, SUPPORTED_TYPES)
    common.require("ONNX", REQUIRES)
    import onnx_ir
    import torch
    import transformers

    model_dir, out = Path(model_dir), Path(out)
    model = common.load_model(model_dir)
    log.info("tracing %s (%s) with transformers' OnnxExporter", model_dir, model.config.model_type)
    started = time.monotonic()
    program = _trace(model, type)
    layers = _name_graph(program.graph)
    if type == "int4":
        program = _quantize_int4(program)
    log.info("traced and converted in %.1f s", time.monotonic() - started)

    out.mkdir(parents=True, exist_ok=True)
    onnx_ir.save(program, str(out / MODEL_FILE), external_data=DATA_FILE)
    generation, tokenizer_files = common.write_side_files(model_dir, out, model.config, template)
    kv_heads, head_dim = _kv_dims(program.graph)
    genai = _genai_config(model.config, generation, layers=layers, kv_heads=kv_heads, head_dim=head_dim)
    (out / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")
    return {
        "type": type,
        "exporter": f"transformers {transformers.__version__} OnnxExporter (torch {torch.__version__})",
        "opset": next(version for domain, version in program.opset_imports.items() if domain == ""),
        "layers": layers,
        "inputs": [value.name for value in program.graph.inputs],
        "outputs": [value.name for value in program.graph.outputs],
        "quantization": _quantization_info(type, program.graph),
        "tokenizer_files": tokenizer_files,
        "files": {path.name: path.stat().st_size for path in sorted(out.iterdir()) if path.is_file()},
    }


def _trace(model, type: str):
    """The model as an `onnx_ir.Model`, int8-quantized by the exporter itself when `type` is int8."""
    import torch
    from transformers.exporters import (
        OnnxConfig,
        OnnxExporter,
        OnnxRuntimeDynamicConfig,
        OnnxRuntimeQuantizer,
    )

    inputs = common.sample_inputs(model)
    quantizer = None
    if type == "int8":
        # onnxruntime's defaults, per-tensor weights: per-channel int8 without reduce_range saturates in the
        # u8s8 kernels of CPUs without VNNI (rel. logit error 0.80 against 0.16 on a tiny llama).
        quantizer = OnnxRuntimeQuantizer(OnnxRuntimeDynamicConfig(op_types_to_quantize=["MatMul"]))
    config = OnnxConfig(dynamic_shapes=common.dynamic_shapes(inputs), quantizer=quantizer)
    with torch.no_grad():
        return OnnxExporter().export(model, inputs, config).program


def _name_graph(graph) -> int:
    """Rename the traced cache inputs/outputs to past_key_values.{i}.key|value / present.{i}.key|value and
    the dims to onnxruntime-genai's names; returns the number of layers. Fails on a graph of another form."""
    layers = set()
    for values, names in ((graph.inputs, PAST_NAMES), (graph.outputs, PRESENT_NAMES)):
        for value in values:
            match = common.CACHE_LEAF.search(value.name)
            if match:
                layers.add(int(match[1]))
                value.name = names[match[2] == "values"].format(match[1])
    expected_inputs = ["input_ids", "attention_mask", "position_ids"]
    expected_outputs = ["logits"]
    for layer in sorted(layers):
        expected_inputs += [name.format(layer) for name in PAST_NAMES]
        expected_outputs += [name.format(layer) for name in PRESENT_NAMES]
    actual = ([value.name for value in graph.inputs], [value.name for value in graph.outputs])
    if actual != (expected_inputs, expected_outputs) or sorted(layers) != list(range(len(layers))):
        raise RuntimeError(
            f"the traced graph has inputs {actual[0]} and outputs {actual[1]}, "
            f"expected {expected_inputs} and {expected_outputs}"
        )
    _name_dims(graph)
    return len(layers)


def _name_dims(graph) -> None:
    """Give the traced symbols (`s44`, `s36 + s70`) the names they have in onnxruntime-genai's graphs, in
    every value's shape: the inputs say which symbol is which."""
    import onnx_ir

    inputs = {value.name: value for value in graph.inputs}
    outputs = {value.name: value for value in graph.outputs}
    names = {
        inputs["input_ids"].shape[0]: "batch_size",
        inputs["input_ids"].shape[1]: "sequence_length",
        inputs["past_key_values.0.key"].shape[2]: "past_sequence_length",
        inputs["attention_mask"].shape[0]: "batch_size",
        inputs["attention_mask"].shape[1]: "total_sequence_length",
        outputs["present.0.key"].shape[2]: "total_sequence_length",
    }
    whole = {str(dim.value): name for dim, name in names.items() if isinstance(dim, onnx_ir.SymbolicDim)}
    symbols = {symbol: name for symbol, name in whole.items() if re.fullmatch(r"\w+", symbol)}
    token = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b") if symbols else None

    def rename(dim):
        if not isinstance(dim, onnx_ir.SymbolicDim) or dim.value is None:
            return dim
        if dim.value in whole:
            return onnx_ir.SymbolicDim(whole[dim.value])
        return onnx_ir.SymbolicDim(token.sub(lambda m: symbols[m[1]], dim.value)) if token else dim

    values = [*graph.inputs, *(output for node in graph.all_nodes() for output in node.outputs)]
    for value in dict.fromkeys(values):
        if value.shape is not None:
            value.shape = onnx_ir.Shape([rename(dim) for dim in value.shape])


def _quantize_int4(program):
    """onnxruntime's MatMulNBits 4-bit quantization of the program's MatMul weights, as a new program."""
    import onnx_ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx_ir.to_proto(program),
        bits=4,
        block_size=INT4_BLOCK_SIZE,
        is_symmetric=True,
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return onnx_ir.from_proto(quantizer.model.model)


def _quantization_info(type: str, graph) -> dict | None:
    """What the quantizer did, with the number of MatMuls it replaced and the number it left in float."""
    ops = [node.op_type for node in graph.all_nodes()]
    if type == "int8":
        return {
            "method": "onnxruntime quantize_dynamic",
            "weights": "int8 per tensor",
            "activations": "uint8, quantized at run time",
            "quantized_matmuls": ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul"),
            "float_matmuls": ops.count("MatMul"),
        }
    if type == "int4":
        return {
            "method": "onnxruntime MatMulNBitsQuantizer",
            "weights": "int4 symmetric",
            "block_size": INT4_BLOCK_SIZE,
            "quantized_matmuls": ops.count("MatMulNBits"),
            "float_matmuls": ops.count("MatMul"),
        }
    return None


def _kv_dims(graph) -> tuple[int, int]:
    """(kv heads, head dim) of the graph's cache: fixed axes 1 and 3 of its past inputs."""
    shape = next(value.shape for value in graph.inputs if value.name == PAST_NAMES[0].format(0))
    return int(shape[1]), int(shape[3])


def _genai_config(config, generation, *, layers: int, kv_heads: int, head_dim: int) -> dict:
    """onnxruntime-genai's genai_config.json for the graph this module writes."""
    eos = generation.eos_token_id
    model = {
        "context_length": config.max_position_embeddings,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE,
            "head_size": head_dim,
            "hidden_size": config.hidden_size,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": PAST_NAMES[0].replace("{}", "%d"),
                "past_value_names": PAST_NAMES[1].replace("{}", "%d"),
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": PRESENT_NAMES[0].replace("{}", "%d"),
                "present_value_names": PRESENT_NAMES[1].replace("{}", "%d"),
            },
            "num_attention_heads": config.num_attention_heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads,
        },
        "eos_token_id": eos,
        "pad_token_id": generation.pad_token_id,
        "type": config.model_type,
        "vocab_size": config.vocab_size,
    }
    if generation.bos_token_id is not None:
        model["bos_token_id"] = generation.bos_token_id
    search = {
        "diversity_penalty": 0.0,
        "do_sample": bool(generation.do_sample),
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": config.max_position_embeddings,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": generation.num_beams or 1,
        "num_return_sequences": 1,
        # The graph concatenates past and new keys into a fresh present: no buffer to share.
        "past_present_share_buffer": False,
        "repetition_penalty": generation.repetition_penalty or 1.0,
        "temperature": generation.temperature if generation.temperature is not None else 1.0,
        "top_k": generation.top_k if generation.top_k is not None else 50,
        "top_p": generation.top_p if generation.top_p is not None else 1.0,
    }
    return {"model": model, "search": search}


# ── verify ──────────────────────────────────────────────────────────────────


def verify(
    export_dir: Path, model_dir: Path, probes: list[list[int]], *, type: str, template: dict, log: logging.Logger
) -> dict:
    """Compare the exported graph in onnxruntime with the HF model over each probe's prefill and its
    cached decode steps; returns the figures (see onnx_common.compare)."""
    common.check_type("ONNX", type, SUPPORTED_TYPES)
    common.require("ONNX", REQUIRES)
    probes = common.check_probes("ONNX", probes)
    runtime = OnnxDecoder(Path(export_dir) / MODEL_FILE)
    figures = common.compare(runtime, common.load_model(model_dir), probes, format="ONNX", type=type)
    log.info("onnxruntime vs HF: %s", figures)
    return figures


class OnnxDecoder:
    """An onnxruntime CPU session over the exported graph, fed the way a generation loop feeds it:
    `start()` opens a sequence with an empty past, `step(tokens)` returns their logits [n, vocab]."""

    def __init__(self, path: Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # onnxruntime sizes its pool by the machine's cores, not the ones this process may use.
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past = [spec for spec in self.session.get_inputs() if spec.name.startswith("past_key_values.")]
        self.outputs = [spec.name for spec in self.session.get_outputs()]

    def start(self) -> OnnxDecoder:
        import numpy as np

        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.cache = {
            spec.name: np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtypes[spec.type]) for spec in self.past
        }
        self.length = 0
        return self

    def step(self, tokens: list[int]):
        import numpy as np

        end = self.length + len(tokens)
        feed = {
            "input_ids": np.array([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(self.length, end, dtype=np.int64)[None],
            **self.cache,
        }
        results = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        self.cache = {spec.name: results[spec.name.replace("past_key_values.", "present.")] for spec in self.past}
        self.length = end
        return results["logits"][0].astype(np.float32)
