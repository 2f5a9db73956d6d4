"""OpenVINO IR export of a merged causal LM, its KV cache kept as model state, verified in OpenVINO.

`export(model_dir, out, type=..., template=..., log=...)` writes into `out`:

    openvino_model.xml + .bin   the decoder, stateful the way optimum-intel and openvino-genai take it:
        inputs   input_ids [batch, sequence] int64, attention_mask [batch, past + sequence] int64,
                 position_ids [batch, sequence] int64, beam_idx [batch] int32 (arange(batch) for greedy)
        outputs  logits [batch, sequence, vocab]
        the K/V cache lives in the infer request's state variables: `reset_state()` starts a sequence,
        each `infer` appends its tokens' keys and values.
    config.json, generation_config.json (eos ids + the template's stop tokens), the tokenizer files.

`type`: fp32 (weights and compute in float32) or fp16 (weights stored in float16, compute in float32).

The IR comes from transformers' own exporter (`transformers.exporters.OpenVINOExporter`: torch.export,
then `openvino.convert_model`, then OpenVINO's stateful transformation), traced with the same sample
step as the ONNX export (onnx_common). `verify(...)` compiles it for the CPU in float32 and runs each
probe, a prefill then onnx_common.DECODE_STEPS decode steps, against the HF model (onnx_common.compare).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from tunepipe.runtime.export import onnx_common as common

SUPPORTED_TYPES = ("fp32", "fp16")
REQUIRES = (("openvino", "openvino"),)

MODEL_FILE = "openvino_model.xml"
INPUTS = ("input_ids", "attention_mask", "position_ids", "beam_idx")


def export(model_dir: Path, out: Path, *, type: str, template: dict, log: logging.Logger) -> dict:
    """Write the stateful IR for `type`, its configs and the tokenizer into `out`; returns the manifest info."""
    common.check_type("OpenVINO", type, SUPPORTED_TYPES)
    common.require("OpenVINO", REQUIRES)
    import openvino
    import transformers
    from transformers.exporters import OpenVINOConfig, OpenVINOExporter

    model_dir, out = Path(model_dir), Path(out)
    model = common.load_model(model_dir)
    log.info("tracing %s (%s) with transformers' OpenVINOExporter", model_dir, model.config.model_type)
    started = time.monotonic()
    inputs = common.sample_inputs(model)
    config = OpenVINOConfig(
        dynamic_shapes=common.dynamic_shapes(inputs), stateful=True, compress_to_fp16=type == "fp16"
    )
    program = OpenVINOExporter().export(model, inputs, config).program
    _check_signature(program)
    log.info("traced and converted in %.1f s", time.monotonic() - started)

    out.mkdir(parents=True, exist_ok=True)
    # Saved as converted: `save_model` would otherwise halve float32 weights on its own.
    openvino.save_model(program, str(out / MODEL_FILE), compress_to_fp16=False)
    model.config.save_pretrained(out)
    _, tokenizer_files = common.write_side_files(model_dir, out, model.config, template)
    return {
        "type": type,
        "exporter": f"transformers {transformers.__version__} OpenVINOExporter (openvino {openvino.__version__})",
        "inputs": [port.get_any_name() for port in program.inputs],
        "outputs": [port.get_any_name() for port in program.outputs],
        "state_variables": len(program.get_variables()),
        "tokenizer_files": tokenizer_files,
        "files": {path.name: path.stat().st_size for path in sorted(out.iterdir()) if path.is_file()},
    }


def _check_signature(program) -> None:
    """The IR takes the four inputs of a stateful decoder and returns logits, its cache folded into state."""
    names = ([port.get_any_name() for port in program.inputs], [port.get_any_name() for port in program.outputs])
    if sorted(names[0]) != sorted(INPUTS) or names[1] != ["logits"] or not program.get_variables():
        raise RuntimeError(
            f"the converted model has inputs {names[0]} and outputs {names[1]} with "
            f"{len(program.get_variables())} state variables; expected {list(INPUTS)}, "
            "['logits'] and the KV cache as state"
        )


def verify(
    export_dir: Path, model_dir: Path, probes: list[list[int]], *, type: str, template: dict, log: logging.Logger
) -> dict:
    """Compare the IR compiled for OpenVINO's CPU plugin with the HF model over each probe's prefill and
    its cached decode steps; returns the figures (see onnx_common.compare)."""
    common.check_type("OpenVINO", type, SUPPORTED_TYPES)
    common.require("OpenVINO", REQUIRES)
    probes = common.check_probes("OpenVINO", probes)
    runtime = OpenVINODecoder(Path(export_dir) / MODEL_FILE)
    figures = common.compare(runtime, common.load_model(model_dir), probes, format="OpenVINO", type=type)
    figures["inference_precision"] = "f32"
    log.info("OpenVINO vs HF: %s", figures)
    return figures


class OpenVINODecoder:
    """One infer request on the CPU plugin, in float32: `start()` resets its state (the KV cache),
    `step(tokens)` appends the tokens and returns their logits [n, vocab]."""

    def __init__(self, path: Path):
        import openvino

        # Without the hint, CPUs with bf16 units compute in bf16.
        properties = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": len(os.sched_getaffinity(0))}
        compiled = openvino.Core().compile_model(str(path), "CPU", properties)
        self.request = compiled.create_infer_request()

    def start(self) -> OpenVINODecoder:
        self.request.reset_state()
        self.length = 0
        return self

    def step(self, tokens: list[int]):
        import numpy as np

        end = self.length + len(tokens)
        self.request.infer(
            {
                "input_ids": np.array([tokens], dtype=np.int64),
                "attention_mask": np.ones((1, end), dtype=np.int64),
                "position_ids": np.arange(self.length, end, dtype=np.int64)[None],
                "beam_idx": np.zeros(1, dtype=np.int32),
            }
        )
        self.length = end
        return self.request.get_tensor("logits").data[0].astype(np.float32)
