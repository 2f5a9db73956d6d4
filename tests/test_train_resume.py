"""Determinism on CPU: two runs give bit-identical artifacts, whatever the hash seed or the number
of data-loader workers, and a run killed with SIGKILL mid-training resumes from its last
checkpoint and ends with the very same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train_support import pretrained, tokenized, train_params  # noqa: F401

# Runs the train stage in a fresh process; KILL_AT makes it SIGKILL itself right after the
# checkpoint of that step is on disk (what a crash or `kill -9` mid-run does).
SCRIPT = textwrap.dedent(
    """
    import json, logging, os, signal, sys
    from pathlib import Path

    spec = json.loads(Path(sys.argv[1]).read_text())
    if os.environ.get("KILL_AT"):
        from transformers import Trainer

        save = Trainer._save_checkpoint

        def save_then_die(self, *args, **kwargs):
            save(self, *args, **kwargs)
            if self.state.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer._save_checkpoint = save_then_die
    if os.environ.get("TERM_AT"):  # a cancel / SLURM's warning signal arriving during that step
        from transformers import Trainer

        step = Trainer.training_step

        def step_then_term(self, *args, **kwargs):
            if self.state.global_step == int(os.environ["TERM_AT"]) - 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(self, *args, **kwargs)

        Trainer.training_step = step_then_term

    logging.basicConfig(level=logging.INFO)
    from tunepipe.runtime.context import StepContext
    from tunepipe.runtime.stages import train

    paths = {k: Path(v) for k, v in spec["paths"].items()}
    ctx = StepContext(
        id="train", kind="train", key="0" * 64, params=spec["params"], inputs={"template": paths["data"]},
        files={"model": paths["model"]}, seed=42, spec_dir=paths["out"].parent, out=paths["out"],
        work=paths["work"], log=logging.getLogger("train"),
    )
    paths["out"].mkdir(parents=True, exist_ok=True)
    paths["work"].mkdir(parents=True, exist_ok=True)
    train.run(ctx)
    """
)


def run_stage(tmp: Path, name: str, params: dict, model: Path, data: Path, work: str | None = None, **env):
    spec = tmp / f"{name}.json"
    paths = {"out": tmp / name / "out", "work": tmp / (work or name) / "work", "model": model, "data": data}
    spec.write_text(json.dumps({"params": params, "paths": {k: str(v) for k, v in paths.items()}}))
    script = tmp / "run_train.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(spec)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **{k: str(v) for k, v in env.items()}},
    )  # fmt: skip
    return done, paths["out"]


def digests(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_bit_identical_runs_and_kill_9_resume(tmp_path, pretrained):
    data = tokenized(tmp_path / "data", n=24)
    # dropout on (the RNG state matters), length grouping on, 10 steps of 6 per epoch: the kill
    # lands mid-way through the second epoch
    params = train_params(max_steps=10, save_steps=3, lora_dropout=0.1, group_by_length=True, plot_loss=True,
                          plot_lora_matrix=True, learning_rate=1e-2)  # fmt: skip

    first, out_a = run_stage(tmp_path, "a", params, pretrained, data, PYTHONHASHSEED=1)
    assert first.returncode == 0, first.stderr[-3000:]
    workers = {**params, "dataloader_num_workers": 2}
    second, out_b = run_stage(tmp_path, "b", workers, pretrained, data, PYTHONHASHSEED=2)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = digests(out_a), digests(out_b)
    assert "adapter/adapter_model.safetensors" in a and "loss.png" in a
    assert a == b  # every artifact byte, weights and plots included

    killed, _ = run_stage(tmp_path, "c", params, pretrained, data, KILL_AT=6)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "c" / "work" / "trainer").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    resumed, out_c = run_stage(tmp_path, "c2", params, pretrained, data, work="c")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-6" in resumed.stderr
    assert digests(out_c) == a

    # SIGTERM mid-step: the step finishes, a checkpoint of it is saved (5 is no save_steps multiple),
    # the stage exits 143 without an artifact, and the rerun resumes there to the same bytes
    termed, out_d = run_stage(tmp_path, "d", params, pretrained, data, TERM_AT=5)
    assert termed.returncode == 128 + signal.SIGTERM, termed.stderr[-3000:]
    assert not (out_d / "adapter").exists()
    assert sorted(p.name for p in (tmp_path / "d" / "work" / "trainer").iterdir()) == ["checkpoint-3", "checkpoint-5"]
    requeued, out_e = run_stage(tmp_path, "d2", params, pretrained, data, work="d")
    assert requeued.returncode == 0 and "checkpoint-5" in requeued.stderr, requeued.stderr[-3000:]
    assert digests(out_e) == a


def test_half_written_checkpoint_is_ignored(tmp_path):
    """A kill during a save leaves a checkpoint without trainer_state.json: resume skips (and removes) it."""
    from tunepipe.runtime.stages.train import last_checkpoint

    root = tmp_path / "trainer"
    (root / "checkpoint-4").mkdir(parents=True)
    (root / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4}')
    (root / "checkpoint-8").mkdir()
    (root / "checkpoint-8" / "model.safetensors").write_bytes(b"partial")
    (root / "checkpoint-12").mkdir()
    (root / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')
    assert last_checkpoint(root) == str(root / "checkpoint-4")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4"]
    assert last_checkpoint(tmp_path / "none") is None
