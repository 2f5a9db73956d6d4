"""Cross-field rules, checked before any work starts. Each rule is one small function; `RULES` runs them.

A rule gets a `RuleContext` and reports through `ctx.error(path, message)` / `ctx.warn(...)`, where
`path` is a key path into the resolved spec such as ("train", 0, "fp16"); the location printed is
where the user wrote that key (file:line:col or the CLI override).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .catalog import Catalog
from .loader import Diagnostic, Location, ResolvedSpec, show_path
from .naming import entry_names, step_ids
from .paths import is_hub_id, resolve


@dataclass
class RuleContext:
    spec: ResolvedSpec
    catalog: Catalog
    diagnostics: list[Diagnostic] = field(default_factory=list)
    # What rules read from input files, by what they asked: shared by the loads of one command (a
    # sweep's points), so that each file is read once, as the compiler digests each input once.
    file_facts: dict = field(default_factory=dict)

    def read_once(self, question: tuple, read: Callable[..., Any], *args: Any) -> Any:
        """`read(*args)`, unless an earlier load sharing `file_facts` asked the same `question`."""
        if question not in self.file_facts:
            self.file_facts[question] = read(*args)
        return self.file_facts[question]

    @property
    def data(self) -> dict:
        return self.spec.data

    def set(self, path: tuple) -> bool:
        """Did the user write this flag (in the file or as an override)?"""
        return path in self.spec.explicit

    def report(self, path: tuple, message: str, severity: str) -> None:
        location = self.spec.locations.get(path) or Location(str(self.spec.path))
        self.diagnostics.append(Diagnostic(location, show_path(path, self.spec.indexed), message, severity))

    def error(self, path: tuple, message: str) -> None:
        self.report(path, message, "error")

    def warn(self, path: tuple, message: str) -> None:
        self.report(path, message, "warning")

    def train_entries(self) -> Iterator[tuple[tuple, dict]]:
        for index, entry in enumerate(self.data.get("train") or []):
            yield ("train", index), entry


def precision_exclusive(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        chosen = [p for p in ("fp16", "bf16", "fp32") if entry.get(p)]
        if len(chosen) > 1:
            ctx.error((*prefix, chosen[-1]), f"{' and '.join(chosen)} are mutually exclusive: choose one precision")


def evaluation_needed(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        if entry.get("evaluation_strategy") != "no":
            continue
        if entry.get("load_best_model_at_end"):
            ctx.error(
                (*prefix, "load_best_model_at_end"),
                "needs an evaluation strategy: set evaluation_strategy to steps or epoch",
            )
        for name in ("early_stopping_patience", "early_stopping_threshold"):
            if ctx.set((*prefix, name)):
                ctx.error(
                    (*prefix, name),
                    "early stopping needs an evaluation strategy: set evaluation_strategy to steps or epoch",
                )


def eval_steps_only_with_steps(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        if ctx.set((*prefix, "eval_steps")) and entry.get("evaluation_strategy") != "steps":
            ctx.error(
                (*prefix, "eval_steps"),
                f"only used with evaluation_strategy: steps (it is {entry.get('evaluation_strategy')!r})",
            )


def evaluation_needs_validation_split(ctx: RuleContext) -> None:
    data = ctx.data.get("data") or {}
    for prefix, entry in ctx.train_entries():
        val_size = {**data, **entry.get("data", {})}.get("val_size")
        if entry.get("evaluation_strategy") != "no" and not val_size:
            ctx.error((*prefix, "evaluation_strategy"), "evaluation needs a validation split: set data.val_size > 0")


def unsloth_gc_needs_unsloth(ctx: RuleContext) -> None:
    model = ctx.data.get("model") or {}
    if model.get("use_unsloth_gc") and not model.get("use_unsloth"):
        ctx.error(("model", "use_unsloth_gc"), "needs use_unsloth: true")


def quantization_bit_needs_method(ctx: RuleContext) -> None:
    model = ctx.data.get("model") or {}
    hqq = any(entry.get("tuner_backend") == "hqq" for _, entry in ctx.train_entries())
    if model.get("quantization_bit") is not None and model.get("quantization_method") is None and not hqq:
        ctx.error(
            ("model", "quantization_bit"),
            "needs quantization_method (gptq, awq, bnb, cpm or mlc), or a train entry with tuner_backend: hqq",
        )


def hqq_tuner_needs_bits(ctx: RuleContext) -> None:
    model = ctx.data.get("model") or {}
    for prefix, entry in ctx.train_entries():
        if entry.get("tuner_backend") == "hqq" and model.get("quantization_bit") is None:
            ctx.error(
                (*prefix, "tuner_backend"),
                "hqq trains LoRA on an HQQ-quantized base: set model.quantization_bit (4 or 8)",
            )


def quantized_base_needs_lora(ctx: RuleContext) -> None:
    model = ctx.data.get("model") or {}
    if model.get("quantization_bit") is None:
        return
    for prefix, entry in ctx.train_entries():
        if entry.get("finetuning_type", "lora") != "lora":
            ctx.error(
                (*prefix, "finetuning_type"),
                f"{entry['finetuning_type']} on a quantized base (model.quantization_bit): only LoRA adapters "
                "train on quantized weights (QLoRA); use finetuning_type: lora, or drop quantization_bit",
            )


def gradient_checkpointing_contradiction(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        if entry.get("gradient_checkpointing") and entry.get("disable_gradient_checkpointing"):
            ctx.error(
                (*prefix, "disable_gradient_checkpointing"),
                "contradicts gradient_checkpointing: true; keep one of them",
            )


def train_needs_a_method(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        if entry.get("finetuning_type") == "none":
            ctx.error((*prefix, "finetuning_type"), "is none (trains nothing): a train step needs full, freeze or lora")


def lora_flags_need_lora(ctx: RuleContext) -> None:
    lora_flags = [
        f.name
        for f in ctx.catalog.section_flags("train")
        if f.name.startswith("lora_") or f.name in ("adapter_name_or_path", "adapter_folder")
    ]
    for prefix, entry in ctx.train_entries():
        if entry.get("finetuning_type") == "lora":
            continue
        for name in lora_flags:
            if ctx.set((*prefix, name)):
                ctx.error(
                    (*prefix, name),
                    f"only applies to LoRA, but finetuning_type is "
                    f"{entry.get('finetuning_type')!r}; set finetuning_type: lora or remove it",
                )


def merge_needs_lora(ctx: RuleContext) -> None:
    if ctx.data.get("merge") is None:
        return
    train = ctx.data.get("train") or []
    if not train:
        ctx.error(("merge",), "a merge stage needs a LoRA adapter: add a train section with finetuning_type: lora")
    elif train[-1].get("finetuning_type") != "lora":
        ctx.error(
            ("train", len(train) - 1, "finetuning_type"),
            f"the merge stage needs a LoRA adapter, but the last train step is "
            f"{train[-1].get('finetuning_type')!r}: use finetuning_type: lora or drop merge:",
        )


def warmup_ratio_wins(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        if ctx.set((*prefix, "warmup_ratio")) and ctx.set((*prefix, "warmup_steps")) and entry.get("warmup_ratio"):
            ctx.warn((*prefix, "warmup_steps"), f"ignored: warmup_ratio ({entry['warmup_ratio']}) takes precedence")


def max_steps_override_epochs(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        if (entry.get("max_steps") or 0) > 0 and ctx.set((*prefix, "num_train_epochs")):
            ctx.warn((*prefix, "num_train_epochs"), f"ignored: max_steps ({entry['max_steps']}) overrides it")


def export_needs_format(ctx: RuleContext) -> None:
    # What the compiler accepts: a quantize entry's name (naming.py's one rule) or its step id.
    names = entry_names("quantize", ctx.data.get("quantize") or [])
    quantize_names = set(names) | set(step_ids("quantize", names)) if names else set()
    for index, entry in enumerate(ctx.data.get("export") or []):
        if entry.get("format") is None:
            ctx.error(("export", index, "format"), "every export needs a format: gguf, onnx or mlc")
        quantized = entry.get("quantized")
        if quantized is not None and quantized not in quantize_names:
            known = ", ".join(sorted(n for n in quantize_names if n and "." not in n)) or "none"
            ctx.error(("export", index, "quantized"), f"names no quantize target (known: {known})")


def train_stages_need_data(ctx: RuleContext) -> None:
    data = ctx.data.get("data")
    for prefix, entry in ctx.train_entries():
        dataset = {**(data or {}), **entry.get("data", {})}.get("dataset")
        if not dataset:
            where = (*prefix, "data") if data is None else ("data", "dataset")
            ctx.error(where, "training needs a dataset: add data: {dataset: NAME, dataset_dir: DIR}")


def datasets_known(ctx: RuleContext) -> None:
    """Every dataset resolves as the data stage will resolve it (LLaMA-Factory's dataset_info.json)."""
    top = ctx.data.get("data") or {}
    configs = [(("data", "dataset"), top)] if top else []
    configs += [
        ((*prefix, "data", "dataset"), {**top, **entry["data"]})
        for prefix, entry in ctx.train_entries()
        if entry.get("data", {}).get("dataset")
    ]
    for path, config in configs:
        base = resolve(ctx.spec.spec_dir, config.get("dataset_dir") or ".")  # unset: the spec's own directory
        question = ("datasets", str(base), json.dumps(config, sort_keys=True, default=str))
        for message in ctx.read_once(question, _dataset_problems, base, config):
            ctx.error(path, message)


def _dataset_problems(base, config: dict) -> list[str]:
    """Why the datasets of a data config would not load from `base` (a directory), as messages."""
    from ..runtime.datasets import check_files, load_info  # light: `datasets` loads lazily
    from ..runtime.datasets import resolve as resolve_dataset

    if not base.is_dir():
        return []  # input_files_exist reports the directory
    try:
        registry = load_info(base)
    except UserError as exc:
        return [exc.message]
    problems = []
    for name in config.get("dataset") or []:
        try:
            check_files(resolve_dataset(name, base, registry, config))
        except UserError as exc:
            close = difflib.get_close_matches(name, list(registry), n=1) if name not in registry else []
            problems.append(exc.message + (f" (did you mean {close[0]}?)" if close else ""))
    return problems


def template_known(ctx: RuleContext) -> None:
    from ..runtime.template_registry import check_template_file, template_names  # light: no torch

    template = ctx.data.get("template") or {}
    template_file = template.get("template_file")
    if template_file and resolve(ctx.spec.spec_dir, template_file).is_file():
        for problem in check_template_file(resolve(ctx.spec.spec_dir, template_file)):
            ctx.error(("template", "template_file"), problem)
    name = template.get("template")
    if name and not template.get("template_file") and name not in template_names():
        close = difflib.get_close_matches(name, template_names(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        ctx.error(
            ("template", "template"),
            f"unknown template {name!r}: {hint}see `tunepipe templates`, or use template_file for your own",
        )


def input_files_exist(ctx: RuleContext) -> None:
    """Files the spec names must exist now, not hours into a run. Paths are relative to the spec."""
    base = ctx.spec.spec_dir
    checks: list[tuple[tuple, str | None, str]] = []
    template = ctx.data.get("template") or {}
    checks.append((("template", "template_file"), template.get("template_file"), "file"))
    data = ctx.data.get("data") or {}
    checks.append((("data", "dataset_dir"), data.get("dataset_dir"), "dir"))
    for prefix, entry in ctx.train_entries():
        for name in ("deepspeed", "fsdp_config"):
            checks.append(((*prefix, name), entry.get(name), "file"))
        checks.append(((*prefix, "data", "dataset_dir"), entry.get("data", {}).get("dataset_dir"), "dir"))
    for path, value, kind in checks:
        if not value:
            continue
        target = resolve(base, value)
        ok = target.is_file() if kind == "file" else target.is_dir()
        if not ok:
            ctx.error(
                path,
                f"{value}: no such {'file' if kind == 'file' else 'directory'} "
                f"(relative paths are resolved from the spec's directory)",
            )
    model_path = (ctx.data.get("model") or {}).get("model_name_or_path")
    if model_path and not resolve(base, model_path).is_dir() and not is_hub_id(base, model_path):
        ctx.error(
            ("model", "model_name_or_path"),
            f"{model_path}: no such model directory (and not a hub id of the form org/name)",
        )


def tokenizer_needed(ctx: RuleContext) -> None:
    if (ctx.data.get("template") is not None or ctx.data.get("train")) and not (ctx.data.get("model") or {}).get(
        "model_name_or_path"
    ):
        ctx.error(
            ("model", "model_name_or_path"),
            "tokenizing and training need a model (its config and tokenizer): set model.model_name_or_path",
        )


def val_size_is_a_ratio_or_a_count(ctx: RuleContext) -> None:
    configs = [(("data", "val_size"), ctx.data.get("data") or {})]
    configs += [
        ((*prefix, "data", "val_size"), entry["data"])
        for prefix, entry in ctx.train_entries()
        if "val_size" in entry.get("data", {})
    ]
    for path, config in configs:
        value = config.get("val_size")
        if isinstance(value, float) and value >= 1:
            ctx.error(path, f"{value} is a float, so a ratio: it must be below 1 (write an integer for a count)")


def _value(data, path: tuple):
    for part in path:
        data = data[part]
    return data


def null_only_where_meaningful(ctx: RuleContext) -> None:
    """`lora_rank: null` would reach a step as None: only flags whose default is null take null."""
    for path in sorted(ctx.spec.explicit, key=str):
        flag = ctx.catalog.flags.get(path[-1])
        try:
            value = _value(ctx.data, path)
        except (KeyError, IndexError, TypeError):
            continue
        if value is None and flag is not None and flag.default is not None:
            ctx.error(
                path, f"null is not a value of {flag.name}: remove the key for its default ({json.dumps(flag.default)})"
            )


def flags_not_integrated(ctx: RuleContext) -> None:
    """Flags of the reference that this version cannot honour (the catalog's `not_integrated`)."""
    for path in sorted(ctx.spec.explicit, key=str):
        flag = ctx.catalog.flags.get(path[-1])
        if flag is None or not flag.not_integrated:
            continue
        try:
            value = _value(ctx.data, path)
        except (KeyError, IndexError, TypeError):
            continue
        reason = flag.not_integrated.get(value) if isinstance(flag.not_integrated, dict) else flag.not_integrated
        if reason and value not in (None, False, flag.default):
            ctx.error(path, f"not supported by this version of tunepipe: {reason}")


def warmup_ratio_below_one(ctx: RuleContext) -> None:
    for prefix, entry in ctx.train_entries():
        ratio = entry.get("warmup_ratio")
        if isinstance(ratio, (int, float)) and ratio >= 1:
            ctx.error(
                (*prefix, "warmup_ratio"), f"{ratio} would warm up for the whole run (or longer): use a ratio below 1"
            )


def choices_fit_their_kind(ctx: RuleContext) -> None:
    """Choices that depend on another flag of the entry (the catalog's `choices_by`): an export's
    `type` per `format`, a quantize entry's `bits` per `method`."""
    for section in ("export", "quantize"):
        for flag in ctx.catalog.section_flags(section):
            if not flag.choices_by:
                continue
            ((other, table),) = flag.choices_by.items()
            for index, entry in enumerate(ctx.data.get(section) or []):
                allowed = table.get(entry.get(other), [])
                if entry.get(flag.name) is not None and allowed and entry[flag.name] not in allowed:
                    ctx.error(
                        (section, index, flag.name),
                        f"{entry[flag.name]!r} is not a {entry[other]} {flag.name} value: "
                        f"one of {', '.join(map(str, allowed))}",
                    )


QUANTIZE_NOT_REAL = {
    "cpm": "cpm names OpenBMB's cpm_kernels, which LLaMA-Factory only lists and no maintained library uses to "
    "quantize transformers 5 models; use bnb, hqq or gptq",
    "awq": "awq cannot run on this stack (CPU, torch 2.13, transformers 5.x): AutoAWQ is archived and needs CUDA, "
    "and llmcompressor's AWQModifier pins transformers<=5.17; use method: hqq (calibration-free, 2/3/4/8 bits) "
    "or bnb (4/8 bits)",
}
# Quantized weights no exporter reads (packed by their library): export the merged model, or quantize with mlc.
PACKED = ("bnb", "hqq", "gptq")


def exports_read_what_they_package(ctx: RuleContext) -> None:
    entries = ctx.data.get("quantize") or []
    names = entry_names("quantize", entries)
    by_name = {**dict(zip(names, entries)), **dict(zip(step_ids("quantize", names), entries))} if names else {}
    for index, export in enumerate(ctx.data.get("export") or []):
        quantized = by_name.get(export.get("quantized"))
        if quantized is not None and quantized.get("method") in PACKED:
            ctx.error(
                ("export", index, "quantized"),
                f"a {quantized['method']} model holds packed weights that no "
                f"{export.get('format')} exporter reads: export the merged model (drop quantized:), or use "
                "quantize method mlc (its weights stay plain)",
            )


def quantize_method_is_real(ctx: RuleContext) -> None:
    for index, entry in enumerate(ctx.data.get("quantize") or []):
        reason = QUANTIZE_NOT_REAL.get(entry.get("method"))
        if reason:
            ctx.error(("quantize", index, "method"), reason)


def executor_options_fit_kind(ctx: RuleContext) -> None:
    """Each executor kind takes its own options only: `partition:` on a torchrun step is a mistake."""
    base = ctx.data.get("executor") or {}
    for path in sorted(ctx.spec.explicit, key=str):
        if "executor" not in path[:-1]:
            continue
        flag = ctx.catalog.flags.get(path[-1])
        if flag is None or not flag.executors:
            continue
        owner = path[: path.index("executor")]
        own = ctx.data
        for part in owner:
            own = own[part]
        kind = (own.get("executor") or {}).get("kind") or base.get("kind") or "local"
        if kind not in flag.executors:
            fits = [f.name for f in ctx.catalog.section_flags("executor") if not f.executors or kind in f.executors]
            close = difflib.get_close_matches(flag.name, fits, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            ctx.error(path, f"is a {' / '.join(flag.executors)} option; executor kind {kind} does not take it{hint}")


MAX_CUTOFF = 1 << 20  # a million tokens per sample: beyond any model's context, and beyond any host's memory


def _context_length(config) -> Any:
    """max_position_embeddings of a model's config.json (a Path, or None), or None."""
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


def cutoff_len_fits_the_model(ctx: RuleContext) -> None:
    """cutoff_len within the model's context (its local config.json), unless RoPE scaling extends it."""
    model = ctx.data.get("model") or {}
    source = model.get("model_name_or_path")
    config = resolve(ctx.spec.spec_dir, source) / "config.json" if source else None
    limit = ctx.read_once(("max_position_embeddings", str(config)), _context_length, config)
    top = ctx.data.get("data") or {}
    configs = [(("data", "cutoff_len"), top)] + [
        ((*p, "data", "cutoff_len"), {**top, **e["data"]})
        for p, e in ctx.train_entries()
        if "cutoff_len" in (e.get("data") or {})
    ]
    for path, data in configs:
        cutoff = data.get("cutoff_len")
        if not isinstance(cutoff, int):
            continue
        where = path if ctx.set(path) else ("data", "cutoff_len")
        if cutoff > MAX_CUTOFF:
            ctx.error(
                where,
                f"{cutoff} tokens per sample is beyond any model's context (and any host's memory); "
                f"lower it to the context you train for (at most {MAX_CUTOFF})",
            )
        elif isinstance(limit, int) and cutoff > limit and not model.get("rope_scaling"):
            ctx.error(
                where,
                f"{cutoff} exceeds the model's max_position_embeddings ({limit}, in {source}/config.json): "
                "lower it, or set model.rope_scaling (linear, dynamic, yarn, llama3) to extend the context",
            )


def infer_needs_prompt(ctx: RuleContext) -> None:
    infer = ctx.data.get("infer")
    if infer is not None and not infer.get("prompt"):
        ctx.error(
            ("infer", "prompt") if ctx.set(("infer", "prompt")) else ("infer",),
            "infer needs a prompt: the text to answer (infer: {prompt: Who are you?})",
        )


RULES: list[Callable[[RuleContext], None]] = [
    precision_exclusive,
    evaluation_needed,
    eval_steps_only_with_steps,
    evaluation_needs_validation_split,
    unsloth_gc_needs_unsloth,
    quantization_bit_needs_method,
    hqq_tuner_needs_bits,
    quantized_base_needs_lora,
    gradient_checkpointing_contradiction,
    train_needs_a_method,
    lora_flags_need_lora,
    merge_needs_lora,
    warmup_ratio_wins,
    max_steps_override_epochs,
    export_needs_format,
    train_stages_need_data,
    datasets_known,
    template_known,
    input_files_exist,
    tokenizer_needed,
    val_size_is_a_ratio_or_a_count,
    null_only_where_meaningful,
    flags_not_integrated,
    warmup_ratio_below_one,
    infer_needs_prompt,
    choices_fit_their_kind,
    quantize_method_is_real,
    exports_read_what_they_package,
    executor_options_fit_kind,
    cutoff_len_fits_the_model,
]


def resolve_interactions(spec: ResolvedSpec) -> None:
    """Flag interactions settled before anything reads the spec.

    warmup_ratio (default 0.03) takes precedence over warmup_steps, as the seed says — but only when
    the user wrote it: `warmup_steps: 10` alone means ten warmup steps, so the ratio becomes 0."""
    for index, entry in enumerate(spec.data.get("train") or []):
        prefix = ("train", index)
        if (*prefix, "warmup_steps") in spec.explicit and (*prefix, "warmup_ratio") not in spec.explicit:
            entry["warmup_ratio"] = 0.0
    _resolve_exports(spec)


def _resolve_exports(spec: ResolvedSpec) -> None:
    """`export_onnx: true` (the seed's spelling) becomes an onnx export entry; a missing `type` is its
    format's first type in the catalog."""
    exports = spec.data.get("export") or []
    for entry in list(exports):
        if entry.get("export_onnx"):
            if entry.get("format") is None:
                entry["format"] = "onnx"
            elif not any(e.get("format") == "onnx" for e in exports):
                exports.append(
                    {**{k: v for k, v in entry.items() if k not in ("format", "type", "name")}, "format": "onnx"}
                )
    from .catalog import load_catalog

    by_format = load_catalog().flags["type"].choices_by["format"]
    for entry in exports:
        if entry.get("type") is None and entry.get("format") in by_format:
            entry["type"] = by_format[entry["format"]][0]


def check_rules(spec: ResolvedSpec, catalog: Catalog, file_facts: dict | None = None) -> list[Diagnostic]:
    """Every rule's diagnostics. `file_facts`: shared by the loads of one command (RuleContext)."""
    ctx = RuleContext(spec, catalog, file_facts=file_facts if file_facts is not None else {})
    for rule in RULES:
        rule(ctx)
    return ctx.diagnostics
