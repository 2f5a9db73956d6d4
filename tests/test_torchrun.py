"""The torchrun executor: its command line, and a real 2-process DDP (gloo, CPU) train step."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train_support import pretrained, tokenized, train_params  # noqa: F401

from tunepipe.errors import UserError
from tunepipe.executors.base import get_executor
from tunepipe.store import open_store

KEY = "ab" * 32
DATA_KEY = "cd" * 32


def step(executor: dict, key: str = KEY):
    return SimpleNamespace(id="train", key=key, executor={"kind": "torchrun", **executor})


def test_prepare_prints_the_exact_torchrun_command(tmp_path):
    launch = get_executor("torchrun").prepare(step({"nproc_per_node": 2}), tmp_path / "STEP.json", tmp_path / "log")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    assert launch.argv == [
        torchrun, "--nproc-per-node", "2", "--nnodes", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "localhost:0", "--rdzv-id", KEY[:16], "--max-restarts", "0",
        "-m", "tunepipe.runtime.worker", str(tmp_path / "STEP.json"),
    ]  # fmt: skip
    assert str(launch).startswith(f"{torchrun} --nproc-per-node 2 --nnodes 1 --rdzv-backend c10d")


def test_multi_node_and_static_rendezvous(tmp_path):
    prepare = get_executor("torchrun").prepare
    argv = prepare(
        step({"nproc_per_node": 8, "nnodes": 4, "rdzv_endpoint": "node0:29400", "max_restarts": 3}),
        tmp_path / "S.json", tmp_path / "log",
    ).argv  # fmt: skip
    pairs = dict(zip(argv[1:-3:2], argv[2:-3:2]))
    assert pairs == {
        "--nproc-per-node": "8", "--nnodes": "4", "--rdzv-backend": "c10d", "--rdzv-endpoint": "node0:29400",
        "--rdzv-id": KEY[:16], "--max-restarts": "3",
    }  # fmt: skip
    static = prepare(step({"rdzv_backend": "static", "master_port": 29511}), tmp_path / "S.json", tmp_path / "log").argv
    assert static[static.index("--rdzv-endpoint") + 1] == "localhost:29511"
    with pytest.raises(UserError, match="rdzv_endpoint is required"):
        prepare(step({"nnodes": 2}), tmp_path / "S.json", tmp_path / "log")


@pytest.mark.slow
def test_two_cpu_processes_train_with_ddp(tmp_path, pretrained):
    """torchrun with 2 CPU processes (gloo): the step completes, rank 0 commits the usual artifact
    layout, and its loss curve is plotted; each optimizer step saw both ranks' batches."""
    data = tokenized(tmp_path / "data", n=32, val=4)
    params = train_params(max_steps=4, per_device_train_batch_size=2, plot_loss=True, logging_steps=1)
    cache = tmp_path / "cache"
    store = open_store(cache)  # the tokenized data as the template step's artifact: the worker fetches it by key
    staging = store.begin(DATA_KEY)
    shutil.copytree(data, staging, dirs_exist_ok=True)
    store.commit(staging, DATA_KEY, {"id": "template", "kind": "template"})
    payload = {
        "id": "train", "kind": "train", "key": KEY, "stage_version": 1, "params": params,
        "upstream": {"template": DATA_KEY}, "files": {"model": str(pretrained)}, "seed": 42,
        "spec_dir": str(tmp_path), "cache_dir": str(cache), "log": str(tmp_path / "step.log"), "force": False,
    }  # fmt: skip
    step_json = tmp_path / "STEP.json"
    step_json.write_text(json.dumps(payload))
    executor = get_executor("torchrun")
    launch = executor.prepare(step({"nproc_per_node": 2}), step_json, tmp_path / "step.log")
    handle = executor.submit(launch)
    deadline = time.monotonic() + 240
    while executor.poll(handle) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    log = (tmp_path / "step.log").read_text()
    if executor.poll(handle) is None:
        executor.cancel(handle)
    assert executor.poll(handle) == 0, log[-4000:]

    artifact = open_store(cache).fetch(KEY)
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss.png", "trainer_state.json",
            "train.json", "metrics.json", "template.json", "tokenizer/tokenizer.json"} <= set(files)  # fmt: skip
    assert (artifact / "loss.png").read_bytes()[:4] == b"\x89PNG"
    state = json.loads((artifact / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert len([e for e in state["log_history"] if "loss" in e]) == 4
    # 2 ranks × 2 samples per step: 4 steps walk 16 samples = half an epoch of the 32 (one process: a quarter)
    assert state["epoch"] == pytest.approx(0.5)
    assert log.count("committed as") == 1  # rank 0 only
    assert not (cache / "work" / KEY).exists()  # checkpoints are gone after the commit
