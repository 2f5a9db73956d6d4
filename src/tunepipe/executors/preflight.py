"""Preflight: can this host run a step the way its flags ask? Checked before any step starts.

Spec validation never looks at the host; this does, for each stale step, before the runner
launches anything (so a missing package fails in a second, not after the data was tokenized).
It stays light: packages are looked up with `importlib.util.find_spec` (nothing is imported),
and the devices are probed in a short `python -c "import torch; ..."` subprocess, only when a
flag needs a device answer. Each problem is one message naming the flag and what to install
or change.

The SLURM executor's devices are on the compute nodes, not here: device checks are skipped for
it (packages are still checked: the job runs this same environment).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..spec.paths import config_file_problems, is_hub_id
from ..stage_table import FORMAT_PACKAGES, METHOD_PACKAGES, STAGES

# Flags that need a package: (import name, pip name, the hardware it also needs).
GPU = "a CUDA GPU"
PACKAGES = {
    "enable_liger_kernel": ("liger_kernel", "liger-kernel", GPU),
    "deepspeed": ("deepspeed", "deepspeed", None),
    "use_triton": ("triton", "triton", GPU),
    "use_exllama": ("gptqmodel", "gptqmodel", GPU),
}
FA2 = ("flash_attn", "flash-attn")
# What to do instead on a host without a CUDA GPU, where there is something.
GPU_FIXES = {
    "quantization_bit": " with bitsandbytes {bitsandbytes}; 0.50 and later run 4- and 8-bit layers on CPU: pip install -U 'bitsandbytes>=0.50'",
    "use_triton": "; remove use_triton (the torch kernels run on CPU)",
    "use_exllama": "; remove use_exllama (gptqmodel's torch kernel runs on CPU)",
}


def preflight(
    step_kind: str, params: dict, executor: dict | None = None, spec_dir: str | Path | None = None
) -> list[str]:
    """Problems that stop `step_kind` with these params from running on this host, [] if none.

    `params` are the step's (every flag it reads, defaults filled in, as the compiler passes them).
    What a step kind needs comes from the stage table: its packages, and the name of its check here.
    """
    executor = executor or {}
    problems: list[str] = []
    from .base import executor_problem

    executor_kind = executor.get("kind") or "local"
    if executor_problem(executor_kind):
        problems.append(executor_problem(executor_kind))
    entry = STAGES.get(step_kind)
    if _overridden(step_kind):
        return problems  # a stand-in stage ($TUNEPIPE_STAGE_MODULES, tests): the real stage's needs do not apply
    if entry is None or not _installed(entry.module):
        section = entry.section if entry else step_kind
        return problems + [f"this version of tunepipe has no {step_kind} stage yet; remove the {section} section"]
    absent = [pip for module, pip in entry.packages if not _installed(module)]
    if absent:
        problems.append(
            f"{', '.join(absent)} not installed: the {step_kind} step needs "
            f"{', '.join(pip for _, pip in entry.packages)} (pip install 'tunepipe[train]')"
        )
    if entry.check:
        problems += CHECKS[entry.check](params, executor, spec_dir)
    if (
        params.get("model_name_or_path")
        and spec_dir is not None
        and is_hub_id(Path(spec_dir), str(params["model_name_or_path"]))
    ):
        problems += hub_problems(
            str(params["model_name_or_path"]), params.get("model_revision"), params.get("cache_dir")
        )
    if executor.get("kind") == "torchrun" and not _installed("torch"):
        problems.append("executor torchrun: torch is not installed (it provides torchrun): pip install torch")
    return problems


INFER_BACKENDS = {
    "vllm": "vllm needs a CUDA build (pip install vllm on a machine with an NVIDIA GPU) and is not integrated in "
    "tunepipe's infer stage; use infer_backend: hf or llama-cpp",
    "ctransformers": "ctransformers is unmaintained (no release since 2023) and runs none of the current "
    "architectures; use infer_backend: llama-cpp with a GGUF export",
    "mlc": "the mlc backend needs mlc_llm (not on PyPI: its wheels live on MLC's own index) and is not integrated; "
    "use infer_backend: hf or llama-cpp",
}


def infer_problems(params: dict, executor: dict, spec_dir) -> list[str]:
    backend = params["infer_backend"]
    if backend == "llama-cpp":
        return (
            []
            if _installed("llama_cpp")
            else ["infer_backend llama-cpp: llama-cpp-python is not installed (pip install llama-cpp-python)"]
        )
    return [f"infer_backend {backend}: {INFER_BACKENDS[backend]}"] if backend in INFER_BACKENDS else []


def export_problems(params: dict, executor: dict, spec_dir) -> list[str]:
    """The packages an export format (and its verify runtime) needs."""
    fmt = params.get("format")
    absent = [pip for module, pip in FORMAT_PACKAGES.get(fmt, ()) if not _installed(module)]
    return (
        [f"export format {fmt}: {', '.join(absent)} not installed (pip install {' '.join(absent)})"] if absent else []
    )


def quantize_problems(params: dict, executor: dict, spec_dir) -> list[str]:
    """The package a quantize method needs."""
    method = params.get("method")
    absent = [pip for module, pip in METHOD_PACKAGES.get(method, ()) if not _installed(module)]
    return (
        [f"quantize method {method}: {', '.join(absent)} not installed (pip install {' '.join(absent)})"]
        if absent
        else []
    )


def train_problems(params: dict, executor: dict, spec_dir) -> list[str]:
    problems = []
    needs_gpu: list[str] = []  # flags that only run on a CUDA GPU

    for flag, (module, pip_name, hardware) in PACKAGES.items():
        if not params.get(flag):
            continue
        if not _installed(module):
            needs = f" and needs {hardware}" if hardware else ""
            problems.append(f"{flag}: the {pip_name} package is not installed (pip install {pip_name}){needs}")
        elif hardware == GPU:
            needs_gpu.append(flag)

    if params.get("flash_attn") == "fa2" or params.get("attn_implementation") == "flash_attention_2":
        flag = "flash_attn: fa2" if params.get("flash_attn") == "fa2" else "attn_implementation: flash_attention_2"
        if not _installed(FA2[0]):
            problems.append(f"{flag}: the {FA2[1]} package is not installed (pip install {FA2[1]}) and needs a CUDA GPU; "
                            "use sdpa or eager on this host")  # fmt: skip
        else:
            needs_gpu.append(flag)

    if params.get("quantization_bit") is not None or params.get("tuner_backend") == "hqq":
        problem, gpu_only = quantized_base_problem(params)
        problems += [problem] if problem else []
        needs_gpu += ["quantization_bit"] if gpu_only else []  # an older bitsandbytes: CUDA only

    report_to = params["report_to"]  # `all` means every tracker that is installed: nothing to check
    if report_to == "tensorboard" and not (_installed("tensorboard") or _installed("tensorboardX")):
        problems.append("report_to tensorboard: tensorboard is not installed (pip install tensorboard)")
    if report_to == "wandb" and not _installed("wandb"):
        problems.append("report_to wandb: wandb is not installed (pip install wandb)")
    if params.get("torch_compile") and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        problems.append("torch_compile: no C++ compiler (g++, c++ or clang++) on PATH for torch.compile's code "
                        "generation; install one (apt-get install g++) or remove torch_compile")  # fmt: skip
    for flag in ("deepspeed", "fsdp_config"):
        if params.get(flag):
            problems += config_file_problems(flag, params[flag], spec_dir)

    if executor.get("kind") == "slurm":
        return problems  # the GPUs are on the compute nodes: nothing to probe here
    device_flags = needs_gpu + [f for f in ("bf16", "fp16", "tf32") if params.get(f)]
    gpus_wanted = executor.get("kind") == "torchrun" and int(executor.get("nproc_per_node") or 1) > 1
    if not (device_flags or gpus_wanted or str(params["device_map"]).startswith("cuda")):
        return problems
    device = probe_devices(executor.get("python") or sys.executable)
    if "error" in device:
        return problems + [
            f"cannot probe the devices with {executor.get('python') or sys.executable}: {device['error']}"
        ]
    cuda = device["cuda"] and not params.get("no_cuda")
    where = "no_cuda is set" if device["cuda"] and params.get("no_cuda") else "no CUDA GPU in this environment"
    versions = {"bitsandbytes": _version("bitsandbytes")}
    for flag in needs_gpu:
        if not cuda:
            problems.append(f"{flag}: needs a CUDA GPU, but {where}" + GPU_FIXES.get(flag, "").format(**versions))
    if params.get("bf16") and cuda and not device["bf16"]:
        problems.append(f"bf16 requested but the GPU ({device['name']}) has no bfloat16 support; use fp16")
    if params.get("tf32") and not (cuda and (device["capability"] or [0])[0] >= 8):
        problems.append(
            f"tf32 requested but TensorFloat-32 needs an NVIDIA Ampere-or-newer GPU ({where if not cuda else device['name']}); remove tf32"
        )
    if str(params["device_map"]).startswith("cuda") and not cuda:
        problems.append(f"device_map {params['device_map']}: {where}")
    if gpus_wanted and cuda and device["count"] < int(executor["nproc_per_node"]):
        problems.append(f"executor nproc_per_node {executor['nproc_per_node']}: only {device['count']} CUDA GPU(s) here "
                        "(one process per GPU); lower nproc_per_node or set no_cuda for CPU processes")  # fmt: skip
    return problems


# bitsandbytes runs its 4-bit (NF4) and 8-bit (LLM.int8) layers, forward and backward, on CPU from this
# release on (tested: 0.50.2, QLoRA on a CPU-only host); earlier ones need a CUDA GPU.
BNB_CPU = (0, 50)


def quantized_base_problem(params: dict) -> tuple[str | None, bool]:
    """(the problem with quantizing the train base while loading, whether it needs a CUDA GPU): bitsandbytes
    (quantization_method: bnb), or HQQ (tuner_backend: hqq); the mirror of `modeling.quantization`."""
    bits, method = params.get("quantization_bit"), params.get("quantization_method")
    if params.get("tuner_backend") == "hqq":
        if bits is None:
            return "tuner_backend hqq trains LoRA on an HQQ-quantized base: set model.quantization_bit (4 or 8)", False
        if not _installed("hqq"):
            return (
                f"tuner_backend hqq (quantization_bit {bits}): the hqq package is not installed (pip install hqq)",
                False,
            )
        return None, False
    if (method or "bnb") != "bnb":
        return (f"quantization_bit: only bitsandbytes (quantization_method: bnb) quantizes while loading; "
                f"a {method} model is loaded already quantized, without quantization_bit"), False  # fmt: skip
    if not _installed("bitsandbytes"):
        return (f"quantization_bit {bits} (QLoRA): the bitsandbytes package is not installed "
                f"(pip install 'bitsandbytes>={BNB_CPU[0]}.{BNB_CPU[1]}', which also runs on CPU)"), False  # fmt: skip
    return None, _release(_version("bitsandbytes")) < BNB_CPU


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string: "0.50.2" → (0, 50); a part that is not a number counts 0."""
    parts = (version.split(".") + ["0"])[:2]
    return tuple(int(part) if part.isdigit() else 0 for part in parts)


