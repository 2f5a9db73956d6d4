"""Model and tokenizer loading, shared by the train, merge and infer stages.

Every model-section flag is applied here, in one place, so that a model is built
the same way whether it is about to be trained, merged or prompted. Each step is
idempotent (rope scaling, vocabulary resize, MoE coefficient…), so applying the
flags again to a model that already carries them changes nothing: that is what
lets a second train step (`pt` → `sft`) reuse the model section unchanged.

Imports torch and transformers: only stage modules import this file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunepipe.errors import UserError

# flash_attn (seed flag) → transformers' attn_implementation. `auto` defers to
# attn_implementation, which is the more specific flag.
FLASH_ATTN = {"disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
NORM_NAMES = ("norm", "ln_f", "ln_attn", "ln_mlp", "ln_1", "ln_2", "ln1", "ln2")


# ---------------------------------------------------------------- flags


def model_flags(params: dict | None) -> dict:
    """`params` over the catalog's defaults of every flag that loading a model reads (the train step's
    model-section flags): callers that rebuild a model outside a step (chat, tests) pass only what
    they change. The defaults are the catalog's; nothing here repeats them."""
    from tunepipe.spec.catalog import load_catalog

    defaults = {
        f.name: f.default for f in load_catalog().flags.values() if f.section == "model" and "train" in f.used_by
    }
    return {**defaults, **(params or {})}


# ---------------------------------------------------------------- sources


def model_source(ctx) -> str:
    """The base model to load: the model file the compiler digested, else the hub id as written."""
    if "model" in ctx.files:
        return str(ctx.files["model"])
    source = ctx.params.get("model_name_or_path")
    if not source:
        raise UserError("model.model_name_or_path is required to train a model")
    return str(source)


def hub_kwargs(params: dict) -> dict:
    return {
        "cache_dir": params.get("cache_dir"),
        "revision": params["model_revision"],
        "trust_remote_code": bool(params.get("trust_remote_code")),
    }


