"""Preflight: flags whose package or hardware is missing here fail before anything runs, with a
message naming the flag and the fix; flags that work on this CPU host pass."""

from __future__ import annotations

import json

import pytest

from tunepipe.executors import preflight as pf
from tunepipe.executors.preflight import preflight


def step_params(kind: str, flags: dict) -> dict:
    """The params the compiler gives a `kind` step: every flag it reads, catalog defaults filled in."""
    from tunepipe.spec.catalog import load_catalog

    params = {f.name: f.default for f in load_catalog().flags.values() if kind in f.used_by}
    return {**params, **flags}


CPU = {"cuda": False, "count": 0, "bf16": False, "capability": None, "name": None}
OLD_GPU = {"cuda": True, "count": 1, "bf16": False, "capability": [7, 5], "name": "Tesla T4"}


@pytest.fixture
def host(monkeypatch):
    """Pretend-host: which modules are installed and what the device probe answers."""
    state = {"missing": set(), "device": CPU, "probes": 0}
    real = pf._installed

    def installed(module):
        return module not in state["missing"] and real(module)

    def probe(python):
        state["probes"] += 1
        return state["device"]

    monkeypatch.setattr(pf, "_installed", installed)
    monkeypatch.setattr(pf, "probe_devices", probe)
    return state


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"enable_liger_kernel": True}, "enable_liger_kernel: the liger-kernel package is not installed (pip install liger-kernel) and needs a CUDA GPU"),
        ({"flash_attn": "fa2"}, "flash_attn: fa2: the flash-attn package is not installed (pip install flash-attn) and needs a CUDA GPU"),
        ({"attn_implementation": "flash_attention_2"}, "attn_implementation: flash_attention_2: the flash-attn package is not installed"),
        ({"quantization_bit": 4, "quantization_method": "bnb"}, "quantization_bit 4 (QLoRA): the bitsandbytes package is not installed (pip install 'bitsandbytes>=0.50', which also runs on CPU)"),
        ({"quantization_bit": 4, "quantization_method": "gptq"}, "quantization_bit: only bitsandbytes (quantization_method: bnb) quantizes while loading"),
        ({"deepspeed": "/nonexistent/ds.json"}, "deepspeed: the deepspeed package is not installed (pip install deepspeed)"),
        ({"report_to": "wandb"}, "report_to wandb: wandb is not installed (pip install wandb)"),
        ({"tf32": True}, "tf32 requested but TensorFloat-32 needs an NVIDIA Ampere-or-newer GPU (no CUDA GPU in this environment)"),
        ({"device_map": "cuda:0"}, "device_map cuda:0: no CUDA GPU in this environment"),
    ],
)  # fmt: skip
def test_missing_package_or_hardware_is_named(host, flags, expected):
    host["missing"] |= {"unsloth", "liger_kernel", "flash_attn", "bitsandbytes", "deepspeed", "wandb"}
    problems = preflight("train", step_params("train", flags), {"kind": "local"})
    assert any(p.startswith(expected) for p in problems), problems


def test_what_works_on_this_cpu_host_passes(host):
    """The flags the train tests exercise on CPU (bf16/fp16 autocast, torch.compile, tensorboard,
    2-process torchrun) raise nothing."""
    host["missing"].add("wandb")
    for flags in ({}, {"bf16": True}, {"fp16": True}, {"torch_compile": True}, {"report_to": "tensorboard"}, {"report_to": "all"},
                  {"finetuning_type": "lora", "gradient_checkpointing": True}, {"flash_attn": "sdpa"}):  # fmt: skip
        assert preflight("train", step_params("train", flags), {"kind": "local"}) == [], flags
    assert preflight("train", step_params("train", {}), {"kind": "torchrun", "nproc_per_node": 2}) == []


def test_device_probe_runs_only_when_a_flag_needs_it(host):
    preflight("train", step_params("train", {"learning_rate": 1e-4, "finetuning_type": "lora"}), {"kind": "local"})
    assert host["probes"] == 0
    preflight("train", step_params("train", {"bf16": True}), {"kind": "local"})
    assert host["probes"] == 1


