"""`tunepipe import`: LLaMA-Factory and axolotl configs (tests/data/import, modelled on the tools'
published examples) become specs that validate, plan the source's training flags, and lose no key
without saying so."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, REPO
from ruamel.yaml import YAML

from tunepipe.compiler.plan import compile_plan
from tunepipe.errors import UserError
from tunepipe.spec import load_spec
from tunepipe.spec.importer import import_command, import_config, show

DATA = REPO / "tests" / "data" / "import"
LF_CONFIGS = sorted(
    p.relative_to(DATA / "llama_factory") for p in (DATA / "llama_factory" / "examples").rglob("*.yaml")
)
AX_CONFIGS = sorted(p.relative_to(DATA / "axolotl") for p in (DATA / "axolotl" / "examples").rglob("*.y*ml"))
CASES = [("llama_factory", c) for c in LF_CONFIGS] + [("axolotl", c) for c in AX_CONFIGS]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A copy of one tool's test tree, the current directory (the tools run from their checkout's root),
    with the output of an earlier LLaMA-Factory full fine-tune that its merge_lora example re-exports."""

    def make(tool: str) -> Path:
        root = tmp_path / tool
        shutil.copytree(DATA / tool, root)
        (root / "saves" / "llama3-8b" / "full" / "sft").mkdir(parents=True)
        monkeypatch.chdir(root)
        return root

    return make


def imported(root: Path, config: Path, **kwargs) -> tuple[Path, dict]:
    """Import `config` into ROOT/<stem>.tunepipe.yaml; (spec path, the config as the tool reads it)."""
    out = root / f"{config.stem}.tunepipe.yaml"
    assert import_command(config, out, **kwargs) == 0
    return out, yaml.safe_load((root / config).read_text())


def comment_text(text: str) -> str:
    return "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)


def flat_spec(text: str) -> dict:
    doc = YAML(typ="safe", pure=True).load(text)
    flat = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    for section in doc.values():
        if isinstance(section, dict):
            flat.update(section)
    return flat


def leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def same(a, b) -> bool:
    """Equal as the tools compare them: PyYAML leaves 2e-5 as text, tunepipe reads a number."""
    if isinstance(a, str) and isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return float(a) == b
        except ValueError:
            return False
    return a == b


@pytest.mark.parametrize("tool,config", CASES, ids=[str(c) for _, c in CASES])
def test_every_config_imports_validates_and_keeps_its_model(checkout, tool, config):
    root = checkout(tool)
    out, source = imported(root, config)
    spec = load_spec(out)
    model = source.get("model_name_or_path") or source["base_model"]
    assert spec.data["model"]["model_name_or_path"] == model
    assert spec.data["name"] == config.stem


@pytest.mark.parametrize("tool,config", CASES, ids=[str(c) for _, c in CASES])
def test_no_key_is_lost_without_a_comment(checkout, tool, config):
    root = checkout(tool)
    result = import_config(config)
    source = yaml.safe_load((root / config).read_text())
    spec, comments = flat_spec(result.text), comment_text(result.text)
    for kept in result.kept_out:  # each kept-out key is listed with its value
        assert f"  {kept.key}: {show(kept.value)}  — " in result.text, kept.key
    for key, value in source.items():
        if key in spec and same(value, spec[key]):
            continue
        named = re.search(rf"(?<![\w.]){re.escape(key)}\b", comments)
        assert named, f"{key}: {value!r} is neither in the spec nor named in a comment"
    info = json.dumps(result.dataset_info)
    for i, dataset in enumerate(source.get("datasets") or []):
        if f"  datasets[{i}]: {show(dataset)}  — " in result.text:  # kept out whole, with every field
            continue
        for key, value in dataset.items():
            named = re.search(rf"datasets\[{i}\]\.{re.escape(key)}\b", comments)
            carried = all(json.dumps(leaf) in info for leaf in leaves(value))  # into the dataset_info.json entry
            assert named or carried or key in ("path", "type"), f"datasets[{i}].{key}"
        assert f"datasets[{i}]: {dataset['path']}" in comments