def _from_hub(loader, source: str, params: dict, **kwargs):
    """Call a `from_pretrained` and turn "not found / offline" into a clear user error."""
    try:
        return loader(source, **hub_kwargs(params), **kwargs)
    except OSError as exc:
        if Path(source).is_dir():
            raise UserError(f"cannot load the model in {source}: {exc}") from exc
        raise UserError(
            f"model_name_or_path {source!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub (offline, or no such model/revision {params.get('model_revision')!r}). "
            "Download it first and point model_name_or_path at the directory, or set cache_dir "
            f"to a cache that holds it. ({str(exc).splitlines()[0]})"
        ) from exc


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(source: str | Path, params: dict):
    """The tokenizer with the seed's tokenizer flags; added tokens come after loading."""
    from transformers import AutoTokenizer

    params = model_flags(params)
    tokenizer = _from_hub(
        AutoTokenizer.from_pretrained,
        str(source),
        params,
        use_fast=bool(params["use_fast_tokenizer"]),
        split_special_tokens=bool(params.get("split_special_tokens")),
    )
    if params.get("add_tokens"):
        tokenizer.add_tokens(list(params["add_tokens"]), special_tokens=False)
    if params.get("add_special_tokens"):
        tokenizer.add_tokens(list(params["add_special_tokens"]), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------- model


def attn_implementation(params: dict) -> str:
    flash = params["flash_attn"]
    return FLASH_ATTN.get(flash) or params["attn_implementation"]


def compute_dtype(params: dict) -> torch.dtype:
    if params.get("bf16"):
        return torch.bfloat16
    if params.get("fp16"):
        return torch.float16
    return torch.float32


def load_dtype(params: dict):
    """strict_dtype: exactly the dtype the config declares; otherwise the compute dtype."""
    return "auto" if params.get("strict_dtype") else compute_dtype(params)


def _rope_scaling(config, params: dict, max_length: int | None) -> None:
    """Extend the context with the requested RoPE scaling (LLaMA-Factory's recipe)."""
    kind = params.get("rope_scaling")
    if not kind:
        return
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        return  # already scaled (a base from an earlier step): idempotent
    if not hasattr(config, "max_position_embeddings"):
        raise UserError(f"rope_scaling: model type {config.model_type} has no RoPE position limit to extend")
    current = config.max_position_embeddings
    factor = float(math.ceil(max_length / current)) if max_length and max_length > current else 1.0
    rope.update(rope_type=kind, factor=factor)
    if kind in ("dynamic", "yarn", "llama3"):
        rope["original_max_position_embeddings"] = current
    if kind == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
    config.rope_parameters = rope
    config.max_position_embeddings = int(current * factor)


def _moe_aux_loss(config, params: dict) -> None:
    coef = params.get("moe_aux_loss_coef")
    if coef is None:
        return
    if not hasattr(config, "router_aux_loss_coef"):
        raise UserError(
            f"moe_aux_loss_coef: model type {config.model_type} is not a mixture-of-experts model "
            "(its config has no router_aux_loss_coef)"
        )
    config.router_aux_loss_coef = float(coef)
    config.output_router_logits = True  # the aux loss is only added when router logits are returned


def quantization(params: dict) -> tuple[str, int] | None:
    """(library, bits) the base is quantized with while it loads (QLoRA), None for a full-precision load.

    `quantization_bit` with `quantization_method: bnb` quantizes with bitsandbytes (CUDA, or CPU from
    bitsandbytes 0.50); `tuner_backend: hqq` with `quantization_bit` quantizes with HQQ, whose LoRA
    layers are peft's (`peft.tuners.lora.hqq`). Other methods (gptq, awq, …) describe models that are
    already quantized on disk, loaded without quantization_bit. Only a LoRA trains on a quantized
    base: its weights are frozen, stored as 4- or 8-bit codes."""
    bits, hqq = params.get("quantization_bit"), params.get("tuner_backend") == "hqq"
    method = params.get("quantization_method")
    if bits is None:
        if hqq:
            raise UserError(
                "tuner_backend hqq trains LoRA on an HQQ-quantized base: set model.quantization_bit (4 or 8)"
            )
        return None
    if hqq and method not in (None, "hqq"):
        raise UserError(
            f"tuner_backend hqq quantizes the base with HQQ, but quantization_method is {method}",
            ["remove quantization_method, or remove tuner_backend: hqq to quantize with bitsandbytes"],
        )
    method = "hqq" if hqq else method or "bnb"
    if method not in ("bnb", "hqq"):
        raise UserError(
            f"quantization_bit with quantization_method {method}: only bitsandbytes (bnb) quantizes on load; "
            f"{method} models are loaded pre-quantized, without quantization_bit"
        )
    finetuning = params.get("finetuning_type")
    if finetuning not in (None, "lora"):
        raise UserError(
            f"quantization_bit {bits} loads the base quantized (QLoRA), whose weights cannot train: "
            f"finetuning_type {finetuning} needs a full-precision model",
            ["use finetuning_type: lora, or remove quantization_bit"],
        )
    return method, int(bits)


def quantization_record(params: dict) -> dict | None:
    """What train.json records of a quantized train base (`quantized_base`), None for a full-precision
    one: provenance only — a merge always merges into the full-precision weights of the base."""
    quant = quantization(params)
    if quant is None:
        return None
    method, bits = quant
    if method != "bnb" or bits != 4:
        return {"method": method, "bits": bits}
    config = _bnb_config(bits, params)
    return {"method": method, "bits": bits, "quant_type": config.bnb_4bit_quant_type,
            "double_quant": config.bnb_4bit_use_double_quant}  # fmt: skip


def _bnb_config(bits: int, params: dict):
    """transformers' BitsAndBytesConfig. 4 bits: NF4 with double quantization, LLaMA-Factory's defaults
    (its quantization_type / double_quantization flags, which this catalog does not have)."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype(params),
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _hqq_quantize(model, bits: int, params: dict) -> None:
    """Every linear layer but the head replaced by an HQQLinear of `bits` (HQQ's own group size).
    transformers 5.x's HqqConfig path raises NotImplementedError, so the hqq package's API does it."""
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    config = BaseQuantizeConfig(nbits=bits)
    device = quantized_device(params)
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=compute_dtype(params), device=device)


def quantized_device(params: dict) -> str:
    """Where a quantized base lives: the Trainer does not move one (bitsandbytes layers have no `.to`),
    so it is placed at load time on the device this process trains on — its own GPU (LOCAL_RANK under
    torchrun, as LLaMA-Factory does), or the CPU with no_cuda or without CUDA."""
    if params.get("no_cuda") or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def is_quantized(model) -> bool:
    """Whether `model`'s linear layers hold quantized codes (bitsandbytes / transformers quantizers, HQQ)."""
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "hqq_quantized", False))