def test_gpu_answers(host):
    host["device"] = OLD_GPU
    assert preflight("train", step_params("train", {"bf16": True}), {}) == [
        "bf16 requested but the GPU (Tesla T4) has no bfloat16 support; use fp16"
    ]
    assert "Tesla T4" in preflight("train", step_params("train", {"tf32": True}), {})[0]
    assert preflight("train", step_params("train", {}), {"kind": "torchrun", "nproc_per_node": 4})[0].startswith(
        "executor nproc_per_node 4: only 1 CUDA GPU(s) here"
    )
    # no_cuda: the GPU is there but not used
    host["missing"].add("flash_attn")
    assert preflight("train", step_params("train", {"no_cuda": True, "bf16": True}), {}) == []


def test_unknown_executors_are_problems_and_slurm_devices_are_not_probed_here(host):
    assert preflight("train", step_params("train", {"tf32": True}), {"kind": "slurm"}) == []
    assert host["probes"] == 0  # slurm's devices are on the compute nodes: never probed here
    assert preflight("data", step_params("data", {}), {"kind": "kubernetes"}) == [
        "unknown executor 'kubernetes' (known: local, torchrun, slurm)"
    ]


@pytest.mark.parametrize(
    "kind, section", [("merge", "merge"), ("quantize", "quantize"), ("export", "export"), ("verify", "export")]
)
def test_a_stage_this_version_lacks_is_a_problem(host, monkeypatch, kind, section):
    monkeypatch.delenv("TUNEPIPE_STAGE_MODULES", raising=False)
    host["missing"].add(f"tunepipe.runtime.stages.{kind}")  # as in a version without that stage module
    assert preflight(kind, {}, {}) == [
        f"this version of tunepipe has no {kind} stage yet; remove the {section} section"
    ]
    monkeypatch.setenv("TUNEPIPE_STAGE_MODULES", f"{kind}=fake_stages")  # tests supply their own stage
    assert preflight(kind, {}, {}) == []
    monkeypatch.setenv("TUNEPIPE_STAGE_MODULES", "*=fake_stages")
    assert preflight(kind, {}, {}) == []


def test_the_stages_that_exist_pass(host, monkeypatch):
    monkeypatch.delenv("TUNEPIPE_STAGE_MODULES", raising=False)
    assert (
        preflight("data", step_params("data", {}), {}) == []
        and preflight("template", step_params("template", {}), {}) == []
    )


def test_config_files_are_validated(tmp_path, host):
    (tmp_path / "fsdp.json").write_text("{oops")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    problems = preflight(
        "train", step_params("train", {"fsdp": "full_shard", "fsdp_config": "fsdp.json"}), {}, spec_dir=tmp_path
    )
    assert len(problems) == 1 and problems[0].startswith(
        f"fsdp_config: {tmp_path / 'fsdp.json'} is not a valid JSON file"
    )
    host["missing"].add("deepspeed")
    assert preflight("train", step_params("train", {"deepspeed": "ds.json"}), {}, spec_dir=tmp_path) == [
        "deepspeed: the deepspeed package is not installed (pip install deepspeed)"
    ]


def test_infer_backends_say_what_they_need(host):
    assert preflight("infer", step_params("infer", {"infer_backend": "vllm"}), {})[0].startswith(
        "infer_backend vllm: vllm needs a CUDA build"
    )
    assert "unmaintained" in preflight("infer", step_params("infer", {"infer_backend": "ctransformers"}), {})[0]
    assert "mlc_llm" in preflight("infer", step_params("infer", {"infer_backend": "mlc"}), {})[0]
    assert preflight("infer", step_params("infer", {"infer_backend": "hf"}), {}) == []
    host["missing"].add("llama_cpp")
    assert preflight("infer", step_params("infer", {"infer_backend": "llama-cpp"}), {}) == [
        "infer_backend llama-cpp: llama-cpp-python is not installed (pip install llama-cpp-python)"
    ]


def test_missing_training_stack(host):
    host["missing"].add("peft")
    assert preflight("train", step_params("train", {}), {}) == [
        "peft not installed: the train step needs torch, transformers, peft, accelerate (pip install 'tunepipe[train]')"
    ]
    assert preflight("data", step_params("data", {}), {}) == []


