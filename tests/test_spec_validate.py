"""The spec: catalog completeness, strict validation with positions, rules, overrides, schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import EXAMPLES, REPO, SEED_REFERENCE

from tunepipe.spec import load_catalog, load_spec
from tunepipe.spec.models import section_model
from tunepipe.spec.schema import build_schema, render_schema

BASE = """\
model: {model_name_or_path: $EXAMPLES/models/tiny-llama}
data: {dataset: identity, dataset_dir: $EXAMPLES/data}
template: {template: chatml}
train:
  finetuning_type: lora
"""


def seed_flag_names() -> set[str]:
    return set(re.findall(r"^## --([a-z0-9_]+)", SEED_REFERENCE.read_text(encoding="utf-8"), re.M))


@pytest.mark.skipif(not SEED_REFERENCE.exists(), reason="seed reference not beside the repo")
def test_every_seed_flag_is_in_the_catalog_the_schema_and_flags_json(cli):
    names = seed_flag_names()
    assert len(names) == 118
    code, out, _ = cli("flags", "--format", "json")
    assert code == 0
    listed = {row["name"] for row in json.loads(out)}
    assert names - listed == set()
    schema = build_schema()
    in_schema = set(schema["properties"])
    for definition in schema["$defs"].values():
        in_schema |= set(definition["properties"])
    assert names - in_schema == set()


def test_catalog_entries_are_well_formed():
    catalog = load_catalog()
    for flag in catalog.flags.values():
        assert flag.affects in ("artifact", "runtime"), flag.name
        assert flag.section in catalog.sections, flag.name
        assert flag.en and flag.zh, flag.name
        if flag.type == "enum":
            assert flag.choices, flag.name
    # every default is accepted by its own generated model
    for section in catalog.sections:
        defaults = {f.name: f.default for f in catalog.section_flags(section) if f.default is not None}
        section_model(section).model_validate(defaults)


def test_seed_choices_are_kept_exactly():
    catalog = load_catalog()
    assert catalog.flags["rope_scaling"].choices == ("linear", "dynamic", "yarn", "llama3")
    assert catalog.flags["flash_attn"].choices == ("auto", "disabled", "sdpa", "fa2")
    assert catalog.flags["quantization_bit"].choices == (4, 8)
    assert catalog.flags["evaluation_strategy"].default == "no"
    assert catalog.flags["use_cache"].negatable and catalog.flags["use_cache"].default is True


def test_quickstart_is_valid(cli):
    code, out, err = cli("validate", EXAMPLES / "quickstart.yaml")
    assert code == 0, err
    assert "ok" in out


def test_three_mistakes_three_errors_with_positions(cli, write_spec):
    spec = write_spec(BASE + "  lora_rnak: 8\n  learning_rate: fast\n  lr_scheduler_type: cosin\n")
    code, out, err = cli("validate", spec)
    assert code == 2
    assert "Traceback" not in err
    assert f"{spec}:6:3: train.lora_rnak: unknown flag (did you mean lora_rank?)" in err
    assert f"{spec}:7:3: train.learning_rate: expected a number >= 0, got 'fast' (str)" in err
    assert re.search(
        rf"{re.escape(str(spec))}:8:3: train.lr_scheduler_type: expected one of linear, cosine, .*'cosin'", err
    )
    assert "3 errors" in err


def test_flag_in_the_wrong_section_says_where_it_belongs(cli, write_spec):
    spec = write_spec(BASE.replace("dataset: identity,", "dataset: identity, lora_rank: 4,"))
    code, _, err = cli("validate", spec)
    assert code == 2
    assert re.search(r":2:\d+: data.lora_rank: lora_rank is a train flag.*put it under train:", err)


def test_kebab_case_and_negation_spellings(write_spec):
    spec = write_spec(
        BASE.replace("model: {", "model: {no-use-cache: true, use-fast-tokenizer: false, ") + "  lora-rank: 4\n"
    )
    data = load_spec(spec).data
    assert data["model"]["use_cache"] is False
    assert data["model"]["use_fast_tokenizer"] is False
    assert data["train"][0]["lora_rank"] == 4


def test_contradicting_negation_is_an_error(cli, write_spec):
    spec = write_spec(BASE.replace("model: {", "model: {use_cache: true, no_use_cache: true, "))
    code, _, err = cli("validate", spec)
    assert code == 2 and "contradicts" in err


def test_defaults_filled_and_lists_normalised(write_spec):
    spec = write_spec(BASE + "  lora_target: q_proj, v_proj\n")
    data = load_spec(spec).data
    train = data["train"][0]
    assert train["lora_target"] == ["q_proj", "v_proj"]
    assert train["learning_rate"] == 5e-5 and train["lr_scheduler_type"] == "cosine"
    assert data["data"]["dataset"] == ["identity"]
    assert data["merge"] is None and data["export"] == []


def test_print_shows_the_resolved_spec(cli):
    code, out, _ = cli("validate", EXAMPLES / "quickstart.yaml", "--print")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["executor"]["kind"] == "local"
    assert resolved["train"][-1]["adam_beta2"] == 0.999


# -- overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, section, key, value",
    [
        (["--lora-rank", "16"], "train", "lora_rank", 16),
        (["--lora_rank=16"], "train", "lora_rank", 16),
        (["--set", "train.lora_rank=16"], "train", "lora_rank", 16),
        (["--set", "train.0.lora_rank=16"], "train", "lora_rank", 16),
        (["--no-use-cache"], "model", "use_cache", False),
        (["--use-cache", "false"], "model", "use_cache", False),
        (["--fp16"], "train", "fp16", True),
        (["--cutoff-len", "64"], "data", "cutoff_len", 64),
        (["--seed", "7"], None, "seed", 7),
    ],
)
def test_overrides_change_the_resolved_spec(cli, write_spec, args, section, key, value):
    code, out, err = cli("validate", write_spec(BASE), *args, "--print")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    target = resolved if section is None else resolved[section]
    target = target[0] if isinstance(target, list) else target
    assert target[key] == value


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-rnak", "16"], "did you mean lora_rank?"),
        (["--set", "train.lora_rnak=2"], "did you mean lora_rank?"),
        (["--lora-rank", "many"], "expected an integer"),
        (["--set", "data.lora_rank=2"], "lora_rank is a train flag"),
        (["--merge-lora"], "the spec has no merge section"),
        (["--set", "train.3.lora_rank=2"], "no index 3"),
        (["--learning-rate"], "needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_overrides_fail_with_exit_2(cli, write_spec, args, message):
    code, _, err = cli("validate", write_spec(BASE), *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


# -- rules -------------------------------------------------------------------------------------

RULE_CASES = [
    ("precision_exclusive", "  fp16: true\n  bf16: true\n", "train.bf16: fp16 and bf16 are mutually exclusive"),
    (
        "evaluation_needed",
        "  load_best_model_at_end: true\n",
        "train.load_best_model_at_end: needs an evaluation strategy",
    ),
    ("evaluation_needed", "  early_stopping_patience: 2\n", "train.early_stopping_patience: early stopping needs"),
    (
        "eval_steps_only_with_steps",
        "  evaluation_strategy: epoch\n  eval_steps: 5\n",
        "train.eval_steps: only used with",
    ),
    ("evaluation_needs_validation_split", "  evaluation_strategy: epoch\n", "needs a validation split"),
    ("unsloth_gc_needs_unsloth", "", "model.use_unsloth_gc: needs use_unsloth"),
    ("quantization_bit_needs_method", "", "model.quantization_bit: needs quantization_method"),
    ("hqq_tuner_needs_bits", "  tuner_backend: hqq\n", "train.tuner_backend: hqq trains LoRA on an HQQ-quantized base"),
    ("quantized_base_needs_lora", "", "train.finetuning_type: full on a quantized base"),
    (
        "gradient_checkpointing_contradiction",
        "  gradient_checkpointing: true\n  disable_gradient_checkpointing: true\n",
        "train.disable_gradient_checkpointing: contradicts",
    ),
    ("train_needs_a_method", "", "train.finetuning_type: is none"),
    ("lora_flags_need_lora", "", "train.lora_rank: only applies to LoRA"),
    ("merge_needs_lora", "", "the merge stage needs a LoRA adapter"),
    ("export_needs_format", "export: [{onnx_opset: 17}]\n", "export.format: every export needs a format"),
    ("export_needs_format", "export: [{format: gguf, quantized: q2}]\n", "export.quantized: names no quantize target"),
    ("train_stages_need_data", "", "training needs a dataset"),
    ("input_files_exist", "  deepspeed: ds_missing.json\n", "train.deepspeed: ds_missing.json: no such file"),
    ("datasets_known", "", "(did you mean identity?)"),
    ("tokenizer_needed", "", "model.model_name_or_path: tokenizing and training need a model"),
    ("val_size_is_a_ratio_or_a_count", "", "data.val_size: 2.5 is a float, so a ratio"),
    ("template_known", "", "template.template: unknown template 'chatm': did you mean chatml?"),
    ("null_only_where_meaningful", "  lora_rank: null\n", "train.lora_rank: null is not a value of lora_rank"),
    ("flags_not_integrated", "", "model.use_unsloth: not supported by this version of tunepipe: Unsloth"),
    (
        "flags_not_integrated",
        "  quant_lora: true\n",
        "train.quant_lora: not supported by this version of tunepipe: no maintained library",
    ),
    ("warmup_ratio_below_one", "  warmup_ratio: 1\n", "train.warmup_ratio: 1 would warm up for the whole run"),
    ("infer_needs_prompt", "infer: {}\n", "infer needs a prompt"),
    (
        "choices_fit_their_kind",
        "export: [{format: onnx, type: q8_0}]\n",
        "export.type: 'q8_0' is not a onnx type value",
    ),
    (
        "choices_fit_their_kind",
        "quantize: [{method: mlc, bits: 8}]\n",
        "quantize.bits: 8 is not a mlc bits value: one of 4",
    ),
    (
        "quantize_method_is_real",
        "quantize: [{method: awq, bits: 4}]\n",
        "quantize.method: awq cannot run on this stack",
    ),
    (
        "exports_read_what_they_package",
        "quantize: [{method: bnb, bits: 8}]\nexport: [{format: gguf, quantized: bnb8}]\n",
        "export.quantized: a bnb model holds packed weights",
    ),
    ("quantize_method_is_real", "quantize: [{method: cpm}]\n", "quantize.method: cpm names OpenBMB's cpm_kernels"),
    (
        "cutoff_len_fits_the_model",
        "  data: {cutoff_len: 1000000000000}\n",
        "data.cutoff_len: 1000000000000 tokens per sample is beyond any model's context",
    ),
    (
        "cutoff_len_fits_the_model",
        "  data: {cutoff_len: 4096}\n",
        "data.cutoff_len: 4096 exceeds the model's max_position_embeddings (512",
    ),
    (
        "executor_options_fit_kind",
        "executor: {kind: torchrun, partition: gpu}\n",
        "executor.partition: is a slurm option; executor kind torchrun does not take it",
    ),
    (
        "executor_options_fit_kind",
        "  executor: {kind: local, rdzv_endpoint: h:1}\n",
        "train.executor.rdzv_endpoint: is a torchrun option; executor kind local does not take it",
    ),
]


# How each rule's case edits BASE before appending its extra lines: an (old, new) replacement, or a list of them.
RULE_EDITS = {
    "evaluation_needs_validation_split": ("dataset_dir:", "val_size: 0, dataset_dir:"),
    "unsloth_gc_needs_unsloth": ("model: {", "model: {use_unsloth_gc: true, "),
    "flags_not_integrated": ("model: {", "model: {use_unsloth: true, "),
    "quantization_bit_needs_method": ("model: {", "model: {quantization_bit: 4, "),
    "quantized_base_needs_lora": [
        ("model: {", "model: {quantization_bit: 4, quantization_method: bnb, "),
        ("finetuning_type: lora", "finetuning_type: full"),
    ],
    "train_needs_a_method": ("finetuning_type: lora", "finetuning_type: none"),
    "lora_flags_need_lora": ("finetuning_type: lora", "finetuning_type: full\n  lora_rank: 4"),
    "merge_needs_lora": ("finetuning_type: lora", "finetuning_type: full"),
    "datasets_known": ("dataset: identity", "dataset: identty"),
    "tokenizer_needed": ("model: {model_name_or_path: $EXAMPLES/models/tiny-llama}\n", ""),
    "val_size_is_a_ratio_or_a_count": ("dataset: identity,", "dataset: identity, val_size: 2.5,"),
    "template_known": ("template: chatml", "template: chatm"),
    "train_stages_need_data": ("data: {dataset: identity, dataset_dir: $EXAMPLES/data}\n", ""),
}


def _rule_spec(rule: str, extra: str) -> str:
    edits = RULE_EDITS.get(rule, [])
    spec = BASE
    for old, new in [edits] if isinstance(edits, tuple) else edits:
        spec = spec.replace(old, new)
    return spec + ("merge: {}\n" if rule == "merge_needs_lora" else "") + extra


@pytest.mark.parametrize("rule, extra, message", RULE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_each_rule_fires(cli, write_spec, rule, extra, message):
    code, _, err = cli("validate", write_spec(_rule_spec(rule, extra)))
    assert code == 2, err
    assert message in err


def test_every_rule_has_a_case():
    from tunepipe.spec.rules import RULES

    assert {r.__name__ for r in RULES} == {c[0] for c in RULE_CASES} | {
        "max_steps_override_epochs",
        "warmup_ratio_wins",
    }


def test_warmup_steps_alone_means_steps(write_spec):
    only_steps = load_spec(write_spec(BASE + "  warmup_steps: 10\n")).data["train"][0]
    assert only_steps["warmup_steps"] == 10 and only_steps["warmup_ratio"] == 0.0
    both = load_spec(write_spec(BASE + "  warmup_steps: 10\n  warmup_ratio: 0.1\n")).data["train"][0]
    assert both["warmup_ratio"] == 0.1  # the ratio wins, with a warning
    default = load_spec(write_spec(BASE)).data["train"][0]
    assert default["warmup_ratio"] == 0.03 and default["warmup_steps"] == 0


def test_quantize_targets_are_named_as_the_compiler_names_them(cli, write_spec):
    base = BASE + "quantize: [{name: small, method: mlc, bits: 4}, {method: mlc, bits: 4, group_size: 32}]\n"
    for quantized in ("small", "mlc4", "quantize.small", "quantize.mlc4"):
        code, _, err = cli("validate", write_spec(base + f"export: {{format: gguf, quantized: {quantized}}}\n"))
        assert code == 0, err


def test_a_dataset_file_outside_dataset_dir_is_refused(cli, tmp_path, write_spec):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"leak": {"file_name": "../secret.json"}}', encoding="utf-8")
    spec = write_spec(
        BASE.replace("dataset: identity, dataset_dir: $EXAMPLES/data", "dataset: leak, dataset_dir: data")
    )
    code, _, err = cli("validate", spec)
    assert code == 2 and "outside dataset_dir" in err


def test_model_paths_expand_the_home_directory(cli, write_spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(EXAMPLES))
    code, _, err = cli("validate", write_spec(BASE.replace("$EXAMPLES/models/tiny-llama", "~/models/tiny-llama")))
    assert code == 0, err
    code, _, err = cli("validate", write_spec(BASE.replace("$EXAMPLES/models/tiny-llama", "~/models/tiny-lama")))
    assert code == 2 and "no such model directory" in err


def test_a_broken_template_file_is_caught_by_validate(cli, write_spec, tmp_path):
    (tmp_path / "mine.yaml").write_text("user: '{{content}}'\nstop_words: 5\n", encoding="utf-8")
    code, _, err = cli("validate", write_spec(BASE.replace("template: chatml", "template_file: mine.yaml")))
    assert code == 2 and "template.template_file:" in err and "stop_words" in err
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m.content }", encoding="utf-8")
    code, _, err = cli("validate", write_spec(BASE.replace("template: chatml", "template_file: mine.jinja")))
    assert code == 2 and "template.template_file:" in err


def test_warnings_do_not_fail(cli, write_spec):
    spec = write_spec(BASE + "  warmup_ratio: 0.1\n  warmup_steps: 5\n  max_steps: 10\n  num_train_epochs: 2\n")
    code, out, err = cli("validate", spec)
    assert code == 0
    assert "train.warmup_steps: ignored: warmup_ratio (0.1) takes precedence" in err
    assert "train.num_train_epochs: ignored: max_steps (10) overrides it" in err


def test_list_sections_show_the_entry_index(cli, write_spec):
    spec = write_spec(
        BASE.replace(
            "train:\n  finetuning_type: lora\n",
            "train:\n  - {name: a, finetuning_type: full}\n  - {name: b, finetuning_type: lora, bf16: true, fp16: true}\n",
        )
    )
    code, _, err = cli("validate", spec)
    assert code == 2
    assert re.search(r":6:38: train\[1\]\.bf16: fp16 and bf16 are mutually exclusive", err)


# -- schema and imports ------------------------------------------------------------------------


def test_committed_schema_is_current(cli):
    assert (REPO / "schemas" / "tunepipe.schema.json").read_text(encoding="utf-8") == render_schema()
    code, _, _ = cli("schema", "--check", "--path", REPO / "schemas" / "tunepipe.schema.json")
    assert code == 0


def test_stale_schema_is_caught(cli, tmp_path):
    stale = tmp_path / "schema.json"
    stale.write_text(render_schema().replace("lora_rank", "lora_rang"), encoding="utf-8")
    code, _, err = cli("schema", "--check", "--path", stale)
    assert code == 1 and "stale" in err


def test_examples_validate_against_the_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(build_schema())
    for example in sorted(EXAMPLES.glob("*.yaml")):
        doc = yaml.safe_load(example.read_text(encoding="utf-8"))
        assert not list(validator.iter_errors(doc)), example
    assert list(validator.iter_errors({"train": {"lora_rnak": 8}}))


def test_validate_does_not_import_torch():
    code = (
        "import sys; from tunepipe.cli import main; sys.argv=['tunepipe','validate',sys.argv[1]]\n"
        "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
        "heavy=[m for m in ('torch','transformers','peft','datasets','numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES / "quickstart.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_a_damaged_catalog_cache_is_rebuilt():
    from tunepipe.spec import catalog as catalog_module

    catalog_module.load_catalog.cache_clear()
    fresh = catalog_module.load_catalog()
    for cached in (REPO / "src" / "tunepipe" / "spec" / "__pycache__").glob("flags.*.pickle"):
        cached.write_bytes(b"not a pickle")
    catalog_module.load_catalog.cache_clear()
    again = catalog_module.load_catalog()
    assert again.flags == fresh.flags and again.negations == fresh.negations


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "identity.json:2:22: malformed JSON: Expecting ',' delimiter"),
    ("", "is empty: no examples to train on"),
    ("[]", "holds no examples"),
])  # fmt: skip
def test_malformed_and_empty_dataset_files_fail_validate_located(cli, tmp_path, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text('{"identity": {"file_name": "identity.json"}}')
    (data / "identity.json").write_text(content)
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE.replace("$EXAMPLES/data", str(data)).replace("$EXAMPLES", str(EXAMPLES)))
    code, _, err = cli("validate", spec)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_an_unknown_override_of_one_entry_names_the_entry(cli):
    code, _, err = cli("validate", EXAMPLES / "quickstart.yaml", "--set", "train.1.learning_rat=1")
    assert code == 2 and "train[1].learning_rat: unknown flag (did you mean learning_rate?)" in err
