"""The stage table: every fact about a step kind, in one place. Light: pure Python, no imports.

Read by the compiler (version, the section that makes the step), preflight (packages, the check to
run) and the runner (how a result is summarised). Adding a stage is a module
`tunepipe/runtime/stages/<kind>.py` defining `run(ctx) -> metrics` plus one entry here.

`version`: bump it when the bytes a stage produces for the same inputs change. Export and verify
are versioned per format (a GGUF writer change does not invalidate ONNX exports): a mapping from
`format` to version.
`packages`: (import name, pip name) the stage always needs; a format's own packages are declared by
its export module (`REQUIRES`) and checked by preflight.
`preload`: modules the stage's run imports lazily; a worker started ahead of its step (the local
executor's standby, executors/local.py) imports them, with the stage module, while earlier steps run.
`check`: the name of the function in `executors/preflight.py` with the flag-specific host checks.
`summary`: what the run summary shows of a built step: "model" (losses, steps, where it is),
"answer" (an infer answer), "report" (verify figures against thresholds), or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRAIN_PACKAGES = (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"))
MODEL_PRELOAD = ("torch", "transformers", "transformers.modeling_utils")
EXPORT_FORMATS = ("gguf", "onnx", "mlc", "openvino", "executorch")
# (import name, pip name) a quantize method needs.
METHOD_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "bnb": (("bitsandbytes", "bitsandbytes"),),
    "hqq": (("hqq", "hqq"),),
    "gptq": (("gptqmodel", "gptqmodel"),),
    "mlc": (("numpy", "numpy"),),
}
# (import name, pip name) an export format and its verify runtime need.
FORMAT_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "gguf": (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")),
    "onnx": (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxscript", "onnxscript")),
    "mlc": (("numpy", "numpy"),),
    "openvino": (("openvino", "openvino"),),
    "executorch": (("executorch", "executorch"),),
}


@dataclass(frozen=True)
class Stage:
    kind: str
    section: str
    version: int | dict[str, int]
    packages: tuple[tuple[str, str], ...] = ()
    preload: tuple[str, ...] = ()
    check: str | None = None
    summary: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def version_for(self, params: dict[str, Any]) -> int:
        if isinstance(self.version, int):
            return self.version
        return self.version.get(params.get("format"), 1)

    @property
    def module(self) -> str:
        return f"tunepipe.runtime.stages.{self.kind}"


STAGES: dict[str, Stage] = {
    stage.kind: stage
    for stage in (
        Stage("data", "data", 1, (("datasets", "datasets"),)),
        Stage(
            "template",
            "template",
            1,
            (("transformers", "transformers"), ("numpy", "numpy")),
            # + the package of every tokenizer class (its __init__ scans the model directories: ~0.5 s)
            ("transformers.tokenization_utils_tokenizers", "transformers.models"),
        ),
        Stage("train", "train", 4, TRAIN_PACKAGES, (*MODEL_PRELOAD, "peft"), check="train_problems", summary="model"),
        Stage("merge", "merge", 1, TRAIN_PACKAGES + (("safetensors", "safetensors"),), MODEL_PRELOAD, summary="model"),
        Stage("quantize", "quantize", 1, TRAIN_PACKAGES, MODEL_PRELOAD, check="quantize_problems", summary="model"),
        Stage(
            "export",
            "export",
            {f: 1 for f in EXPORT_FORMATS},
            preload=MODEL_PRELOAD,
            check="export_problems",
            summary="model",
        ),
        Stage(
            "verify",
            "export",
            {f: 1 for f in EXPORT_FORMATS},
            TRAIN_PACKAGES,
            MODEL_PRELOAD,
            check="export_problems",
            summary="report",
        ),
        Stage("infer", "infer", 1, TRAIN_PACKAGES, MODEL_PRELOAD, check="infer_problems", summary="answer"),
    )
}


def stage(kind: str) -> Stage:
    return STAGES[kind]


# Libraries that transformers and peft import whenever they are installed, at a cost, though a step
# uses them only in some cases: `datasets` (transformers' Trainer imports it; only the data step reads
# a dataset with it), and the quantization libraries hqq (transformers' cache_utils imports it) and
# bitsandbytes (peft's LoRA injection imports peft.tuners.lora.bnb), used only by a step that
# quantizes or reads a quantized model. hqq and bitsandbytes each pull in torch._dynamo and
# torch._inductor (bitsandbytes also compiles its torch.compile'd ops' templates): ~1.7 s and ~1.9 s of
# a model step's start on 2 cores; datasets ~0.4 s. The compiler lists those a step does not use
# (`Step.without`) and its worker hides them (runtime/worker.py `hide`), so that transformers and peft
# take their paths for a host without them.
OPTIONAL_IMPORTS = ("datasets", "hqq", "bitsandbytes")


def unused_imports(kind: str, params: dict[str, Any], input_kinds: Any) -> tuple[str, ...]:
    """The OPTIONAL_IMPORTS a step of `kind` with these params, reading artifacts of `input_kinds`,
    never imports. `datasets` is the data step's. hqq and bitsandbytes are a step's that quantizes (a
    quantize step, quantization_bit, quantization_method, tuner_backend hqq) or reads a quantize
    artifact, loaded by its method's library (the optimizer is always torch's AdamW: no catalog flag
    picks bitsandbytes')."""
    quantizes = (
        kind == "quantize"
        or params.get("quantization_bit") is not None
        or params.get("quantization_method") is not None
        or params.get("tuner_backend") == "hqq"
        or "quantize" in input_kinds
    )
    uses = {"datasets": kind == "data", "hqq": quantizes, "bitsandbytes": quantizes}
    return tuple(name for name in OPTIONAL_IMPORTS if not uses[name])