def load_config(source: str, params: dict, max_length: int | None = None):
    from transformers import AutoConfig

    params = model_flags(params)
    config = _from_hub(AutoConfig.from_pretrained, source, params)
    _rope_scaling(config, params, max_length)
    _moe_aux_loss(config, params)
    return config


def load_model(
    source: str,
    params: dict,
    tokenizer,
    *,
    max_length: int | None = None,
    from_scratch: bool = False,
    device_map: Any = None,
):
    """A causal LM from `source` with every model flag applied (not yet made trainable)."""
    from transformers import AutoModelForCausalLM

    params = model_flags(params)
    config = load_config(source, params, max_length)
    common = {"dtype": load_dtype(params), "attn_implementation": attn_implementation(params)}
    if from_scratch:
        if quantization(params) is not None:
            raise UserError(
                "quantization_bit with train_from_scratch: a random init is not quantized (QLoRA adapts a "
                "pretrained base); remove quantization_bit or train_from_scratch"
            )
        # Random init from the config; the caller has seeded the RNGs.
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=bool(params.get("trust_remote_code")), **common
        )
    else:
        extra = {}
        if params.get("use_safetensors"):
            extra["use_safetensors"] = True  # refuse pickled .bin weights
        if device_map is not None:
            extra["device_map"] = device_map
        quant = quantization(params)
        if quant is not None and quant[0] == "bnb":
            extra["quantization_config"] = _bnb_config(quant[1], params)
            extra.setdefault("device_map", {"": quantized_device(params)})
        model = _from_hub(AutoModelForCausalLM.from_pretrained, source, params, config=config, **common, **extra)
        if quant is not None and quant[0] == "hqq":
            _hqq_quantize(model, quant[1], params)
    apply_model_flags(model, params, tokenizer)
    return model


def apply_model_flags(model, params: dict, tokenizer) -> None:
    """The flags that act on a built model: vocabulary, upcasts, cache."""
    resize_vocab(model, params, tokenizer)
    if params.get("upcast_layernorm"):
        for name, param in model.named_parameters():
            if param.ndim == 1 and any(part in name for part in NORM_NAMES):
                param.data = param.data.to(torch.float32)
    if params.get("upcast_lmhead_output"):
        head = model.get_output_embeddings()
        if not getattr(head, "_tunepipe_upcast", False):
            head.register_forward_hook(lambda module, args, output: output.to(torch.float32))
            head._tunepipe_upcast = True
    model.config.use_cache = bool(params["use_cache"])


def resize_vocab(model, params: dict, tokenizer) -> bool:
    """Grow the embeddings to the tokenizer when it has more tokens than the model (after add_tokens)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    if not (params.get("resize_vocab") or params.get("add_tokens") or params.get("add_special_tokens")):
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings only {rows}: "
            "set model.resize_vocab: true"
        )
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    return True


# ---------------------------------------------------------------- structure


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer but the output head: what `lora_target: all` means.
    (GPT-2 style models store theirs as transformers' Conv1D, a linear layer with (in, out) weights;
    an HQQ-quantized base as HQQLinear.)"""
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear subclasses
    if getattr(model, "hqq_quantized", False):
        from hqq.core.quantize import HQQLinear

        kinds += (HQQLinear,)
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, kinds) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def decoder_layers(model) -> tuple[str, int]:
    """The dotted name of the decoder-layer ModuleList and its length."""
    want = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == want and name.endswith("layers"):
            return name, len(module)
    raise UserError(f"cannot find the decoder layers of model type {model.config.model_type} for freeze tuning")


