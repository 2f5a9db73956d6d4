"""Merging LoRA adapters into their base weights, streamed tensor by tensor over safetensors shards.

    chain = resolve_chain(train_artifact, key, artifacts=ctx.artifacts, model_dir=ctx.files.get("model"),
                          spec_dir=ctx.spec_dir, params=ctx.params)
    info = merge_streaming(chain, out, shard_size=5 << 30)    # raises StreamingUnsupported, then:
    info = merge_with_peft(train_artifact, out, params=ctx.params, model_dir=…, spec_dir=…,
                           artifacts=ctx.artifacts, shard_size=5 << 30)

**The train chain.** A LoRA train artifact's `train.json` names its base (docs/internals.md,
"Artifact formats"): `{"kind": "artifact", "key": K}` an upstream train artifact, looked up in
`artifacts` (key → local directory, the step's declared inputs; a store path is never computed);
`"own"` the artifact's `base/` (a from-scratch init, saved after the adapters listed in
`merged_adapters` were merged into it); `"model"` the base model directory the caller gives
(`files["model"]`). A full-weights artifact (`model/`) ends the walk. `resolve_chain` returns the
base weights and every adapter in the order the chain applied them: per step, the adapters it
merged before training (`merged_adapters`, resolved against the spec directory) then the one it
trained; plus the model flags the chain replays (the last step's win, as in `modeling.load_trained`).
An adapter trained on a quantized base (QLoRA; train.json's `quantized_base`) is merged into the
full-precision base weights like any other, as LLaMA-Factory's export does; the merged model then
differs from the function it trained as by the base's quantization error only (tests/test_qlora.py).
Its adapter record in merge.json carries `quantized_base`.

**The streaming merge** writes a complete HF directory: config.json (the base's, with the chain's
model flags applied by `modeling.load_config`), generation_config.json when the base has one, and
the weights as `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`
when they exceed `shard_size` bytes. Each output tensor is read from its shard and, when an adapter
changes it, upcast to float32 with each adapter applied in order — `W + scale·(B@A)` (transposed for `fan_in_fan_out`), `scale =
lora_alpha/r` or `lora_alpha/√r` with `use_rslora`, r and alpha per module from `rank_pattern`/
`alpha_pattern`; a tensor the adapter stores whole (`modules_to_save`, trained biases) replaces
the base's — and cast back to the dtype the chain holds the model in (the stored one, or the
model flags' bf16/fp16/fp32) after each adapter, which is what peft's `merge_and_unload` computes
on a model loaded that way. Only one tensor (and its LoRA factors) is in memory at a time: the
input shards are opened per tensor (a kept-open safetensors mapping would keep every page read
resident) and the output is written as it is computed. Tied embeddings stay as transformers
saves them: the head is not stored, so nothing is written for it.

Everything else peft can express (DoRA, embedding or convolution LoRA, `lora_bias`, PiSSA/OLoRA
initialisations that rewrite the base, other peft types, a vocabulary the chain resized, a
`_keep_in_fp32_modules` model cast to 16 bits, a base not on disk as safetensors…) is detected
before anything is written and raises `StreamingUnsupported`, saying why; `merge_with_peft` then
builds the same model with peft, through `modeling.load_trained` (merge_and_unload per adapter).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tunepipe.errors import UserError
from tunepipe.runtime import modeling
from tunepipe.spec import paths

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# safetensors' dtype names (its format spec) ↔ torch.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# adapter_config.json fields the streaming merge reads or that do not change merged weights (the
# last two are read only with megatron_config / use_qalora). Every other field must be unset
# (null, false, empty), or the adapter goes to peft: a peft option added later falls back, safely.
HANDLED_CONFIG = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora",
    "fan_in_fan_out", "bias", "modules_to_save", "init_lora_weights", "megatron_core", "qalora_group_size",
}  # fmt: skip
# Initialisations that only draw A and B; the others (pissa, olora, corda, loftq, …) rewrite the base.
PLAIN_INITS = (True, False, "gaussian")


class StreamingUnsupported(Exception):
    """The chain needs something the streaming merge does not do; merge_with_peft does it.
    `reason` names no local path (it goes into the artifact); the message adds `where`."""

    def __init__(self, reason: str, where: Path | str | None = None):
        super().__init__(f"{where}: {reason}" if where is not None else reason)
        self.reason = reason


# ---------------------------------------------------------------- the train chain


@dataclass(frozen=True)
class Adapter:
    path: Path | str  # a local adapter directory, or a hub id as the spec wrote it
    record: dict  # for merge.json: {"artifact": key, "path": "adapter"} or {"path": as the spec wrote it}


@dataclass(frozen=True)
class Link:
    """One train step of the chain: the adapters it applied, with the tokenizer it trained with."""

    key: str
    tokenizer: Path
    adapters: tuple[Adapter, ...]


@dataclass(frozen=True)
class Chain:
    base: Path | str  # full weights: a local HF directory, or a hub id when the base model is not local
    base_record: dict  # for merge.json, without absolute paths
    links: tuple[Link, ...]  # first train step first
    flags: dict  # the model flags the chain replays, the last step's over the earlier ones'
    max_length: int | None  # the longest sample the first step trained on (rope_scaling)

    @property
    def adapters(self) -> list[Adapter]:
        return [adapter for link in self.links for adapter in link.adapters]

    @property
    def tokenizer(self) -> Path:
        """The last train step's tokenizer (its chat template is the one the pipeline trained with)."""
        return self.links[-1].tokenizer


