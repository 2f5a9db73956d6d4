"""ONNX export with KV cache (runtime/export/onnx.py): each architecture traced, run in onnxruntime, and
compared with the HF model it came from.

Exports are slow (tens of seconds each on 2 cores): `exported(arch, type)` makes each one once per module.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random

import pytest
from tiny_models import ARCHS, make_tiny_model

from tunepipe.errors import UserError
from tunepipe.runtime.export import onnx as onnx_export
from tunepipe.runtime.export import onnx_common

LOG = logging.getLogger("test_export_onnx")
TEMPLATE = {"name": "chatml", "eos_token": "<|im_end|>", "stop_token_ids": [2]}
PROBES = [[5, 77, 301, 12, 900, 4], [33, 1000, 7, 8, 9, 10, 11, 12, 13, 14]]

needs_runtime = pytest.mark.skipif(
    any(importlib.util.find_spec(module) is None for module, _ in onnx_export.REQUIRES),
    reason="onnx, onnxscript and onnxruntime are needed for the ONNX export",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(arch, type) -> (model_dir, export_dir, info), each export made once per module."""
    root = tmp_path_factory.mktemp("onnx")
    made = {}

    def get(arch: str, type: str = "fp32"):
        if (arch, type) not in made:
            model_dir = root / "models" / arch
            if not model_dir.exists():
                make_tiny_model(arch, model_dir)
            out = root / f"{arch}-{type}"
            info = onnx_export.export(model_dir, out, type=type, template=TEMPLATE, log=LOG)
            made[arch, type] = (model_dir, out, info)
        return made[arch, type]

    return get


def _verify(model_dir, export_dir, type="fp32", probes=PROBES):
    return onnx_export.verify(export_dir, model_dir, probes, type=type, template=TEMPLATE, log=LOG)


def _dims(value) -> list:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


@needs_runtime
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_export_computes_the_model(exported, arch):
    model_dir, export_dir, info = exported(arch)
    figures = _verify(model_dir, export_dir)
    assert figures["max_rel_logit_error"] < 1e-4, figures
    assert figures["greedy_agreement"] == 1.0, figures
    assert figures["decode_steps"] == onnx_common.DECODE_STEPS == 8
    assert figures["probes"] == 2
    assert figures["positions"] == sum(len(probe) + 8 for probe in PROBES)
    assert info["layers"] == 2 and info["quantization"] is None


