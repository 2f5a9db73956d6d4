"""ExecuTorch export of a merged causal LM with its KV cache, lowered to XNNPACK, verified in ExecuTorch's
runtime.

`export(model_dir, out, type=..., template=..., log=...)` writes into `out`:

    model.pte      the program's `forward`, for one sequence (batch 1), its inputs and outputs positional:
        inputs   input_ids [1, n] int64 (n <= MAX_CHUNK new tokens), attention_mask [1, past + n] int64,
                 position_ids [1, n] int64, then for each layer i: key_i, value_i [1, kv_heads, past, head_dim]
        outputs  logits [1, n, vocab], then for each layer: key_i, value_i [1, kv_heads, past + n, head_dim]
        past + n <= the context (the model's, at most MAX_CONTEXT): XNNPACK's memory planner sizes its
        buffers from these bounds. A longer prompt is fed in chunks of MAX_CHUNK.
    export.json    transformers' manifest of the program (`ExportedModel.from_pretrained(out)` runs it)
    config.json, generation_config.json (eos ids + the template's stop tokens), the tokenizer files.

`type`: fp32 only (XNNPACK in float32).

The program comes from transformers' own exporter (`transformers.exporters.ExecutorchExporter`:
torch.export, then `to_edge_transform_and_lower` with the XNNPACK partitioner, then `to_executorch`),
traced with the sample step of the ONNX export (onnx_common) at batch 1. `verify(...)` loads the .pte in
ExecuTorch's runtime and runs each probe, a prefill then onnx_common.DECODE_STEPS decode steps, against
the HF model (onnx_common.compare).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunepipe.runtime.export import onnx_common as common

SUPPORTED_TYPES = ("fp32",)
REQUIRES = (("executorch", "executorch"),)

MODEL_FILE = "model.pte"
# Bounds the memory planner allocates for: the longest context, and the most tokens one call takes
# (the logits buffer is MAX_CHUNK x vocab floats).
MAX_CONTEXT = 2048
MAX_CHUNK = 128


def export(model_dir: Path, out: Path, *, type: str, template: dict, log: logging.Logger) -> dict:
    """Write the XNNPACK-lowered program, its configs and the tokenizer into `out`; returns the manifest info."""
    common.check_type("ExecuTorch", type, SUPPORTED_TYPES)
    common.require("ExecuTorch", REQUIRES)
    import torch
    import transformers
    from transformers.exporters import ExecutorchConfig, ExecutorchExporter
    from transformers.exporters.utils import get_leaf_tensors

    model_dir, out = Path(model_dir), Path(out)
    model = common.load_model(model_dir)
    context = min(model.config.max_position_embeddings, MAX_CONTEXT)
    chunk = min(context, MAX_CHUNK)
    log.info(
        "tracing %s (%s) with transformers' ExecutorchExporter (XNNPACK, context %d, chunks of %d)",
        model_dir,
        model.config.model_type,
        context,
        chunk,
    )
    started = time.monotonic()
    inputs = common.sample_inputs(model, batch=1)
    layers = sum(1 for path in get_leaf_tensors(inputs["cache"]) if path.endswith(".keys"))
    shapes = common.dynamic_shapes(inputs, dynamic_batch=False, max_sequence=chunk, max_context=context)
    with torch.no_grad():
        exported = ExecutorchExporter().export(model, inputs, ExecutorchConfig(dynamic_shapes=shapes))
    log.info("traced and lowered in %.1f s", time.monotonic() - started)

    out.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(out)
    _, tokenizer_files = common.write_side_files(model_dir, out, model.config, template)
    cache = [f"{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")]
    return {
        "type": type,
        "exporter": f"transformers {transformers.__version__} ExecutorchExporter (XNNPACK)",
        "inputs": ["input_ids", "attention_mask", "position_ids", *cache],
        "outputs": ["logits", *cache],
        "layers": layers,
        "max_context": context,
        "max_chunk": chunk,
        "tokenizer_files": tokenizer_files,
        "files": {path.name: path.stat().st_size for path in sorted(out.iterdir()) if path.is_file()},
    }


def verify(
    export_dir: Path, model_dir: Path, probes: list[list[int]], *, type: str, template: dict, log: logging.Logger
) -> dict:
    """Compare the program in ExecuTorch's runtime with the HF model over each probe's prefill and its
    cached decode steps; returns the figures (see onnx_common.compare)."""
    common.check_type("ExecuTorch", type, SUPPORTED_TYPES)
    common.require("ExecuTorch", REQUIRES)
    probes = common.check_probes("ExecuTorch", probes)
    runtime = ExecutorchDecoder(Path(export_dir) / MODEL_FILE)
    figures = common.compare(runtime, common.load_model(model_dir), probes, format="ExecuTorch", type=type)
    log.info("ExecuTorch vs HF: %s", figures)
    return figures


class ExecutorchDecoder:
    """The program's `forward` in ExecuTorch's runtime, fed the way a generation loop feeds it: `start()`
    opens a sequence with an empty cache, `step(tokens)` returns their logits [n, vocab], feeding more
    than the program's chunk bound in successive calls."""

    def __init__(self, path: Path):
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        meta = self.method.metadata
        # Planned sizes are the upper bounds: input 0's length is the chunk, input 3 onwards is the cache.
        self.chunk = meta.input_tensor_meta(0).sizes()[1]
        self.cache_shapes = [meta.input_tensor_meta(i).sizes() for i in range(3, meta.num_inputs())]

    def start(self) -> ExecutorchDecoder:
        import torch

        self.cache = [torch.zeros(1, heads, 0, dim) for _, heads, _, dim in self.cache_shapes]
        self.length = 0
        return self

    def step(self, tokens: list[int]):
        import numpy as np

        return np.concatenate([self._run(tokens[i : i + self.chunk]) for i in range(0, len(tokens), self.chunk)])

    def _run(self, tokens: list[int]):
        import torch

        end = self.length + len(tokens)
        outputs = self.method.execute(
            [
                torch.tensor([tokens], dtype=torch.int64),
                torch.ones(1, end, dtype=torch.int64),
                torch.arange(self.length, end, dtype=torch.int64)[None],
                *self.cache,
            ]
        )
        self.cache = [tensor.clone() for tensor in outputs[1:]]
        self.length = end
        return outputs[0][0].float().numpy().copy()
