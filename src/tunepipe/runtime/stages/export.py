"""Export stage: a merged (or fully trained) model → one deployment format.

Input role `model` (a merge artifact, or a full train artifact) or `quantize` (a quantized model).
The format's module `tunepipe/runtime/export/<format>.py` does the work (`export(model_dir, out,
type=, template=, log=)`); this stage hands it one complete HF directory (weights, config, the
tokenizer with the pipeline's chat template) and the template the pipeline trained with, and writes
beside the format's files `template.json` and `export.json` (format, type, what the module reported).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from tunepipe.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def format_module(fmt: str):
    try:
        return importlib.import_module(f"tunepipe.runtime.export.{fmt}")
    except ModuleNotFoundError as exc:
        if exc.name != f"tunepipe.runtime.export.{fmt}":
            raise
        raise UserError(f"export format {fmt}: this version of tunepipe has no {fmt} exporter") from None


def source_artifact(ctx) -> Path:
    return Path(ctx.inputs.get("model") or ctx.inputs["quantize"])


def model_dir(artifact: Path, work: Path) -> Path:
    """One HF directory with weights and tokenizer: a merge artifact's `model/`; for a full train
    artifact (`model/` + `tokenizer/`), a directory of links to both in the step's work dir."""
    model = artifact / "model"
    if not model.is_dir():
        raise UserError(f"{artifact.name[:12]} holds no model/ directory: export needs merged or fully trained weights")
    tokenizer = artifact / "tokenizer"
    if (model / "tokenizer_config.json").is_file() or not tokenizer.is_dir():
        return model
    joined = work / "model"
    shutil.rmtree(joined, ignore_errors=True)
    joined.mkdir(parents=True)
    for directory in (model, tokenizer):
        for item in directory.iterdir():
            if not (joined / item.name).exists():
                (joined / item.name).symlink_to(item.resolve())
    return joined


def template_of(artifact: Path) -> dict:
    path = artifact / "template.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run(ctx) -> dict:
    fmt, kind = ctx.params["format"], ctx.params["type"]
    module = format_module(fmt)
    if kind not in module.SUPPORTED_TYPES:
        raise UserError(f"export type {kind!r} is not a {fmt} type: one of {', '.join(module.SUPPORTED_TYPES)}")
    source = source_artifact(ctx)
    template = template_of(source)
    ctx.log.info("exporting %s as %s %s", source.name[:12], fmt, kind)
    info = module.export(model_dir(source, ctx.work), ctx.out, type=kind, template=template, log=ctx.log)
    (ctx.out / "template.json").write_text(json.dumps(template, indent=2, sort_keys=True, ensure_ascii=False))
    record = {"format": fmt, "type": kind, "info": info}
    (ctx.out / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False))
    return {"format": fmt, "type": kind, **{k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}}
