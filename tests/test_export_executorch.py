"""ExecuTorch export (runtime/export/executorch.py): the XNNPACK-lowered program run in ExecuTorch's runtime
against the HF model it came from. Skipped when the `executorch` package is absent."""

from __future__ import annotations

import importlib.util
import json
import logging
import random

import pytest
from tiny_models import make_tiny_model

from tunepipe.errors import UserError
from tunepipe.runtime.export import executorch as executorch_export

LOG = logging.getLogger("test_export_executorch")
TEMPLATE = {"name": "chatml", "eos_token": "<|im_end|>", "stop_token_ids": [2]}
PROBES = [[5, 77, 301, 12, 900, 4], [33, 1000, 7, 8, 9, 10, 11, 12, 13, 14]]

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None, reason="the executorch package is not installed"
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(model_dir, export_dir, info) of a tiny llama exported once for the module."""
    root = tmp_path_factory.mktemp("executorch")
    model_dir = make_tiny_model("llama", root / "model")
    info = executorch_export.export(model_dir, root / "out", type="fp32", template=TEMPLATE, log=LOG)
    return model_dir, root / "out", info


@needs_executorch
@pytest.mark.slow
def test_fp32_export_computes_the_model(llama):
    model_dir, export_dir, info = llama
    figures = executorch_export.verify(export_dir, model_dir, PROBES, type="fp32", template=TEMPLATE, log=LOG)
    assert figures["max_rel_logit_error"] < 1e-4, figures
    assert figures["greedy_agreement"] == 1.0, figures
    assert figures["positions"] == sum(len(probe) + 8 for probe in PROBES) and figures["decode_steps"] == 8
    assert info["inputs"] == ["input_ids", "attention_mask", "position_ids", "key_0", "value_0", "key_1", "value_1"]
    assert (info["max_context"], info["max_chunk"]) == (512, 128)  # the tiny model's context, the chunk bound


@needs_executorch
@pytest.mark.slow
def test_planned_bounds_and_a_chunked_prompt(llama):
    """The program is planned for chunks of 128 tokens and a 511-token past; a 300-token prompt goes in
    three chunks and still matches HF, through the decode steps after it."""
    model_dir, export_dir, _ = llama
    decoder = executorch_export.ExecutorchDecoder(export_dir / "model.pte")
    assert decoder.chunk == 128 and decoder.cache_shapes == [(1, 2, 511, 16)] * 4
    probe = random.Random(0).choices(range(1417), k=300)
    figures = executorch_export.verify(export_dir, model_dir, [probe], type="fp32", template=TEMPLATE, log=LOG)
    assert figures["max_rel_logit_error"] < 1e-4 and figures["greedy_agreement"] == 1.0, figures
    assert figures["positions"] == 308


@needs_executorch
@pytest.mark.slow
def test_side_files(llama):
    model_dir, export_dir, _ = llama
    manifest = json.loads((export_dir / "export.json").read_text())
    assert manifest["export_format"] == "executorch" and manifest["components"]["model"]["file"] == "model.pte"
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [json.loads((model_dir / "config.json").read_text())["eos_token_id"], 2]
    assert (export_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_unknown_type_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown ExecuTorch export type 'int8'") as raised:
        executorch_export.export(tmp_path, tmp_path / "out", type="int8", template=TEMPLATE, log=LOG)
    assert raised.value.details == ["`type` of the ExecuTorch export is one of: fp32"]


def test_missing_runtime_names_the_pip_package(tmp_path, monkeypatch):
    monkeypatch.setattr(executorch_export, "REQUIRES", (("no_such_module_xyz", "executorch"),))
    with pytest.raises(UserError, match="ExecuTorch export needs the Python package") as raised:
        executorch_export.verify(tmp_path, tmp_path, PROBES, type="fp32", template=TEMPLATE, log=LOG)
    assert raised.value.details == ["pip install executorch"]