def resolve_chain(
    artifact: Path,
    key: str,
    *,
    artifacts: dict[str, Path],
    model_dir: str | Path | None,
    spec_dir: str | Path,
    params: dict,
) -> Chain:
    """Walk the LoRA train artifact `artifact` (whose key is `key`) back to full weights (see the
    module docstring). `params` (the reading step's flags) override the model flags the chain recorded."""
    artifact = Path(artifact)
    flags = dict(params)
    links: list[Link] = []
    max_length = None
    while True:
        if (artifact / "model").is_dir():  # full weights: adapters merged into it are part of them
            base, record = artifact / "model", {"kind": "artifact", "key": key, "path": "model"}
            break
        if not (artifact / "adapter").is_dir():
            raise UserError(f"train artifact {key} holds neither model/ nor adapter/: not a trained model")
        info = _train_json(artifact, key)
        flags = {**info.get("model_flags", {}), **flags}
        spec = info["base"]
        # An `own` base was saved after the listed adapters were merged into it: they are in base/.
        merged = (
            []
            if spec["kind"] == "own"
            else [_listed_adapter(v, spec_dir, key) for v in spec.get("merged_adapters", [])]
        )
        # An adapter trained on a quantized base (QLoRA) is merged into the full-precision base weights, as
        # LLaMA-Factory's export does; merge.json says what it was trained on.
        quantized = {"quantized_base": info["quantized_base"]} if info.get("quantized_base") else {}
        own = Adapter(artifact / "adapter", {"artifact": key, "path": "adapter", **quantized})
        links.insert(0, Link(key, artifact / "tokenizer", (*merged, own)))
        if spec["kind"] == "artifact":
            key = spec["key"]
            if key not in artifacts:
                raise UserError(
                    f"train artifact {key} (the base of {links[0].key}) is not among this step's inputs",
                    details=[f"inputs: {', '.join(sorted(artifacts)) or 'none'}"],
                )
            artifact = Path(artifacts[key])
            continue
        max_length = spec.get("max_length")
        if spec["kind"] == "own":
            base, record = artifact / spec["path"], {"kind": "artifact", "key": key, "path": spec["path"]}
        elif spec["kind"] == "model":
            base = Path(model_dir) if model_dir is not None else _model_value(spec["path"], spec_dir)
            record = {"kind": "model", "path": spec["path"]}
        else:
            raise UserError(f"train artifact {key}: unknown base kind {spec['kind']!r} in train.json")
        break
    if not links:
        raise UserError(f"train artifact {key} holds full weights (model/), no LoRA adapter to merge")
    return Chain(base, record, tuple(links), flags, max_length)