def test_real_probe_on_this_host():
    """The subprocess probe itself (the other tests stub it): this CPU host has no CUDA."""
    answer = pf.probe_devices.__wrapped__(__import__("sys").executable)
    assert set(answer) == {"cuda", "count", "bf16", "capability", "name"}
    assert isinstance(answer["cuda"], bool)


def test_a_hub_model_that_cannot_be_had_fails_at_once(tmp_path, monkeypatch):
    pf.hub_problems.cache_clear()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    problems = preflight(
        "train", step_params("train", {"model_name_or_path": "org/no-such-model"}), {}, spec_dir=tmp_path
    )
    assert any(
        "org/no-such-model: not in the local Hugging Face cache, and the hub (127.0.0.1) is unreachable" in p
        for p in problems
    ), problems
    pf.hub_problems.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = preflight(
        "train", step_params("train", {"model_name_or_path": "org/no-such-model"}), {}, spec_dir=tmp_path
    )
    assert any("HF_HUB_OFFLINE is set" in p for p in problems), problems
    pf.hub_problems.cache_clear()


# ---------------------------------------------------------------- QLoRA: a quantized train base


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_with_bitsandbytes_runs_on_cpu_without_a_device_probe(host, bits):
    """bitsandbytes >= 0.50 runs NF4 and int8 layers on CPU (tests/test_qlora.py trains on them)."""
    flags = {"finetuning_type": "lora", "quantization_bit": bits, "quantization_method": "bnb"}
    assert preflight("train", step_params("train", flags), {"kind": "local"}) == []
    assert host["probes"] == 0


def test_an_older_bitsandbytes_needs_a_gpu_and_says_which_release_runs_on_cpu(host, monkeypatch):
    monkeypatch.setattr(pf, "_version", lambda name: "0.43.1")
    flags = {"finetuning_type": "lora", "quantization_bit": 4, "quantization_method": "bnb"}
    assert preflight("train", step_params("train", flags), {"kind": "local"}) == [
        "quantization_bit: needs a CUDA GPU, but no CUDA GPU in this environment with bitsandbytes 0.43.1; "
        "0.50 and later run 4- and 8-bit layers on CPU: pip install -U 'bitsandbytes>=0.50'"
    ]
    host["device"] = OLD_GPU
    assert preflight("train", step_params("train", flags), {"kind": "local"}) == []


def test_release_parsing():
    assert pf._release("0.50.2") == (0, 50) and pf._release("1.0") == (1, 0) and pf._release("0.49.0.dev0") == (0, 49)
    assert pf._release("0.50.2") >= pf.BNB_CPU > pf._release("0.45.5")


def test_hqq_tuner_backend_needs_bits_and_the_hqq_package(host):
    flags = {"finetuning_type": "lora", "tuner_backend": "hqq"}
    assert preflight("train", step_params("train", flags), {}) == [
        "tuner_backend hqq trains LoRA on an HQQ-quantized base: set model.quantization_bit (4 or 8)"
    ]
    assert preflight("train", step_params("train", {**flags, "quantization_bit": 4}), {}) == []
    host["missing"].add("hqq")
    assert preflight("train", step_params("train", {**flags, "quantization_bit": 4}), {}) == [
        "tuner_backend hqq (quantization_bit 4): the hqq package is not installed (pip install hqq)"
    ]
    assert host["probes"] == 0


@pytest.mark.parametrize("flag, fix", [("use_triton", "remove use_triton"), ("use_exllama", "remove use_exllama")])
def test_gpu_only_kernels_are_refused_on_cpu_with_what_to_do(host, monkeypatch, flag, fix):
    installed = pf._installed
    monkeypatch.setattr(pf, "_installed", lambda module: module in ("triton", "gptqmodel") or installed(module))
    problems = preflight("train", step_params("train", {flag: True}), {"kind": "local"})
    assert len(problems) == 1 and problems[0].startswith(
        f"{flag}: needs a CUDA GPU, but no CUDA GPU in this environment; {fix}"
    ), problems
