"""The main job end to end: `tunepipe run examples/quickstart.yaml` on a copy of the bundled model and data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import EXAMPLES

from tunepipe.store import open_store

pytestmark = pytest.mark.slow


def tunepipe(*args, cwd, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "tunepipe.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A copy of the quickstart, run once; yields its directory and the plan as json."""
    root = tmp_path_factory.mktemp("quickstart")
    shutil.copy(EXAMPLES / "quickstart.yaml", root / "quickstart.yaml")
    shutil.copytree(EXAMPLES / "models", root / "models")
    shutil.copytree(EXAMPLES / "data", root / "data")
    first = tunepipe("run", "quickstart.yaml", cwd=root)
    plan = json.loads(tunepipe("plan", "quickstart.yaml", "--format", "json", cwd=root).stdout)
    return root, plan, first


def artifact(root, plan, step_id):
    key = next(step["key"] for step in plan if step["id"] == step_id)
    return open_store(root / ".tunepipe" / "cache").fetch(key)


def test_the_model_learns_its_identity(quickstart):
    root, plan, first = quickstart
    identity = json.loads((EXAMPLES / "data" / "identity.json").read_text(encoding="utf-8"))
    expected = next(row["output"] for row in identity if row["instruction"] == "Who are you?")
    answer = (artifact(root, plan, "infer") / "answer.txt").read_text(encoding="utf-8").strip()
    assert answer == expected
    assert expected in first.stderr  # the run's summary shows it


def test_loss_falls_in_both_train_steps(quickstart):
    root, plan, _ = quickstart
    for step_id in ("train.pretrain", "train.sft"):
        history = json.loads((artifact(root, plan, step_id) / "trainer_state.json").read_text())["log_history"]
        losses = [h["loss"] for h in history if "loss" in h]
        assert losses[-1] < losses[0] / 2, (step_id, losses[0], losses[-1])
    assert (artifact(root, plan, "train.sft") / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_is_fully_cached_without_torch(quickstart):
    root, _, _ = quickstart
    code = (
        "import sys; from tunepipe.cli import main; sys.argv=['tunepipe','run','quickstart.yaml']\n"
        "try: main()\nexcept SystemExit as e: assert not e.code, e.code\n"
        "assert not {'torch', 'transformers', 'numpy'} & set(sys.modules), sorted({'torch', 'transformers', 'numpy'} & set(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "10 steps (10 cached)" in result.stderr
    assert tunepipe("run", "quickstart.yaml", "--frozen", cwd=root).returncode == 0


def test_a_changed_infer_flag_makes_only_infer_stale_and_frozen_fails(quickstart):
    root, _, _ = quickstart
    plan = json.loads(tunepipe("plan", "quickstart.yaml", "-f", "json", "--max-new-tokens", "8", cwd=root).stdout)
    stale = {step["id"]: step["reason"] for step in plan if step["status"] != "cached"}
    assert list(stale) == ["infer"]
    assert "max_new_tokens" in stale["infer"]
    frozen = tunepipe("run", "quickstart.yaml", "--frozen", "--max-new-tokens", "8", cwd=root, check=False)
    assert frozen.returncode == 3
    assert "infer" in frozen.stderr and "max_new_tokens" in frozen.stderr


def test_the_gguf_is_verified_in_llama_cpp_and_delivered_with_its_card(quickstart):
    root, plan, first = quickstart
    report = json.loads((artifact(root, plan, "verify") / "report.json").read_text())
    assert report["passed"] and report["format"] == "gguf" and report["type"] == "q8_0"
    figures = report["figures"]
    assert figures["greedy_agreement"] >= report["thresholds"]["min_greedy_agreement"] == 0.99
    assert figures["chat_template_tokens_match"] is True
    delivered = root / "out" / "gguf"
    gguf = delivered / "model.gguf"
    assert gguf.read_bytes() == (artifact(root, plan, "export") / "model.gguf").read_bytes()
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert 'PARAMETER stop "<|im_end|>"' in (delivered / "Modelfile").read_text()
    card = (delivered / "README.md").read_text()
    assert "| verify |" in card and "ollama create" in card and "greedy_agreement" in card
    assert "verify: passed" in first.stderr


def test_chat_answers_from_the_merged_model_and_from_the_gguf_in_llama_cpp(quickstart):
    root, _, _ = quickstart
    identity = json.loads((EXAMPLES / "data" / "identity.json").read_text(encoding="utf-8"))
    expected = next(row["output"] for row in identity if row["instruction"] == "Who are you?")
    hf = tunepipe("chat", "quickstart.yaml", "--prompt", "Who are you?", "--max-new-tokens", "32", cwd=root)
    assert hf.stdout.strip() == expected
    gguf = tunepipe(
        "chat",
        "quickstart.yaml",
        "--backend",
        "llama-cpp",
        "--prompt",
        "Who are you?",
        "--max-new-tokens",
        "32",
        cwd=root,
    )
    assert gguf.stdout.strip() == expected  # q8_0 in llama.cpp, through the GGUF's own chat template


def test_removing_an_upstream_artifact_makes_its_dependents_stale(quickstart):
    """Last: it removes train.pretrain from the cache. train.sft's adapter is built on it, so train.sft
    (and what follows) cannot be used until it is rebuilt — the plan says so instead of "cached"."""
    root, _, _ = quickstart
    tunepipe("cache", "rm", "--spec", "quickstart.yaml", "train.pretrain", cwd=root)
    plan = json.loads(tunepipe("plan", "quickstart.yaml", "-f", "json", cwd=root).stdout)
    stale = {step["id"]: step["reason"] for step in plan if step["status"] != "cached"}
    assert {"train.pretrain", "train.sft", "merge", "infer"} <= set(stale)
    assert "needs train.pretrain, which is not built" in stale["train.sft"]