def _train_json(artifact: Path, key: str) -> dict:
    try:
        return json.loads((artifact / "train.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"train artifact {key}: cannot read its train.json ({exc})") from exc


def _listed_adapter(value: str, spec_dir, key: str) -> Adapter:
    """An adapter train.json lists as the spec wrote it: a path relative to the spec, or a hub id."""
    path = paths.resolve(Path(spec_dir), value)
    if (path / "adapter_config.json").is_file():
        return Adapter(path, {"path": value})
    if paths.is_hub_id(Path(spec_dir), value):
        return Adapter(value, {"path": value})
    raise UserError(f"adapter {value} (merged before training in train step {key}) is not at {path}")


def _model_value(value: str, spec_dir) -> Path | str:
    path = paths.resolve(Path(spec_dir), value)
    return path if path.is_dir() else value


# ---------------------------------------------------------------- streaming merge


@dataclass(frozen=True)
class Lora:
    a: str  # key of lora_A in the adapter file
    b: str
    scale: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class AdapterPlan:
    file: Path
    lora: dict[str, Lora]  # base tensor name → its LoRA factors
    replace: dict[str, str]  # base tensor name → adapter tensor stored whole (modules_to_save, biases)


def merge_streaming(chain: Chain, out: Path, *, shard_size: int, log=None) -> dict:
    """The merged model of `chain` written into `out` (see the module docstring); its figures."""
    from transformers import AutoTokenizer

    base = _local_base(chain.base)
    config = modeling.load_config(str(base), chain.flags, chain.max_length)
    rows = config.get_text_config().vocab_size
    for link in chain.links:
        size = len(AutoTokenizer.from_pretrained(link.tokenizer))
        if size > rows:
            raise StreamingUnsupported(
                f"the vocabulary grows ({link.key}'s tokenizer has {size} tokens, the embeddings {rows} rows)"
            )
    dtype = modeling.load_dtype(chain.flags)
    dtype = None if dtype == "auto" else dtype
    if chain.flags.get("use_cache") is not None:
        config.use_cache = bool(chain.flags["use_cache"])
    adapters = []
    for adapter in chain.adapters:
        if not isinstance(adapter.path, Path):
            raise StreamingUnsupported("the adapter is not a local directory", adapter.path)
        adapters.append(adapter.path)
    return merge_lora(base, adapters, out, shard_size=shard_size, dtype=dtype, config=config, log=log)


def merge_lora(
    base: Path,
    adapters: list[Path],
    out: Path,
    *,
    shard_size: int,
    dtype: torch.dtype | None = None,
    config=None,
    log=None,
) -> dict:
    """Merge LoRA `adapters` (in order) into the safetensors weights of the HF directory `base`,
    writing `out`. `dtype`: the floating dtype to hold and write the weights in (None: as stored);
    `config`: the transformers config to write (None: the base's). Raises StreamingUnsupported
    before writing anything when an adapter needs peft."""
    from transformers import AutoConfig

    base, out = Path(base), Path(out)
    tensors = _base_tensors(base)  # name → (file, dtype, shape)
    config = config if config is not None else AutoConfig.from_pretrained(base)
    plans = [_plan_adapter(Path(a), tensors, config) for a in adapters]
    dtypes = {name: _out_dtype(stored, dtype) for name, (_, stored, _) in tensors.items()}
    _check_fp32_modules(config, tensors, dtypes)

    def compute(name: str) -> torch.Tensor:
        weight = _read(tensors[name][0], name).to(dtypes[name])
        for plan in plans:
            if name in plan.replace:
                weight = _read(plan.file, plan.replace[name]).to(dtypes[name])
            if name in plan.lora:
                weight = (weight.float() + _delta(plan.file, plan.lora[name])).to(dtypes[name])
        return weight

    shards = _layout(sorted(tensors), lambda n: _nbytes(tensors[n][2], dtypes[n]), shard_size)
    out.mkdir(parents=True, exist_ok=True)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file_name, shard in zip(names, shards):
        write_safetensors(out / file_name, [(n, dtypes[n], tensors[n][2]) for n in shard], compute)
        if log is not None:
            log.info("wrote %s (%d tensors)", file_name, len(shard))
    total = sum(_nbytes(shape, dtypes[n]) for n, (_, _, shape) in tensors.items())
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total, "total_parameters": sum(math.prod(s) for _, _, s in tensors.values())},
            "weight_map": {n: file_name for file_name, shard in zip(names, shards) for n in sorted(shard)},
        }
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((base / "generation_config.json").read_bytes())
    merged = set().union(*(set(p.lora) | set(p.replace) for p in plans))
    return {"tensors": len(tensors), "merged_tensors": len(merged), "bytes": total, "shards": len(shards),
            "dtype": _dtype_label(dtype, dtypes)}  # fmt: skip


