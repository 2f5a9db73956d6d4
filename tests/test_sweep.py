"""Sweeps: one spec, several points; every step whose key is equal across points is one node, built once."""

from __future__ import annotations

import copy
import io
import json

import pytest
from fake_stages import CATALOG, make_project, read_spec, worker_env
from rich.console import Console

from tunepipe.compiler.sweep import compile_sweep
from tunepipe.errors import UserError
from tunepipe.runner import print_summary, run_plan, sweep_rows
from tunepipe.spec import load_spec, sweep
from tunepipe.store import open_store

QUICKSTART_SWEEP = """
sweep:
  matrix:
    train.sft.learning_rate: [1.0e-2, 2.0e-2, 5.0e-3]
    train.sft.lora_rank: [8, 16]
  exclude: [{train.sft.learning_rate: 5.0e-3, train.sft.lora_rank: 16}]
  include: [{train.sft.learning_rate: 3.0e-2, train.sft.lora_rank: 4}]
"""


def test_points_come_from_the_matrix_exclude_and_include():
    points = sweep.points({"matrix": {"train.lr": [1, 2], "train.r": [8, 16]}, "exclude": [{"train.lr": 2, "train.r": 16}],
                           "include": [{"train.lr": 3, "train.r": 4}]})  # fmt: skip
    assert [(p.name, p.values) for p in points] == [
        ("p1", {"train.lr": 1, "train.r": 8}),
        ("p2", {"train.lr": 1, "train.r": 16}),
        ("p3", {"train.lr": 2, "train.r": 8}),
        ("p4", {"train.lr": 3, "train.r": 4}),
    ]
    with pytest.raises(UserError, match="expected a mapping with matrix"):
        sweep.points({"matrx": {}})
    with pytest.raises(UserError, match="no points"):
        sweep.points({"matrix": {"train.lr": [1]}, "exclude": [{"train.lr": 1}]})


def test_a_quickstart_sweep_validates_every_point_and_shares_its_upstream_steps(cli, tmp_path, write_spec):
    from conftest import EXAMPLES

    spec = tmp_path / "sweep.yaml"
    text = (
        (EXAMPLES / "quickstart.yaml").read_text().replace("models/tiny-llama", str(EXAMPLES / "models" / "tiny-llama"))
    )
    spec.write_text(text.replace("dataset_dir: data", f"dataset_dir: {EXAMPLES / 'data'}") + QUICKSTART_SWEEP)
    code, out, err = cli("validate", spec)
    assert code == 0 and "a sweep of 6 points" in out, err
    code, out, err = cli("plan", spec, "--format", "json")
    assert code == 0, err
    steps = json.loads(out)
    ids = [s["id"] for s in steps]
    # data/template/pretrain once; an sft and an infer per point
    assert sorted(i for i in ids if "@" not in i) == [
        "data.pretrain",
        "data.sft",
        "template.pretrain",
        "template.sft",
        "train.pretrain",
    ]
    assert sorted(i for i in ids if i.startswith("train.sft@")) == [f"train.sft@p{n}" for n in range(1, 7)]
    resolved = load_spec(spec)
    p2 = sweep.points(resolved.sweep)[1]
    assert p2.values == {"train.sft.learning_rate": 0.01, "train.sft.lora_rank": 16}
    plain = json.loads(cli("plan", str(EXAMPLES / "quickstart.yaml"), "--format", "json")[1])
    sft = next(s["key"] for s in plain if s["id"] == "train.sft")  # the quickstart is point 2
    assert next(s["key"] for s in steps if s["id"] == "train.sft@p2") == sft
    code, out, _ = cli("plan", spec, "--point", "2", "--format", "json")
    assert code == 0 and next(s["key"] for s in json.loads(out) if s["id"] == "train.sft") == sft
    code, _, err = cli("plan", spec, "--point", "9")
    assert code == 2 and "points 1 to 6" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("train.sft.lora_rank:", "train.sfft.lora_rank:"))
    code, _, err = cli("validate", bad)
    assert code == 2 and "no train entry named 'sfft'" in err


def test_a_sweep_runs_shared_steps_once_and_ranks_its_points(tmp_path, monkeypatch):
    root = tmp_path / "project"
    make_project(root, quantize=[], export=[], merge=None)
    for name, value in worker_env({}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FAKE_BUILDS", str(tmp_path / "builds.log"))
    base = read_spec(root)
    specs = []
    for lr in (1e-3, 2e-3, 3e-3):
        point = copy.deepcopy(base)
        point["train"][0]["learning_rate"] = lr
        specs.append(point)
    points = sweep.points({"matrix": {"train.learning_rate": [1e-3, 2e-3, 3e-3]}})
    plan = compile_sweep(points, specs, root / "spec.json", catalog=CATALOG)
    assert [s.id for s in plan.steps] == [
        "data",
        "template",
        "train@p1",
        "infer@p1",
        "train@p2",
        "infer@p2",
        "train@p3",
        "infer@p3",
    ]
    assert plan.step("train@p2").deps == ["template"] and plan.step("infer@p3").deps == ["train@p3"]
    console = Console(file=io.StringIO(), width=200)
    result = run_plan(plan, jobs=2, console=console)
    built = [line.split()[0] for line in (tmp_path / "builds.log").read_text().splitlines()]
    assert sorted(built) == sorted(s.id for s in plan.steps)  # each step once: data and template shared
    lock = json.loads((root / "tunepipe.lock").read_text())["specs"]["spec.json"]["steps"]
    assert set(lock) == {s.id for s in plan.steps}  # every point kept, none overwritten by the next
    rows = sweep_rows(plan, open_store(plan.cache_dir))
    assert sorted(r["point"] for r in rows) == ["p1", "p2", "p3"]
    assert all(r["train"] == f"train@{r['point']}" for r in rows)
    print_summary(result, console)
    assert "sweep: 3 points, best first" in console.file.getvalue()
