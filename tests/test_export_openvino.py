"""OpenVINO export (runtime/export/openvino.py): the stateful IR run by OpenVINO's CPU plugin against the
HF model it came from. Skipped when the `openvino` package is absent."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
from tiny_models import make_tiny_model

from tunepipe.errors import UserError
from tunepipe.runtime.export import openvino as openvino_export

LOG = logging.getLogger("test_export_openvino")
TEMPLATE = {"name": "chatml", "eos_token": "<|im_end|>", "stop_token_ids": [2]}
PROBES = [[5, 77, 301, 12, 900, 4], [33, 1000, 7, 8, 9, 10, 11, 12, 13, 14]]

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="the openvino package is not installed"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(arch, type) -> (model_dir, export_dir, info), each export made once per module."""
    root = tmp_path_factory.mktemp("openvino")
    made = {}

    def get(arch: str, type: str = "fp32"):
        if (arch, type) not in made:
            model_dir = root / "models" / arch
            if not model_dir.exists():
                make_tiny_model(arch, model_dir)
            out = root / f"{arch}-{type}"
            info = openvino_export.export(model_dir, out, type=type, template=TEMPLATE, log=LOG)
            made[arch, type] = (model_dir, out, info)
        return made[arch, type]

    return get


def _verify(model_dir, export_dir, type="fp32"):
    return openvino_export.verify(export_dir, model_dir, PROBES, type=type, template=TEMPLATE, log=LOG)


@needs_openvino
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_fp32_export_computes_the_model(exported, arch):
    model_dir, export_dir, info = exported(arch)
    figures = _verify(model_dir, export_dir)
    assert figures["max_rel_logit_error"] < 1e-4, figures
    assert figures["greedy_agreement"] == 1.0, figures
    assert figures["positions"] == sum(len(probe) + 8 for probe in PROBES) and figures["decode_steps"] == 8
    # The KV cache is state: one variable per key and per value of each of the 2 layers.
    assert info["inputs"] == ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    assert info["outputs"] == ["logits"] and info["state_variables"] == 4


@needs_openvino
@pytest.mark.slow
def test_ir_and_side_files(exported):
    import openvino

    model_dir, export_dir, _ = exported("llama")
    model = openvino.Core().read_model(str(export_dir / "openvino_model.xml"))
    shapes = {port.get_any_name(): str(port.get_partial_shape()) for port in model.inputs}
    assert shapes == {"input_ids": "[?,?]", "attention_mask": "[?,?]", "position_ids": "[?,?]", "beam_idx": "[?]"}
    assert str(model.output("logits").get_partial_shape()) == "[?,?,1417]"
    # float32 weights: the embedding alone is 1417 x 64 x 4 bytes
    assert (export_dir / "openvino_model.bin").stat().st_size > 1417 * 64 * 4
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [json.loads((model_dir / "config.json").read_text())["eos_token_id"], 2]
    assert (export_dir / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert json.loads((export_dir / "config.json").read_text())["model_type"] == "llama"


@needs_openvino
@pytest.mark.slow
def test_fp16_weights(exported):
    model_dir, export_dir, info = exported("llama", "fp16")
    *_, fp32_info = exported("llama")
    figures = _verify(model_dir, export_dir, "fp16")
    LOG.warning("llama openvino fp16: %s", figures)
    assert info["files"]["openvino_model.bin"] < 0.6 * fp32_info["files"]["openvino_model.bin"]
    # float16 rounding of the weights moves the logits a little, and only a little.
    assert 1e-5 < figures["max_rel_logit_error"] < 2e-2, figures
    assert figures["greedy_agreement"] >= 0.9, figures


def test_unknown_type_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown OpenVINO export type 'int4'") as raised:
        openvino_export.export(tmp_path, tmp_path / "out", type="int4", template=TEMPLATE, log=LOG)
    assert "fp32, fp16" in raised.value.details[0]


def test_missing_runtime_names_the_pip_package(tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_export, "REQUIRES", (("no_such_module_xyz", "openvino"),))
    with pytest.raises(UserError, match="OpenVINO export needs the Python package"):
        openvino_export.verify(tmp_path, tmp_path, PROBES, type="fp32", template=TEMPLATE, log=LOG)