def _local_base(base: Path | str) -> Path:
    if not isinstance(base, Path) or not (base / "config.json").is_file():
        raise StreamingUnsupported("the base model is not a local HF directory", base)
    return base


def _base_tensors(base: Path) -> dict[str, tuple[Path, torch.dtype, tuple[int, ...]]]:
    if (base / INDEX).is_file():
        files = sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
    elif (base / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise StreamingUnsupported(f"the base model has no safetensors weights ({SINGLE} or {INDEX})", base)
    tensors = {}
    for name in files:
        for key, (dtype, shape) in _header(base / name).items():
            tensors[key] = (base / name, dtype, shape)
    return tensors


def _header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return {k: (DTYPES[s.get_dtype()], tuple(s.get_shape())) for k, s in slices.items()}


def _read(file: Path, name: str) -> torch.Tensor:
    """One tensor, its file opened for it alone: a kept-open mapping keeps every page read resident."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)


def _delta(file: Path, lora: Lora) -> torch.Tensor:
    """scale·(B@A) in float32, the operations in peft's order (LoraLayer.get_delta_weight)."""
    a, b = _read(file, lora.a).float(), _read(file, lora.b).float()
    product = b @ a
    return (product.T if lora.fan_in_fan_out else product) * lora.scale


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _dtype_label(dtype: torch.dtype | None, dtypes: dict[str, torch.dtype]) -> str:
    floating = sorted({str(d).removeprefix("torch.") for d in dtypes.values() if d.is_floating_point})
    return str(dtype).removeprefix("torch.") if dtype is not None else "+".join(floating) or "none"


def _check_fp32_modules(config, tensors: dict, dtypes: dict) -> None:
    """transformers keeps some models' modules in float32 when loading them in 16 bits."""
    if not any(d in (torch.float16, torch.bfloat16) and d != tensors[n][1] for n, d in dtypes.items()):
        return
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise StreamingUnsupported(
            f"{config.model_type} is not a transformers causal LM; its dtype rules are unknown"
        ) from None
    if getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None):
        raise StreamingUnsupported(f"{cls.__name__} keeps some modules in float32 when cast to 16 bits")


def _plan_adapter(path: Path, tensors: dict, base_config) -> AdapterPlan:
    """Which base tensors `path` changes and how; StreamingUnsupported for what only peft does."""
    config = json.loads((path / "adapter_config.json").read_text())
    _check_adapter_config(config, path)
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise StreamingUnsupported(f"the adapter has no {ADAPTER_WEIGHTS}", path)
    header = _header(file)
    lora, replace = {}, {}
    for key, (_, shape) in header.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            b = f"{PEFT_PREFIX}{module}.lora_B.weight"
            if b not in header:
                raise StreamingUnsupported(f"{key} has no lora_B", path)
            lora[f"{module}.weight"] = Lora(key, b, _scale(config, module), bool(config.get("fan_in_fan_out")))
            _check_lora_shape(path, f"{module}.weight", shape, header[b][1], lora[f"{module}.weight"], tensors)
        elif name.endswith(".lora_B.weight"):
            continue  # with its lora_A
        elif "lora_" in name:
            raise StreamingUnsupported(f"{key} is not a linear LoRA factor", path)
        else:  # stored whole: a modules_to_save copy, or a trained bias of a (wrapped) layer
            target = name.replace(".base_layer.", ".")
            if target not in tensors or tensors[target][2] != shape:
                raise StreamingUnsupported(f"{key} {list(shape)} matches no tensor of the base", path)
            replace[target] = key
    if replace and getattr(base_config.get_text_config(), "tie_word_embeddings", False):
        raise StreamingUnsupported("modules_to_save on a model with tied embeddings", path)
    return AdapterPlan(file, lora, replace)