@needs_runtime
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
@pytest.mark.parametrize("arch", ARCHS)
def test_onnxruntime_genai_generates_what_hf_generates(exported, arch):
    """genai_config.json is right when onnxruntime-genai's own loop, reading only the export directory,
    produces the HF model's greedy continuation."""
    import onnxruntime_genai as og
    import torch
    import transformers

    model_dir, export_dir, _ = exported(arch)
    model = og.Model(str(export_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=30)
    generator = og.Generator(model, params)
    generator.append_tokens(PROBES[0])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generation = transformers.GenerationConfig.from_pretrained(export_dir)
    want = hf.generate(torch.tensor([PROBES[0]]), generation_config=generation, max_length=30, do_sample=False)
    assert tokens == want[0, len(PROBES[0]) :].tolist()


@needs_runtime
@pytest.mark.slow
def test_graph_signature_is_genai_shaped(exported):
    import onnx

    _, export_dir, info = exported("llama")
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    inputs = {value.name: _dims(value) for value in model.graph.input}
    outputs = {value.name: _dims(value) for value in model.graph.output}
    past = ["batch_size", 2, "past_sequence_length", 16]
    present = ["batch_size", 2, "total_sequence_length", 16]
    assert inputs == {
        "input_ids": ["batch_size", "sequence_length"],
        "attention_mask": ["batch_size", "total_sequence_length"],
        "position_ids": ["batch_size", "sequence_length"],
        **{f"past_key_values.{i}.{kind}": past for i in range(2) for kind in ("key", "value")},
    }
    assert outputs == {
        "logits": ["batch_size", "sequence_length", 1417],
        **{f"present.{i}.{kind}": present for i in range(2) for kind in ("key", "value")},
    }
    assert [value.name for value in model.graph.input] == info["inputs"]
    # Every weight lives in the external-data file, none inline in the graph.
    weights = [tensor for tensor in model.graph.initializer if len(tensor.dims) == 2]
    assert weights and all(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in weights)
    assert {entry.value for tensor in weights for entry in tensor.external_data if entry.key == "location"} == {
        "model.onnx.data"
    }
    assert info["files"]["model.onnx.data"] > 4 * 1417 * 64  # at least the embedding in float32


@needs_runtime
@pytest.mark.slow
def test_side_files(exported):
    model_dir, export_dir, _ = exported("llama")
    config = json.loads((model_dir / "config.json").read_text())
    genai = json.loads((export_dir / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["num_hidden_layers"] == config["num_hidden_layers"] == 2
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (config["num_key_value_heads"], config["head_dim"])
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 0 == "present.0.value"
    assert genai["model"]["type"] == "llama" and genai["model"]["context_length"] == 512
    assert genai["search"]["past_present_share_buffer"] is False
    generation = json.loads((export_dir / "generation_config.json").read_text())
    # The model's eos, then the template's stop token.
    assert generation["eos_token_id"] == genai["model"]["eos_token_id"] == [config["eos_token_id"], 2]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (export_dir / name).read_bytes() == (model_dir / name).read_bytes()


@needs_runtime
@pytest.mark.slow
def test_batch_padding_and_a_longer_past(exported):
    """Batch 3 (traced with 2), one row left-padded, a prefill then decode steps over a past of 9 and 10
    (traced with 5): the logits of the real positions equal HF's, given the same mask and positions."""
    import numpy as np
    import torch
    import transformers

    model_dir, export_dir, _ = exported("llama")
    session = onnx_export.OnnxDecoder(export_dir / "model.onnx").session
    names = [output.name for output in session.get_outputs()]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = np.array(
        [[7, 8, 9, 10, 11, 12, 13, 14, 15], [0, 0, 0, 40, 41, 42, 43, 44, 45], [90, 91, 92, 93, 94, 95, 96, 97, 98]],
        dtype=np.int64,
    )
    mask = (np.arange(9) >= np.array([[0], [3], [0]])).astype(np.int64)
    positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
    past = {
        f"past_key_values.{i}.{kind}": np.zeros((3, 2, 0, 16), np.float32)
        for i in range(2)
        for kind in ("key", "value")
    }
    cache = None
    for _ in range(3):
        feed = {"input_ids": tokens, "attention_mask": mask, "position_ids": positions, **past}
        results = dict(zip(names, session.run(names, feed)))
        with torch.no_grad():
            reference = model(
                input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions),
                cache=cache,
                use_cache=True,
            )
        cache = reference.cache
        real = mask[:, -tokens.shape[1] :].astype(bool)
        got, want = results["logits"][real], reference.logits.numpy()[real]
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        assert results["present.1.value"].shape == (3, 2, mask.shape[1], 16)
        past = {
            name.replace("present.", "past_key_values."): value
            for name, value in results.items()
            if name.startswith("present.")
        }
        tokens = reference.logits[:, -1].argmax(-1).numpy()[:, None]
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)


@needs_runtime
@pytest.mark.slow
def test_gemma2_sliding_window_past_the_window(exported):
    """gemma2's window is 256: a 270-token probe decodes with a past beyond it, and still matches HF."""
    model_dir, export_dir, _ = exported("gemma2")
    probe = random.Random(0).choices(range(1417), k=270)
    figures = _verify(model_dir, export_dir, probes=[probe])
    assert figures["max_rel_logit_error"] < 1e-4 and figures["greedy_agreement"] == 1.0, figures


@needs_runtime
@pytest.mark.slow
@pytest.mark.parametrize("type", ["int8", "int4"])
def test_quantized_exports_run(exported, type):
    import onnx

    model_dir, export_dir, info = exported("llama", type)
    *_, fp32_info = exported("llama")
    figures = _verify(model_dir, export_dir, type)
    LOG.warning("llama %s: %s", type, figures)
    # Quantized weights: every projection and the LM head (7 per layer + 1); the attention MatMuls stay float.
    assert info["quantization"]["quantized_matmuls"] == 15 and info["quantization"]["float_matmuls"] == 4
    assert info["files"]["model.onnx.data"] < 0.6 * fp32_info["files"]["model.onnx.data"]
    ops = {node.op_type for node in onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph.node}
    assert ("MatMulNBits" in ops) == (type == "int4") and ("DynamicQuantizeLinear" in ops) == (type == "int8")
    # Quantization moves the logits, and the graph still predicts like the model: an unrelated or broken graph
    # agrees on ~1/1417 of the argmaxes. (Tiny random models are far more sensitive than trained ones.)
    assert 1e-3 < figures["max_rel_logit_error"] < 1.5, figures
    assert figures["greedy_agreement"] >= {"int8": 0.8, "int4": 0.3}[type], figures
    assert figures["positions"] == sum(len(probe) + 8 for probe in PROBES)


def test_unknown_type_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown ONNX export type 'fp16'") as raised:
        onnx_export.export(tmp_path, tmp_path / "out", type="fp16", template=TEMPLATE, log=LOG)
    assert "fp32, int8, int4" in raised.value.details[0]
    with pytest.raises(UserError, match="unknown ONNX export type 'q4'"):
        onnx_export.verify(tmp_path, tmp_path, PROBES, type="q4", template=TEMPLATE, log=LOG)
    assert not (tmp_path / "out").exists()


def test_missing_runtime_names_the_pip_package(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "REQUIRES", (*onnx_export.REQUIRES, ("no_such_module_xyz", "no-such-pkg")))
    with pytest.raises(UserError, match="no-such-pkg") as raised:
        onnx_export.verify(tmp_path, tmp_path, PROBES, type="fp32", template=TEMPLATE, log=LOG)
    assert raised.value.details == ["pip install no-such-pkg"]


@needs_runtime
def test_no_probe_tokens_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no probe tokens"):
        onnx_export.verify(tmp_path, tmp_path, [[], []], type="fp32", template=TEMPLATE, log=LOG)
