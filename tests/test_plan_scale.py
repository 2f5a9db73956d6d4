"""A 200-step plan (a sweep of 99 points over the bundled tiny model and data): validate, plan and a
fully cached run give every step, read each input once, build nothing and import no torch.

How long they take is bench/plan_scale.py's business; these tests check what they produce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLES

from tunepipe.compiler import digest
from tunepipe.compiler.sweep import compile_resolved
from tunepipe.spec import load_spec
from tunepipe.store import open_store

POINTS = 99  # data and template shared, a train and an infer step per point: 2 + 2 * 99 = 200 steps


def sweep_spec(points: int) -> str:
    rates = ", ".join(f"{(i + 1) * 1e-4:.4g}" for i in range(points))
    return f"""version: 1
name: scale
seed: 42
model: {{model_name_or_path: $EXAMPLES/models/tiny-llama, train_from_scratch: true}}
data: {{dataset: identity, dataset_dir: $EXAMPLES/data, cutoff_len: 128, val_size: 0.1}}
template: {{template: chatml}}
train:
  - {{name: sft, finetuning_type: lora, lora_target: all, num_train_epochs: 1}}
infer: {{prompt: Who are you?, max_new_tokens: 8}}
sweep:
  matrix:
    train.sft.learning_rate: [{rates}]
"""


@pytest.fixture
def spec(write_spec):
    return write_spec(sweep_spec(POINTS), "sweep.yaml")


def test_a_99_point_sweep_validates_and_plans_to_200_distinct_steps(cli, spec):
    code, out, err = cli("validate", spec)
    assert code == 0 and f"a sweep of {POINTS} points" in out, err
    code, out, err = cli("plan", spec, "--format", "json")
    assert code == 0, err
    steps = json.loads(out)
    assert len(steps) == 200
    assert len({s["id"] for s in steps}) == len({s["key"] for s in steps}) == 200
    assert [s["id"] for s in steps[:4]] == ["data", "template", "train@p1", "infer@p1"]
    assert all(s["status"] == "stale" for s in steps)
    # each point is the spec loaded with its own override: point 57 alone plans to the same train key
    code, out, err = cli("plan", spec, "--point", "57", "--format", "json")
    alone = {s["id"]: s["key"] for s in json.loads(out)}
    assert alone["train"] == next(s["key"] for s in steps if s["id"] == "train@p57")
    assert alone["template"] == next(s["key"] for s in steps if s["id"] == "template")


def test_a_sweep_reads_each_input_directory_once(spec, monkeypatch):
    walked = []
    walk = digest.DigestMemo._walk
    monkeypatch.setattr(
        digest.DigestMemo, "_walk", lambda self, root, names: walked.append(root) or walk(self, root, names)
    )
    plan = compile_resolved(load_spec(spec), [])
    assert len(plan.steps) == 200
    # the model directory (read by template, every train and every infer step) and the dataset directory
    assert sorted(map(str, walked)) == sorted([str(EXAMPLES / "models" / "tiny-llama"), str(EXAMPLES / "data")])


FULLY_CACHED_RUN = """
import json, sys
from tunepipe.cli import main
sys.argv = ["tunepipe", "run", {spec!r}]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = sorted(m for m in ("torch", "transformers", "peft", "numpy", "datasets") if m in sys.modules)
print(json.dumps(heavy))
"""


def test_a_fully_cached_200_step_run_builds_nothing_and_imports_no_torch(spec, tmp_path):
    plan = compile_resolved(load_spec(spec), [])
    store = open_store(plan.cache_dir)
    for step in plan.steps:  # a stand-in artifact per key: the store's own commit, no stage run
        tmp = store.begin(step.key)
        (tmp / f"{step.kind}.txt").write_text(step.key)
        store.commit(tmp, step.key, {"id": step.id, "kind": step.kind, "metrics": {}, "versions": {}})
    built = {entry.key for entry in store.ls()}
    assert built == {step.key for step in plan.steps}

    env = {"TUNEPIPE_STAGE_MODULES": "*=no_such_stage_module"}  # any step that ran would fail
    runs = [
        subprocess.run(
            [sys.executable, "-c", FULLY_CACHED_RUN.format(spec=str(spec))],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        for _ in range(2)
    ]
    for done in runs:
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # no torch, transformers, peft, numpy
        assert "scale: 200 steps (200 cached)" in done.stderr
        assert "sweep: 99 points, best first" in done.stderr
        assert done.stderr.count(" cached\n") == 200  # one line per step, every one cached
    wrote = [[line for line in done.stderr.splitlines() if line.startswith("wrote ")] for done in runs]
    assert wrote == [[f"wrote {spec.parent / 'tunepipe.lock'}"], []]  # the second run leaves the lock as it is
    lock = json.loads((spec.parent / "tunepipe.lock").read_text())["specs"]["sweep.yaml"]["steps"]
    assert {entry["key"] for entry in lock.values()} == built and len(lock) == 200
    assert {entry.key for entry in store.ls()} == built  # nothing built, nothing removed
