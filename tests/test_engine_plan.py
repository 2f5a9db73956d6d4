"""The compiler: steps, cache keys, statuses and their reasons, renderings, the lock file. In-process, no workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fake_stages import PROJECT_STEPS, compile_project, make_project, read_spec, write_spec

from tunepipe.compiler import digest as digest_module
from tunepipe.compiler.lockfile import read_lock, write_lock
from tunepipe.compiler.render import render
from tunepipe.compiler.status import annotate, frozen_violations
from tunepipe.errors import FrozenPlanError, UserError
from tunepipe.runner import cache_gc, run_plan
from tunepipe.store import open_store


def build_in_process(plan) -> None:
    """Stand-in for a run: commit a small artifact per step and write the lock."""
    store = open_store(plan.cache_dir)
    for step in plan.steps:
        if not store.has(step.key):
            tmp = store.begin(step.key)
            (tmp / "out.txt").write_text(step.key)
            store.commit(tmp, step.key, {"id": step.id, "kind": step.kind})
    write_lock(plan, store)


def keys(plan) -> dict[str, str]:
    return {step.id: step.key for step in plan.steps}


def stale(plan) -> dict[str, list[str]]:
    return {i: s.reasons for i, s in annotate(plan).items() if s.state == "stale"}


def edit(root: Path, change) -> None:
    spec = read_spec(root)
    change(spec)
    write_spec(root, spec)


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    make_project(root)
    return root


def test_the_dag_follows_the_spec(project):
    plan = compile_project(project)
    assert [s.id for s in plan.steps] == PROJECT_STEPS
    assert plan.step("train").inputs == {"template": "template"}
    assert plan.step("export.gguf").inputs == {"quantize": "quantize"}
    assert plan.step("export.onnx").inputs == {"model": "merge"}
    assert plan.step("verify.gguf").inputs == {"export": "export.gguf", "reference": "quantize", "probes": "template"}
    assert plan.step("verify.quantize").inputs == {"quantized": "quantize", "reference": "merge", "probes": "template"}
    assert plan.step("infer").inputs == {"model": "merge"}
    # params: every flag the step reads; key params: the artifact ones, path flags left to digests
    train = plan.step("train")
    assert train.params["logging_steps"] == 5 and "logging_steps" not in train.key_params
    assert train.params["model_name_or_path"] == "models/tiny" and "model_name_or_path" not in train.key_params
    assert train.key_params["learning_rate"] == 1e-3 and train.key_params["seed"] == 42
    assert set(plan.step("template").digests) == {"model", "template_file"}
    assert train.deliver == project / "out" / "model"


def test_absent_sections_are_absent_steps(project):
    edit(project, lambda s: [s.pop(k) for k in ("merge", "quantize", "export", "infer")])
    plan = compile_project(project)
    assert [s.id for s in plan.steps] == ["data", "template", "train"]


def test_train_entries_chain_and_get_their_own_data(project):
    def two_trains(spec):
        spec["train"] = [
            {"name": "pretrain", "stage": "pt", "data": {"dataset": ["corpus"], "val_size": 0}},
            {"name": "sft", "stage": "sft"},
        ]

    edit(project, two_trains)
    plan = compile_project(project)
    ids = [s.id for s in plan.steps]
    assert ids[:6] == ["data.pretrain", "template.pretrain", "data.sft", "template.sft", "train.pretrain", "train.sft"]
    assert plan.step("train.pretrain").inputs == {"template": "template.pretrain"}
    assert plan.step("train.sft").inputs == {"template": "template.sft", "base": "train.pretrain"}
    assert plan.step("data.pretrain").digests["dataset_dir"].keys() == {"dataset_info.json", "corpus.txt"}
    # merge reads the whole train chain (the adapter's base too), declared; the key holds it already
    assert plan.step("merge").inputs == {"train": "train.sft", "chain.0": "train.pretrain"}
    assert plan.step("merge").key_inputs == {"train": "train.sft"}
    assert plan.step("infer").inputs == {"model": "merge"}  # a merged model stands alone
    # two entries that read the same data share one data/template pair
    edit(project, lambda s: s["train"][0].pop("data"))
    plan = compile_project(project)
    assert [s.id for s in plan.steps][:4] == ["data", "template", "train.pretrain", "train.sft"]
    assert plan.step("train.sft").inputs == {"template": "template", "base": "train.pretrain"}


def test_same_spec_and_inputs_in_two_directories_give_the_same_keys(tmp_path):
    a, b = tmp_path / "a", tmp_path / "somewhere" / "else" / "b"
    make_project(a)
    shutil.copytree(a, b)
    (b / "models" / "tiny" / "weights.bin").touch()  # new mtime, same bytes
    plan_a, plan_b = compile_project(a), compile_project(b)
    assert keys(plan_a) == keys(plan_b)
    assert plan_a.cache_dir != plan_b.cache_dir
    json_a = json.loads(render(plan_a, annotate(plan_a), "json"))
    assert [row["key"] for row in json_a] == [s.key for s in plan_b.steps]


def test_changing_an_export_flag_leaves_every_upstream_step_cached(project):
    build_in_process(compile_project(project))
    edit(project, lambda s: s["export"][1].update(onnx_opset=18))
    plan = compile_project(project)
    assert stale(plan) == {
        "export.onnx": ["param onnx_opset: 17 → 18"],
        "verify.onnx": ["upstream export.onnx changed"],
    }
    violations = frozen_violations(plan, read_lock(plan.lock_path, "spec.json"))
    assert violations == {"export.onnx": ["param onnx_opset: 17 → 18"], "verify.onnx": ["upstream export.onnx changed"]}
    with pytest.raises(FrozenPlanError) as failure:
        run_plan(plan, frozen=True)
    assert failure.value.exit_code == 3
    assert "export.onnx: param onnx_opset: 17 → 18" in failure.value.details


def test_editing_a_dataset_file_invalidates_data_and_everything_downstream(project):
    build_in_process(compile_project(project))
    (project / "data" / "unrelated.json").write_text("no dataset reads this file")
    assert stale(compile_project(project)) == {}
    (project / "data" / "identity.json").write_text('[{"instruction": "who?", "output": "someone else"}]')
    plan = compile_project(project)
    reasons = stale(plan)
    assert set(reasons) == {s.id for s in plan.steps}
    assert reasons["data"] == ["input dataset_dir: identity.json changed"]
    assert reasons["template"] == ["upstream data changed"]


def test_runtime_only_flags_invalidate_nothing(project):
    before = keys(compile_project(project))

    def runtime_changes(spec):
        spec["name"] = "renamed"
        spec["train"][0].update(logging_steps=1, output_dir="elsewhere")
        spec["data"]["preprocessing_num_workers"] = 8
        spec["export"][0]["export_dir"] = "other/gguf"
        spec["executor"] = {"kind": "torchrun"}
        spec["train"][0]["executor"] = {"kind": "slurm"}

    edit(project, runtime_changes)
    assert keys(compile_project(project)) == before


def test_equal_numbers_give_equal_keys(project):
    before = keys(compile_project(project))
    edit(project, lambda s: s["data"].update(val_size=0.1))  # same value; ints vs floats:
    edit(project, lambda s: s["train"][0].update(learning_rate=1e-3))
    assert keys(compile_project(project)) == before
    edit(project, lambda s: s["train"][0].update(num_train_epochs=3))
    three = keys(compile_project(project))
    edit(project, lambda s: s["train"][0].update(num_train_epochs=3.0))
    assert keys(compile_project(project)) == three


def test_model_and_template_files_are_inputs(project):
    build_in_process(compile_project(project))
    (project / "models" / "tiny" / "weights.bin").write_bytes(b"retrained")
    reasons = stale(compile_project(project))
    assert reasons["template"] == ["input model: weights.bin changed"]
    assert reasons["train"] == ["input model: weights.bin changed", "upstream template changed"]
    (project / "chat.tpl").write_text("changed")
    assert "input template_file: chat.tpl changed" in stale(compile_project(project))["template"]


def test_a_hub_model_id_is_digested_by_name_and_a_missing_path_is_an_error(project):
    edit(project, lambda s: s["model"].update(model_name_or_path="Qwen/Qwen2.5-0.5B"))
    plan = compile_project(project)
    assert plan.step("train").digests["model"] == {"hub": "Qwen/Qwen2.5-0.5B"}
    assert "model" not in plan.step("train").files
    edit(project, lambda s: s["model"].update(model_name_or_path="models/tinny"))
    with pytest.raises(UserError, match="models/tinny: no such file"):
        compile_project(project)


def test_an_unknown_quantized_name_is_a_user_error(project):
    edit(project, lambda s: s["export"][0].update(quantized="q4_k"))
    with pytest.raises(UserError, match="quantized: q4_k names no quantize entry"):
        compile_project(project)


def test_file_digests_are_memoised_by_stat(project, monkeypatch):
    compile_project(project)
    hashed = []
    real = digest_module.sha256_file
    monkeypatch.setattr(digest_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    compile_project(project)
    assert hashed == []
    (project / "models" / "tiny" / "config.json").write_text('{"hidden_size": 16}')
    compile_project(project)
    assert hashed == ["config.json"]


def test_renderings(project):
    plan = compile_project(project)
    statuses = annotate(plan)
    text = render(plan, statuses, "text")
    assert text.splitlines()[0] == "fake: 11 steps, 0 cached, 11 stale"
    assert "└─ template" in text and "verify.gguf" in text and "(also after quantize, template)" in text
    rows = json.loads(render(plan, statuses, "json"))
    assert {"id", "kind", "key", "deps", "status", "reason"} <= set(rows[0])
    assert rows[2]["deps"] == ["template"] and rows[2]["status"] == "stale"
    assert "n0 --> n1" in render(plan, statuses, "mermaid")
    assert '"data" -> "template";' in render(plan, statuses, "dot")
    with pytest.raises(UserError):
        render(plan, statuses, "svg")


def test_a_corrupt_lock_file_is_a_user_error(project):
    plan = compile_project(project)
    plan.lock_path.write_text("{not json")
    with pytest.raises(UserError, match="tunepipe.lock: not a valid lock file"):
        annotate(plan)


def test_the_lock_file_is_sorted_and_stable(project):
    plan = compile_project(project)
    build_in_process(plan)
    text = plan.lock_path.read_text()
    lock = json.loads(text)["specs"]["spec.json"]
    assert list(lock["steps"]) == sorted(lock["steps"])
    assert str(project) not in text  # no absolute paths
    assert lock["steps"]["train"]["params"]["learning_rate"] == 1e-3
    assert lock["steps"]["data"]["inputs"]["dataset_dir"].keys() == {"dataset_info.json", "identity.json"}
    assert write_lock(plan, open_store(plan.cache_dir)) is False  # unchanged: not rewritten
    assert plan.lock_path.read_text() == text


def test_frozen_fails_when_an_artifact_differs_from_the_lock(project):
    import io

    from rich.console import Console

    plan = compile_project(project)
    build_in_process(plan)
    console = Console(file=io.StringIO(), width=200)
    run_plan(plan, frozen=True, console=console)  # every key and output as locked
    assert "warning" not in console.file.getvalue()
    store, merge = open_store(plan.cache_dir), plan.step("merge")
    store.rm(merge.key)  # rebuilt (same key) with other bytes, as a stage that writes timings would
    tmp = store.begin(merge.key)
    (tmp / "out.txt").write_text("other bytes")
    store.commit(tmp, merge.key, {"id": "merge", "kind": "merge"})
    with pytest.raises(FrozenPlanError, match="merge: its output differs from tunepipe.lock"):
        run_plan(plan, frozen=True, console=console)


def test_gc_keeps_the_plan_and_optionally_the_lock(project):
    old = compile_project(project)
    build_in_process(old)
    edit(project, lambda s: s["export"][1].update(onnx_opset=18))
    new = compile_project(project)
    build_in_process(new)  # the lock now names the new keys; the old export.onnx is only in the cache
    store = open_store(new.cache_dir)
    assert cache_gc(store, new, keep_lock=True) == sorted([old.step("export.onnx").key, old.step("verify.onnx").key])
    assert all(store.has(step.key) for step in new.steps)


def test_an_unset_dataset_dir_digests_the_datasets_beside_the_spec(project):
    """No data.dataset_dir means the spec's directory (the data stage's rule): its dataset files are inputs."""
    for name in ("dataset_info.json", "identity.json", "corpus.txt"):
        shutil.move(project / "data" / name, project / name)
    edit(project, lambda s: s["data"].pop("dataset_dir"))
    plan = compile_project(project)
    assert plan.step("data").files["dataset_dir"] == project
    assert plan.step("data").digests["dataset_dir"].keys() == {"dataset_info.json", "identity.json"}
    build_in_process(plan)
    assert stale(compile_project(project)) == {}  # tunepipe.lock and .tunepipe/ are not inputs
    (project / "identity.json").write_text('[{"instruction": "who?", "output": "someone else"}]')
    assert stale(compile_project(project))["data"] == ["input dataset_dir: identity.json changed"]


def test_a_bare_dataset_file_is_digested_alone(project):
    """`dataset: identity.json` with no registry entry: that file is the input, never the whole directory."""
    (project / "data" / "dataset_info.json").unlink()
    shutil.move(project / "data" / "identity.json", project / "identity.json")
    edit(project, lambda s: s["data"].update(dataset=["identity.json"], dataset_dir="."))
    plan = compile_project(project)
    assert plan.step("data").digests["dataset_dir"].keys() == {"identity.json"}
    build_in_process(plan)
    (project / "notes.txt").write_text("beside the spec, read by no dataset")
    assert stale(compile_project(project)) == {}  # the lock written by the build, .tunepipe/, notes.txt: not inputs
    (project / "identity.json").write_text('[{"instruction": "who?", "output": "someone else"}]')
    assert stale(compile_project(project))["data"] == ["input dataset_dir: identity.json changed"]


def test_a_registry_entry_may_name_a_directory(project):
    (project / "data" / "shards").mkdir()
    (project / "data" / "shards" / "a.json").write_text("[]")
    info = json.loads((project / "data" / "dataset_info.json").read_text())
    info["sharded"] = {"file_name": "shards"}
    (project / "data" / "dataset_info.json").write_text(json.dumps(info))
    edit(project, lambda s: s["data"].update(dataset=["sharded"]))
    assert compile_project(project).step("data").digests["dataset_dir"].keys() == {"dataset_info.json", "shards/a.json"}


def test_spec_paths_expand_home_before_joining(project, monkeypatch):
    monkeypatch.setenv("HOME", str(project / "models"))
    edit(project, lambda s: s["model"].update(model_name_or_path="~/tiny"))
    plan = compile_project(project)
    assert plan.step("train").files["model"] == project / "models" / "tiny"


def test_odd_model_directories_are_user_errors_not_crashes(project):
    model = project / "models" / "tiny"
    (model / "loop").symlink_to(model)  # a symlink loop: walked once
    plan = compile_project(project)
    assert set(plan.step("train").digests["model"]) == {"config.json", "weights.bin"}
    (model / "gone.bin").symlink_to(model / "missing.bin")  # a dangling symlink
    with pytest.raises(UserError, match="gone.bin"):
        compile_project(project)
    (model / "gone.bin").unlink()
    (model / "self.bin").symlink_to(model / "self.bin")  # a link to itself
    with pytest.raises(UserError, match="self.bin"):
        compile_project(project)


def test_an_executor_override_enters_the_train_key(project):
    edit(project, lambda s: s["executor"].update(nproc_per_node=2))
    local = compile_project(project)
    assert local.step("train").key_params["world_size"] == 1
    torchrun = compile_project(project, executor_override="torchrun")
    assert all(step.executor["kind"] == "torchrun" for step in torchrun.steps)
    assert torchrun.step("train").key_params["world_size"] == 2
    assert torchrun.step("train").key != local.step("train").key
    assert torchrun.step("template").key == local.step("template").key  # only the process count matters
    edit(project, lambda s: s["executor"].update(kind="torchrun"))
    back = compile_project(project, executor_override="local")
    assert back.step("train").key == local.step("train").key


def test_infer_without_a_model_is_a_user_error(project):
    edit(project, lambda s: [s.pop(k) for k in ("train", "merge", "quantize", "export")])
    with pytest.raises(UserError, match="infer needs a model to work on: add a train or merge section") as error:
        compile_project(project)
    assert error.value.exit_code == 2


def test_two_specs_in_one_directory_keep_their_own_lock_sections(project):
    from fake_stages import CATALOG

    from tunepipe.compiler.lockfile import keys_in_lock
    from tunepipe.compiler.plan import compile_plan

    spec = read_spec(project)
    spec["train"][0]["learning_rate"] = 2e-3
    (project / "other.json").write_text(json.dumps(spec))
    first = compile_project(project)
    build_in_process(first)
    other = compile_plan(spec, project / "other.json", catalog=CATALOG)
    build_in_process(other)  # writes its own section, keeps spec.json's
    lock = json.loads(first.lock_path.read_text())
    assert lock["version"] == 2 and list(lock["specs"]) == ["other.json", "spec.json"]
    assert lock["specs"]["spec.json"]["steps"]["train"]["key"] == first.step("train").key
    assert lock["specs"]["other.json"]["steps"]["train"]["key"] == other.step("train").key
    assert frozen_violations(first, read_lock(first.lock_path, "spec.json")) == {}
    run_plan(compile_project(project), frozen=True)  # spec.json is still frozen after other.json ran
    assert stale(compile_project(project)) == {}
    assert read_lock(first.lock_path, "third.json") is None
    assert keys_in_lock(first.lock_path, "spec.json") == {s.key for s in first.steps}
    assert keys_in_lock(first.lock_path) == {s.key for s in first.steps} | {s.key for s in other.steps}
    text = first.lock_path.read_text()
    build_in_process(compile_project(project))
    assert first.lock_path.read_text() == text  # unchanged: not rewritten


def test_a_version_1_lock_reads_as_the_spec_section_and_is_upgraded(project):
    plan = compile_project(project)
    build_in_process(plan)
    section = json.loads(plan.lock_path.read_text())["specs"]["spec.json"]
    plan.lock_path.write_text(json.dumps({"version": 1, **section}))
    assert frozen_violations(plan, read_lock(plan.lock_path, "spec.json")) == {}
    assert write_lock(plan, open_store(plan.cache_dir)) is True
    assert json.loads(plan.lock_path.read_text()) == {"version": 2, "specs": {"spec.json": section}}


ALL_THREE = ("datasets", "hqq", "bitsandbytes")
QUANTIZATION = ("hqq", "bitsandbytes")


@pytest.mark.parametrize(
    ("kind", "params", "input_kinds", "hidden"),
    [
        ("data", {}, [], QUANTIZATION),
        ("template", {}, ["data"], ALL_THREE),
        ("train", {"tuner_backend": "peft", "quantization_bit": None}, ["template"], ALL_THREE),
        ("train", {"tuner_backend": "hqq", "quantization_bit": 4}, ["template"], ("datasets",)),
        ("train", {"quantization_bit": 4, "quantization_method": "bnb"}, ["template"], ("datasets",)),
        ("train", {"quantization_method": "gptq"}, ["template"], ("datasets",)),  # loaded already quantized
        ("merge", {"quantization_bit": 4}, ["train"], ("datasets",)),  # a QLoRA chain
        ("quantize", {"method": "mlc"}, ["merge"], ("datasets",)),
        ("verify", {"format": "gguf"}, ["export", "quantize", "template"], ("datasets",)),  # a quantized reference
        ("export", {"format": "onnx"}, ["merge", "train"], ALL_THREE),
        ("infer", {}, ["merge"], ALL_THREE),
    ],
)
def test_a_step_hides_the_libraries_it_never_uses(kind, params, input_kinds, hidden):
    """datasets is the data step's; hqq and bitsandbytes are for a step that quantizes or reads a
    quantized model."""
    from tunepipe.stage_table import unused_imports

    assert unused_imports(kind, params, input_kinds) == hidden
