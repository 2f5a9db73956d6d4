"""The merge stage: the train chain's LoRA adapters merged into its base weights, a standalone model.

    inputs["train"] (the last, LoRA, train artifact) + artifacts (every train artifact of its chain,
    key → dir) + files["model"] (the base model) ─► runtime/merge.py: streaming, tensor by tensor
    (peft's merge_and_unload when the chain needs it, logged with the reason)
    ─► artifact: model/      a complete HF directory: config.json, generation_config.json, sharded
                             safetensors (+ model.safetensors.index.json), and the last train step's
                             tokenizer files, whose tokenizer_config.json / chat_template.jinja carry
                             the chat template the pipeline trained with
                 template.json  copied from the train artifact (infer and exports prompt through it)
                 merge.json     {"method": "streaming"|"peft", "fallback": why peft (or null),
                                 "base": {"kind", "path"|"key"}, "adapters": [{"artifact", "path"} |
                                 {"path"}, … in merge order], "dtype", "tensors", "shards"}
    No absolute path and no timing is written: the bytes are a function of the inputs.

What the merge flags mean here:
- `merge_lora`, `merge_lora_and_save` (the seed's "merge the LoRA weights into the base", "save the
  merged model as a complete model"): that is what this stage is, and a spec asks for it with its
  `merge:` section; the stage always merges and always saves a complete model, whatever their value.
- `auto_merge_weights` ("merge several adapters' weights"): every adapter of the chain is merged,
  in the order the chain applied them, set or not: the last adapter was trained on the weights the
  earlier ones produced, so a model with fewer of them merged is one nobody trained.
- `adapter_name_or_path`, `adapter_folder` (read from the last train entry): inputs of this step, so
  its key covers those adapters' files. The adapters they name are merged as the chain recorded
  them, each once: train.json's `merged_adapters` (merged before training), and the last one listed,
  which that step continued training, through its trained weights (the artifact's `adapter/`).
- `save_safetensors`: the weights are always safetensors.
- `max_shard_size` (bytes, or a string such as "5GB"): the largest output shard; null: transformers'
  own save_pretrained default.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from pathlib import Path

from tunepipe.runtime import merge


def run(ctx) -> dict:
    started = time.perf_counter()
    out = Path(ctx.out)
    artifact, artifacts = Path(ctx.inputs["train"]), {k: Path(v) for k, v in ctx.artifacts.items()}
    where = {"model_dir": ctx.files.get("model"), "spec_dir": ctx.spec_dir, "artifacts": artifacts}
    chain = merge.resolve_chain(artifact, ctx.upstream["train"], params=ctx.params, **where)
    shard_size = _shard_size(ctx.params.get("max_shard_size"))
    model_dir = out / "model"
    fallback = None
    try:
        info = merge.merge_streaming(chain, model_dir, shard_size=shard_size, log=ctx.log)
    except merge.StreamingUnsupported as why:
        fallback = why.reason  # merge.json names no local path
        ctx.log.info("streaming merge not possible: %s; merging in memory with peft's merge_and_unload", why)
        shutil.rmtree(model_dir, ignore_errors=True)
        info = merge.merge_with_peft(artifact, model_dir, params=ctx.params, shard_size=shard_size, **where)
    for file in sorted(chain.tokenizer.iterdir()):
        shutil.copyfile(file, model_dir / file.name)
    template = artifact / "template.json"
    if template.is_file():
        shutil.copyfile(template, out / "template.json")
    record = {
        "method": "peft" if fallback else "streaming",
        "fallback": fallback,
        "base": chain.base_record,
        "adapters": [adapter.record for adapter in chain.adapters],
        **{k: info[k] for k in ("dtype", "tensors", "shards")},
    }
    (out / "merge.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    ctx.log.info(
        "merged %d adapters into %s (%s, %d tensors)",
        len(chain.adapters),
        chain.base_record,
        record["method"],
        info["tensors"],
    )
    return {
        "method": record["method"],
        "adapters": len(chain.adapters),
        "tensors": info["tensors"],
        "bytes": info["bytes"],
        "shards": info["shards"],
        "wall_s": time.perf_counter() - started,
    }


def _shard_size(value) -> int:
    from transformers import PreTrainedModel
    from transformers.utils.hub import convert_file_size_to_int

    if value is None:
        value = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    return convert_file_size_to_int(value)