HUB_PROBE_S = 3.0


@functools.cache
def hub_problems(model: str, revision: str | None, cache_dir: str | None) -> list[str]:
    """A hub model that is neither in the local cache nor reachable fails here, at once, instead of
    after a minute of retries inside a step. Light: huggingface_hub's cache lookup, one TCP connect."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return []
    cached = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir, revision=revision or None)
    if isinstance(cached, str):
        return []
    fix = (
        f"download it (huggingface-cli download {model}) on a machine with access, or point "
        "model_name_or_path at a local directory"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return [f"model_name_or_path {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {fix}"]
    import socket
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError as exc:
        return [
            f"model_name_or_path {model}: not in the local Hugging Face cache, and the hub "
            f"({endpoint.hostname}) is unreachable from here ({exc.strerror or exc}); {fix}"
        ]
    return []


CHECKS = {
    "train_problems": train_problems,
    "infer_problems": infer_problems,
    "export_problems": export_problems,
    "quantize_problems": quantize_problems,
}


def _overridden(kind: str) -> bool:
    """Whether $TUNEPIPE_STAGE_MODULES (runtime/worker.py; tests) names a stand-in module for `kind`."""
    overrides = dict(
        item.split("=", 1) for item in os.environ.get("TUNEPIPE_STAGE_MODULES", "").split(",") if "=" in item
    )
    return bool(overrides.get(kind) or overrides.get("*"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


PROBE = (
    "import json, torch\n"
    "c = torch.cuda.is_available()\n"
    "print(json.dumps({'cuda': c, 'count': torch.cuda.device_count() if c else 0,"
    " 'bf16': bool(c and torch.cuda.is_bf16_supported()),"
    " 'capability': list(torch.cuda.get_device_capability(0)) if c else None,"
    " 'name': torch.cuda.get_device_name(0) if c else None}))"
)


@functools.cache
def probe_devices(python: str) -> dict:
    """CUDA availability, count, bf16 and compute capability, as the step's interpreter sees them."""
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["torch failed to import"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])