def test_a_llama_factory_lora_config_plans_its_train_flags(checkout, tmp_path):
    root = checkout("llama_factory")
    out, source = imported(root, Path("examples/train_lora/llama3_lora_sft.yaml"))
    spec = load_spec(out)
    plan = compile_plan(spec.data, spec.path, cache_dir=tmp_path / "cache")
    train = plan.step("train").params
    for key in (
        "stage",
        "finetuning_type",
        "lora_rank",
        "learning_rate",
        "num_train_epochs",
        "cutoff_len",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "lr_scheduler_type",
        "warmup_ratio",
        "bf16",
        "logging_steps",
        "save_steps",
        "plot_loss",
        "ddp_timeout",
    ):
        assert train[key] == source[key], key
    assert train["lora_target"] == [source["lora_target"]]
    # LLaMA-Factory's own defaults, where tunepipe's differ
    assert train["lora_alpha"] == 2 * source["lora_rank"]
    assert (train["lora_dropout"], train["group_by_length"], train["gradient_checkpointing"]) == (0.0, False, True)
    assert plan.step("template").params["template"] == source["template"]
    data = plan.step("data").params
    assert data["dataset"] == source["dataset"].split(",")
    assert (data["max_samples"], data["val_size"]) == (source["max_samples"], 0.0)
    assert (root / "data").samefile(spec.spec_dir / spec.data["data"]["dataset_dir"])


def test_newer_llama_factory_keys_plan_through_the_aliases(checkout, tmp_path):
    root = checkout("llama_factory")
    out, source = imported(root, Path("examples/train_lora/qwen3_lora_sft.yaml"))
    spec = load_spec(out)
    train = compile_plan(spec.data, spec.path, cache_dir=tmp_path / "cache").step("train").params
    assert (train["evaluation_strategy"], train["eval_steps"]) == (source["eval_strategy"], source["eval_steps"])
    assert train["learning_rate"] == 2e-4 and source["learning_rate"] == "2e-4"  # PyYAML's text, the tool's number
    assert (train["lora_rank"], train["lora_alpha"], train["lora_dropout"]) == (16, 32, 0.05)
    assert train["lora_target"] == ["q_proj", "v_proj"]
    assert train["report_to"] == "none"
    text = out.read_text()
    assert "eval_strategy is a newer name of tunepipe's evaluation_strategy" in text
    # qwen3_nothink is no tunepipe template: the model's own chat template renders it
    assert spec.data["template"]["template"] == "auto"
    assert re.search(r"template: auto +# LLaMA-Factory template: qwen3_nothink; no tunepipe template", text)


def test_values_tunepipe_rejects_are_kept_out_with_its_message(checkout):
    root = checkout("llama_factory")
    out, _ = imported(root, Path("examples/train_full/yi_full_sft.yaml"))
    spec = load_spec(out)
    train = spec.data["train"][0]
    assert (train["finetuning_type"], train["evaluation_strategy"], train["warmup_steps"]) == ("full", "no", 20)
    assert (train["report_to"], train["eval_steps"]) == ("none", 500)  # tunepipe's defaults: the values are out
    assert ("train", 0, "lora_rank") not in spec.explicit
    text = out.read_text()
    assert (
        "#   report_to: swanlab  — tunepipe rejects it as train.report_to: expected one of none, tensorboard, "
        "wandb, all"
    ) in text
    assert "#   lora_rank: 8  — tunepipe rejects it as train.lora_rank: only applies to LoRA" in text
    assert (
        "#   eval_steps: 100  — tunepipe rejects it as train.eval_steps: only used with evaluation_strategy: steps"
        in text
    )
    assert 'evaluation_strategy: "no"' in text  # a YAML 1.1 reader must not see false
    assert train["warmup_ratio"] == 0.0  # the transformers Trainer lets warmup_steps win; so does the spec
    assert "#   warmup_ratio: 0.1  — the transformers Trainer ignores it when warmup_steps is set (20)" in text
    assert re.search(
        r"template: yi +# tunepipe's yi renders 01-ai/Yi-34B-Chat's own chat template, whose tokens "
        r"differ from LLaMA-Factory's yi template",
        text,
    )
    assert "LLaMA-Factory's packing lets packed samples attend to each other" in text
    assert (spec.data["seed"], spec.data["model"]["flash_attn"]) == (7, "fa2")


def test_an_untrainable_stage_keeps_the_train_section_out(checkout):
    checkout("llama_factory")
    result = import_config(Path("examples/train_lora/llama3_lora_dpo.yaml"))
    assert "\ntrain:" not in result.text
    assert "# No train section: LLaMA-Factory stage dpo has no tunepipe equivalent" in result.text
    train = {k.key: k.value for k in result.kept_out if k.kind == "train"}
    assert train["stage"] == "dpo" and train["learning_rate"] == 5e-6 and train["lora_rank"] == 8
    lost = {k.key: k.reason for k in result.kept_out if k.kind == "lost"}
    assert set(lost) == {"pref_beta", "pref_loss"}
    assert flat_spec(result.text)["dataset"] == "dpo_en_demo"