def _check_adapter_config(config: dict, path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise StreamingUnsupported(f"the adapter is {config.get('peft_type')}, not LoRA", path)
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise StreamingUnsupported(f"init_lora_weights {config['init_lora_weights']!r} rewrites the base weights", path)
    for name, value in config.items():
        if name not in HANDLED_CONFIG and value not in (None, False, {}, []):
            raise StreamingUnsupported(f"{name}={value!r} in adapter_config.json", path)


def _scale(config: dict, module: str) -> float:
    """peft's scaling of `module` (LoraModel._create_and_replace, LoraLayer.update_layer)."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _pattern_key(pattern_keys, module: str) -> str:
    """The rank_pattern/alpha_pattern key that applies to `module`: peft.utils.other.get_pattern_key,
    copied because importing peft adds ~110 MB to a process that otherwise holds one tensor at a time
    (tests check the merged values against peft's own merge with both patterns)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _check_lora_shape(path: Path, target: str, a_shape, b_shape, lora: Lora, tensors: dict) -> None:
    if target not in tensors:
        raise StreamingUnsupported(f"no tensor {target} in the base weights", path)
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise StreamingUnsupported(f"{target} is not a linear layer", path)
    delta = (a_shape[1], b_shape[0]) if lora.fan_in_fan_out else (b_shape[0], a_shape[1])
    if tensors[target][2] != delta:
        raise StreamingUnsupported(f"{target} is {list(tensors[target][2])}, its LoRA update {list(delta)}", path)


# ---------------------------------------------------------------- output


def _layout(names: list[str], nbytes: Callable[[str], int], shard_size: int) -> list[list[str]]:
    """Tensors into shards of at most `shard_size` bytes, in order (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name in names:
        size = nbytes(name)
        if shards[-1] and filled + size > shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def write_safetensors(
    file: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], compute: Callable[[str], torch.Tensor]
) -> None:
    """A safetensors file whose tensors are computed one at a time and written as they come.

    Written by hand (the format is an 8-byte little-endian header length, a JSON header of dtypes,
    shapes and byte offsets, then the bytes): safetensors' own writers take a dict of every tensor
    in memory. The header is known up front from the shapes; tensors are ordered as safetensors
    orders them (widest dtype first, then by name) so each stays aligned to its element size."""
    entries = sorted(entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            tensor = compute(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise AssertionError(
                    f"{name}: computed {tensor.dtype} {list(tensor.shape)}, header says {dtype} {list(shape)}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------- peft fallback


def merge_with_peft(
    artifact: Path,
    out: Path,
    *,
    params: dict,
    model_dir: str | Path | None,
    spec_dir: str | Path,
    artifacts: dict[str, Path],
    shard_size: int,
) -> dict:
    """The same merged model built in memory, the way every other step rebuilds a train chain
    (modeling.load_trained: the base loaded with the model flags, peft's merge_and_unload per
    adapter), saved with save_pretrained."""
    model, _ = modeling.load_trained(artifact, params, model_dir=model_dir, spec_dir=spec_dir, artifacts=artifacts)
    model.save_pretrained(out, max_shard_size=shard_size)
    tensors = _base_tensors(out)  # what was written, read back from the headers
    return {
        "tensors": len(tensors),
        "bytes": sum(_nbytes(shape, dtype) for _, dtype, shape in tensors.values()),
        "shards": len({file for file, _, _ in tensors.values()}),
        "dtype": _dtype_label(None, {n: d for n, (_, d, _) in tensors.items()}),
    }