def module_name(model, module) -> str:
    """The dotted name of `module` inside `model` (e.g. the output head: "lm_head")."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise UserError(f"{type(module).__name__} is not part of this {model.config.model_type} model")


# ---------------------------------------------------------------- trained artifacts


def load_trained(
    artifact: Path,
    params: dict | None = None,
    *,
    model_dir: str | Path | None = None,
    spec_dir: str | Path | None = None,
    artifacts: dict[str, Path] | None = None,
    **model_kwargs,
):
    """(model, tokenizer) of a train, merge or quantize artifact, LoRA adapters merged in.

    A LoRA artifact's train.json says how its base was built (see docs/internals.md):
    an upstream artifact (loaded recursively), a model directory or hub id with the
    model flags replayed, or the artifact's own `base/` (a from-scratch init). A quantize
    artifact (quantize.json) is loaded quantized, by its method's library (`quantize.load`).

    train.json records the base model and merged adapters as the spec wrote them, not
    where they lay on the machine that trained: `model_dir` is the local directory of the
    base model (the reading step's `files["model"]`; used for a `model` base, also one
    reached through upstream artifacts), `spec_dir` the directory relative paths are
    resolved against (otherwise the value is used as written: a hub id, an absolute path).
    `artifacts` maps the keys of the step's declared input artifacts to their directories: a base
    named by key (`base.kind: artifact`) is looked up there.
    """
    artifact = Path(artifact)
    info = json.loads((artifact / "train.json").read_text()) if (artifact / "train.json").is_file() else {}
    tokenizer_dir = (
        artifact / "tokenizer" if (artifact / "tokenizer").is_dir() else artifact / "model"
    )  # merge: one HF dir
    tokenizer = load_tokenizer(tokenizer_dir, params or {})
    if (artifact / "quantize.json").is_file():  # a quantize artifact: the library that wrote it reads it
        from tunepipe.runtime import quantize

        model = quantize.load(json.loads((artifact / "quantize.json").read_text())["method"], artifact / "model")
        apply_model_flags(model, model_flags(params), tokenizer)
        return model, tokenizer
    if (artifact / "model").is_dir():
        model = load_model(str(artifact / "model"), params or {}, tokenizer, **model_kwargs)
        return model, tokenizer
    if not (artifact / "adapter").is_dir():
        raise UserError(f"{artifact} holds neither model/ nor adapter/: not a trained model")
    base = info["base"]
    flags = {**info.get("model_flags", {}), **(params or {})}
    if base["kind"] == "artifact":
        if base["key"] not in (artifacts or {}):
            raise UserError(
                f"{artifact.name[:12]} is built on artifact {base['key'][:12]}, which this step did not "
                "declare as an input (a compiler bug: the train chain must be declared)"
            )
        model, _ = load_trained(
            artifacts[base["key"]], flags, model_dir=model_dir, spec_dir=spec_dir, artifacts=artifacts, **model_kwargs
        )
        apply_model_flags(model, flags, tokenizer)
    else:
        if base["kind"] == "own":
            path = str(artifact / base["path"])
        elif model_dir is not None:
            path = str(model_dir)
        else:
            path = _spec_path(base["path"], spec_dir)
        model = load_model(path, flags, tokenizer, max_length=base.get("max_length"), **model_kwargs)
    # An `own` base (a from-scratch init saved beside the adapter) was saved with its merged adapters in it.
    merged = [] if base["kind"] == "own" else [_spec_path(a, spec_dir) for a in base.get("merged_adapters", [])]
    for adapter in [*merged, str(artifact / "adapter")]:
        model = merge_adapter(model, adapter)
    return model, tokenizer


def _spec_path(value: str, spec_dir: str | Path | None) -> str:
    """A model or adapter value as train.json records it (the spec's string) → what to load."""
    from tunepipe.spec import paths

    if spec_dir is None or paths.is_hub_id(Path(spec_dir), value):
        return value
    return str(paths.resolve(Path(spec_dir), value))


def merge_adapter(model, path: str):
    from peft import PeftModel

    if is_quantized(model):
        raise UserError(
            f"cannot merge the LoRA adapter {path} into a quantized base (quantization_bit): the merged "
            "weights would be rounded back to the quantized codes",
            [
                "a train step on a quantized base may continue one adapter (adapter_name_or_path), not merge others",
                "train the earlier steps with finetuning_type full, or remove quantization_bit",
            ],
        )

    return PeftModel.from_pretrained(model, path).merge_and_unload()