def test_an_export_config_with_its_training_config_adds_the_merge(checkout):
    root = checkout("llama_factory")
    train, export = Path("examples/train_lora/llama3_lora_sft.yaml"), Path("examples/merge_lora/llama3_lora_sft.yaml")
    out, _ = imported(root, train, export=export)
    spec = load_spec(out)
    assert spec.data["merge"]["max_shard_size"] == "2GB"  # export_size: 2 (GB)
    assert {p[1] for p in spec.explicit if p[0] == "merge"} == {"max_shard_size"}
    assert spec.data["train"][0]["finetuning_type"] == "lora"
    kept = {k.key: k for k in import_config(train, export=export).kept_out}
    assert kept["merge_lora/llama3_lora_sft.yaml: adapter_name_or_path"].kind == "same"  # the train step's output_dir
    assert kept["merge_lora/llama3_lora_sft.yaml: export_device"].value == "cpu"
    assert kept["merge_lora/llama3_lora_sft.yaml: export_dir"].kind == "lost"
    # an export config merging another adapter says so
    other = root / "other_export.yaml"
    other.write_text((root / export).read_text().replace("saves/llama3-8b/lora/sft", "saves/elsewhere"))
    kept = {k.key: k for k in import_config(train, export=other).kept_out}
    assert "not this one" in kept[f"{root.name}/other_export.yaml: adapter_name_or_path"].reason
    # alone, an export config imports what it can and says how to get a merge section
    alone = import_config(export)
    assert "\nmerge:" not in alone.text and "--export llama3_lora_sft.yaml" in alone.text


def test_a_gptq_export_config_with_a_full_fine_tune_adds_the_quantize(checkout):
    root = checkout("llama_factory")
    export = root / "gptq_export.yaml"  # merge_lora/llama3_gptq.yaml, quantizing the full fine-tune's output
    export.write_text(
        (root / "examples/merge_lora/llama3_gptq.yaml")
        .read_text()
        .replace("meta-llama/Meta-Llama-3-8B-Instruct", "saves/llama3-8b/full/sft")
    )
    out, _ = imported(root, Path("examples/train_full/llama3_full_sft.yaml"), export=export)
    spec = load_spec(out)
    assert spec.data["merge"] is None
    assert [(q["method"], q["bits"]) for q in spec.data["quantize"]] == [("gptq", 4)]
    kept = {k.key: k for k in import_config(Path("examples/train_full/llama3_full_sft.yaml"), export=export).kept_out}
    label = f"{root.name}/gptq_export.yaml"
    assert kept[f"{label}: model_name_or_path"].reason == "the model this spec's train step trains"
    calibration = kept[f"{label}: export_quantization_dataset"].reason
    assert "calibrates GPTQ on samples of the pipeline's own tokenized data" in calibration
    assert kept[f"{label}: export_size"].kind == "lost"  # no merge to shard
    # the published config quantizes the base model: nothing this spec trains
    kept = {
        k.key: k
        for k in import_config(
            Path("examples/train_full/llama3_full_sft.yaml"), export=Path("examples/merge_lora/llama3_gptq.yaml")
        ).kept_out
    }
    assert "not a model this spec trains" in kept["merge_lora/llama3_gptq.yaml: export_quantization_bit"].reason


def test_axolotl_lora_plans_its_flags_and_writes_dataset_info(checkout, tmp_path):
    root = checkout("axolotl")
    out, source = imported(root, Path("examples/llama-3/lora-1b.yml"))
    assert json.loads((root / "dataset_info.json").read_text()) == {
        "GPT4-LLM-Cleaned": {"hf_hub_url": "teknium/GPT4-LLM-Cleaned", "formatting": "alpaca"}
    }
    spec = load_spec(out)
    plan = compile_plan(spec.data, spec.path, cache_dir=tmp_path / "cache")
    train = plan.step("train").params
    assert (train["finetuning_type"], train["lora_rank"], train["lora_alpha"], train["lora_dropout"]) == (
        "lora",
        16,
        32,
        0.05,
    )
    assert train["lora_target"] == source["lora_target_modules"]
    assert (train["per_device_train_batch_size"], train["gradient_accumulation_steps"], train["num_train_epochs"]) == (
        2,
        2,
        1,
    )
    assert (train["learning_rate"], train["lr_scheduler_type"], train["warmup_ratio"]) == (2e-4, "cosine", 0.1)
    assert (train["cutoff_len"], train["bf16"], train["tf32"], train["gradient_checkpointing"]) == (
        2048,
        True,
        False,
        True,
    )
    template = plan.step("template").params
    assert (template["packing"], template["template"]) == (True, "alpaca")
    assert plan.step("data").params["val_size"] == 0.1
    assert re.search(r"bf16: true +# axolotl bf16: auto; axolotl's auto means bf16", out.read_text())


def test_axolotl_qlora_loads_a_4_bit_bnb_base(checkout):
    root = checkout("axolotl")
    out, _ = imported(root, Path("examples/llama-3/qlora.yml"))
    spec = load_spec(out)
    assert (spec.data["model"]["quantization_bit"], spec.data["model"]["quantization_method"]) == (4, "bnb")
    assert (spec.data["model"]["attn_implementation"], spec.data["train"][0]["lora_target"]) == (
        "flash_attention_2",
        ["all"],
    )
    assert spec.data["data"]["val_size"] == 0


def test_axolotl_local_conversations_read_through_the_generated_entry(checkout):
    from tunepipe.runtime.datasets import load_info, normalise, resolve

    root = checkout("axolotl")
    out, source = imported(root, Path("examples/local/chat-template-local.yml"))
    spec = load_spec(out)
    assert (root / "chat_template.jinja").read_text() == source["chat_template_jinja"]
    assert spec.data["template"]["template_file"] == "chat_template.jinja"
    info = load_info(root)
    attr = resolve("conversations", root, info, spec.data["data"])
    rows = [json.loads(line) for line in (root / "data" / "conversations.jsonl").read_text().splitlines()]
    assert normalise(rows[0], attr, "sft")["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    # a role's second name does not fit one dataset_info.json tag: said in the spec, and such rows are dropped
    assert normalise(rows[1], attr, "sft") is None
    assert '#   datasets[0].roles.user: ["user"]  — a role has one name' in out.read_text()
    train = spec.data["train"][0]
    assert (train["max_steps"], train["lora_target"]) == (100, ["q_proj", "v_proj"])
    assert (train["evaluation_strategy"], train["eval_steps"]) == ("steps", 20)
    assert ("train", 0, "num_train_epochs") not in spec.explicit  # max_steps decides


def test_axolotl_dataset_info_is_merged_and_never_overwritten_silently(checkout):
    root = checkout("axolotl")
    (root / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    imported(root, Path("examples/llama-3/qlora.yml"))
    info = json.loads((root / "dataset_info.json").read_text())
    assert set(info) == {"mine", "alpaca_subset_1"}
    info["alpaca_subset_1"] = {"hf_hub_url": "someone/else"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not overwrite") as exc:
        import_command(Path("examples/llama-3/qlora.yml"), root / "again.yaml")
    assert any("different entry 'alpaca_subset_1'" in d for d in exc.value.details)
    assert not (root / "again.yaml").exists()  # nothing written when anything would be overwritten
    assert import_command(Path("examples/llama-3/qlora.yml"), root / "again.yaml", force=True) == 0
    assert (
        json.loads((root / "dataset_info.json").read_text())["alpaca_subset_1"]["hf_hub_url"]
        == "aaditya/alpaca_subset_1"
    )


def test_an_existing_spec_needs_force(checkout):
    root = checkout("llama_factory")
    config = Path("examples/train_lora/llama3_lora_sft.yaml")
    out = root / "spec.yaml"
    out.write_text("mine\n")
    with pytest.raises(UserError, match="pass --force"):
        import_command(config, out)
    assert out.read_text() == "mine\n"
    assert import_command(config, out, force=True) == 0
    assert out.read_text() == import_config(config).text


def test_without_output_the_spec_goes_to_stdout(checkout, capsys):
    root = checkout("llama_factory")
    config = Path("examples/train_lora/llama3_lora_sft.yaml")
    assert import_command(config) == 0
    captured = capsys.readouterr()
    assert captured.out == import_config(config).text
    assert "imported examples/train_lora/llama3_lora_sft.yaml (LLaMA-Factory)" in captured.err
    assert sorted(p.name for p in root.iterdir()) == ["data", "examples", "saves"]  # no probe file left


def test_a_spec_with_a_missing_input_is_written_and_reported(checkout, capsys):
    root = checkout("llama_factory")
    shutil.rmtree(root / "examples" / "deepspeed")
    out = root / "full.yaml"
    assert import_command(Path("examples/train_full/llama3_full_sft.yaml"), out) == 2
    err = capsys.readouterr().err
    assert "check: deepspeed: examples/deepspeed/ds_z3_config.json not found" in err
    assert re.search(r"full\.yaml:\d+:\d+: train\.deepspeed: examples/deepspeed/ds_z3_config\.json: no such file", err)
    assert "deepspeed: examples/deepspeed/ds_z3_config.json" in out.read_text()


def test_an_unknown_tool_is_a_user_error(tmp_path):
    config = tmp_path / "trainer.yaml"
    config.write_text("model: gpt2\nepochs: 3\n")
    with pytest.raises(UserError, match="not a config tunepipe can import") as exc:
        import_config(config)
    details = "\n".join(exc.value.details)
    assert "model_name_or_path" in details and "base_model" in details and "found: model, epochs" in details
    with pytest.raises(UserError, match="a tunepipe spec already"):
        import_config(EXAMPLES / "quickstart.yaml")


def test_broken_yaml_is_a_user_error_with_its_location(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model_name_or_path: gpt2\nstage: sft\ndataset: [identity\nlearning_rate: 1e-4\n")
    with pytest.raises(UserError) as exc:
        import_config(config)
    assert re.match(rf"{re.escape(str(config))}:4:14: YAML syntax error: ", exc.value.message)
    config.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping of config keys, got list"):
        import_config(config)


def test_axolotl_liger_and_fsdp_mappings_become_flags_and_a_file(checkout):
    root = checkout("axolotl")
    out, source = imported(root, Path("examples/llama-3/fft-8b-liger-fsdp.yaml"))
    spec = load_spec(out)
    assert spec.data["model"]["enable_liger_kernel"] is True
    train = spec.data["train"][0]
    assert (train["fsdp"], train["fsdp_config"], train["finetuning_type"]) == (
        "full_shard auto_wrap",
        "fsdp_config.json",
        "full",
    )
    assert json.loads((root / "fsdp_config.json").read_text()) == source["fsdp_config"]
    assert spec.data["data"]["val_size"] == 0.02
    entry = json.loads((root / "dataset_info.json").read_text())["FineTome-100k"]
    assert entry == {
        "split": "train[:20%]",
        "hf_hub_url": "mlabonne/FineTome-100k",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
            "system_tag": "system",
            "observation_tag": "tool",
        },
    }
    assert "datasets[0]: roles read as human/gpt; axolotl also reads user/assistant" in out.read_text()
    line = next(line for line in out.read_text().splitlines() if line.lstrip().startswith("enable_liger_kernel"))
    assert line.count("patches every one Liger has") == 1  # one note for the four keys that set it


def test_axolotl_pretraining_corpus_trains_stage_pt(checkout):
    root = checkout("axolotl")
    out, _ = imported(root, Path("examples/tiny-llama/pretrain.yml"))
    spec = load_spec(out)
    train = spec.data["train"][0]
    assert (train["stage"], train["finetuning_type"], train["max_steps"]) == ("pt", "full", 200)
    assert ("train", 0, "num_train_epochs") in spec.explicit  # num_epochs: 4 was in the config
    assert json.loads((root / "dataset_info.json").read_text()) == {
        "c4_en": {"subset": "en", "hf_hub_url": "allenai/c4", "formatting": "alpaca", "columns": {"prompt": "text"}}
    }


def test_axolotl_user_defined_format_and_a_corpus_among_instructions(checkout):
    from tunepipe.runtime.datasets import load_info, normalise, resolve

    root = checkout("axolotl")
    out, source = imported(root, Path("examples/local/mixed.yml"))
    spec = load_spec(out)
    assert spec.data["data"]["dataset"] == ["instructions"] and spec.data["train"][0]["stage"] == "sft"
    attr = resolve("instructions", root, load_info(root), spec.data["data"])
    assert normalise({"question": "2+2?", "answer": "4"}, attr, "sft")["messages"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    text = out.read_text()
    assert "#   datasets[1]: " in text and "tunepipe trains it with stage: pt, in a train entry of its own" in text
    assert (
        '#   datasets[0].type.format: "[INST] {instruction} [/INST]"  — tunepipe\'s template renders the prompt' in text
    )
