"""A small LoRA job from cold, whole process wall: `tunepipe run` against `llamafactory-cli train`.

    python bench/cold_job.py [--steps 100] [--repeat 3] [--lf /tmp/lfvenv/bin/python]
    python bench/cold_job.py --quickstart [--repeat 2]

Default: a tiny random Qwen2 (tests/tiny_models.py, with weights), LLaMA-Factory's `identity` data
(examples/data), template qwen, cutoff 256, LoRA rank 8 on all linears, batch 4, --steps optimizer
steps, the same flags on both sides. tunepipe runs on an empty cache (data, template and train
steps, each its own process); LLaMA-Factory runs `llamafactory-cli train` with the equivalent yaml
(`save_strategy: no`; it still saves the adapter at the end, as tunepipe's train step does).
Each side's *non-training overhead* is its wall minus its `train_runtime` (the Trainer's own figure):
start-up, imports, data, tokenizing, model loading, saving.

--quickstart: the README's main job (examples/quickstart.yaml) on an empty cache, with the local
executor's workers started ahead (the default) and with them off (TUNEPIPE_STANDBY=0, a fresh
process per step that imports everything itself); prints both overheads and their ratio.
LLaMA-Factory is looked for at --lf (see issue 16 for the side venv); without it the bench says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNEPIPE = Path(sys.executable).with_name("tunepipe")

FLAGS = {
    "finetuning_type": "lora",
    "lora_target": "all",
    "lora_rank": 8,
    "per_device_train_batch_size": 4,
    "learning_rate": 1.0e-3,
    "logging_steps": 50,
}


def write_job(root: Path, steps: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import make_tiny_model

    make_tiny_model("qwen2", root / "model")
    data = REPO / "examples" / "data"
    train = {**FLAGS, "max_steps": steps}
    spec = root / "spec.yaml"
    spec.write_text(
        json.dumps(
            {
                "version": 1,
                "name": "cold",
                "model": {"model_name_or_path": str(root / "model")},
                # val_size 0: LLaMA-Factory's default (tunepipe's is 0.1), so both train on all 45 examples
                "data": {"dataset": "identity", "dataset_dir": str(data), "cutoff_len": 256, "val_size": 0},
                "template": {"template": "qwen"},
                "train": [train],
            }
        )
    )
    lf = root / "lf.yaml"
    lf.write_text(
        json.dumps(
            {
                "model_name_or_path": str(root / "model"),
                "stage": "sft",
                "do_train": True,
                "dataset": "identity",
                "dataset_dir": str(data),
                "template": "qwen",
                "cutoff_len": 256,
                "output_dir": str(root / "lf-out"),
                "overwrite_output_dir": True,
                "report_to": "none",
                "save_strategy": "no",
                **train,
            }
        )
    )
    return spec, lf


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.time()
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.time() - start
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, done.stdout + done.stderr


def train_runtime_of_cache(cache: Path) -> float:
    """Σ train_runtime over the train steps' manifests in a tunepipe cache."""
    total = 0.0
    for manifest in cache.rglob("manifest.json"):
        m = json.loads(manifest.read_text())
        if m.get("kind") == "train":
            total += float(m["metrics"]["train_runtime_s"])
    return total


def lf_train_runtime(output_dir: Path) -> float:
    """The Trainer's train_runtime, from the train_results.json LLaMA-Factory writes."""
    return float(json.loads((output_dir / "train_results.json").read_text())["train_runtime"])


def tunepipe_run(spec: Path, cache: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    wall, _ = timed([str(TUNEPIPE), "run", str(spec)], {"TUNEPIPE_CACHE": str(cache), **(env or {})})
    return wall, train_runtime_of_cache(cache)


def report(label: str, runs: list[tuple[float, float]]) -> tuple[float, float, float]:
    wall = statistics.median(w for w, _ in runs)
    overhead = statistics.median(w - t for w, t in runs)
    training = statistics.median(t for _, t in runs)
    print(
        f"  {label:<34} wall {wall:6.2f} s   training {training:5.2f} s   non-training overhead {overhead:6.2f} s"
        f"   ({len(runs)} runs)"
    )
    return wall, overhead, training


def quickstart(repeat: int) -> int:
    spec = REPO / "examples" / "quickstart.yaml"
    runs: dict[str, list[tuple[float, float]]] = {"workers started ahead": [], "a fresh process per step": []}
    with tempfile.TemporaryDirectory(prefix="tunepipe-cold-") as tmp:
        for r in range(repeat):
            runs["workers started ahead"].append(tunepipe_run(spec, Path(tmp) / f"a{r}"))
            runs["a fresh process per step"].append(tunepipe_run(spec, Path(tmp) / f"b{r}", {"TUNEPIPE_STANDBY": "0"}))
    print("quickstart, cold:")
    _, ahead, _ = report("workers started ahead", runs["workers started ahead"])
    _, fresh, _ = report("a fresh process per step", runs["a fresh process per step"])
    print(f"ratio overhead fresh / ahead: {fresh / ahead:.2f}x")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lf", default="/tmp/lfvenv/bin/python")
    ap.add_argument("--quickstart", action="store_true")
    args = ap.parse_args()
    if args.quickstart:
        return quickstart(args.repeat)
    lf_cli = Path(args.lf).with_name("llamafactory-cli")
    have_lf = lf_cli.exists()
    with tempfile.TemporaryDirectory(prefix="tunepipe-cold-") as tmp:
        root = Path(tmp)
        spec, lf_yaml = write_job(root, args.steps)
        ours, theirs = [], []
        for r in range(args.repeat):  # rounds interleave the contenders
            ours.append(tunepipe_run(spec, root / f"cache-{r}"))
            if have_lf:
                wall, _ = timed(
                    [str(lf_cli), "train", str(lf_yaml)],
                    {"HF_DATASETS_CACHE": str(root / f"hf-{r}"), "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"},
                )
                theirs.append((wall, lf_train_runtime(root / "lf-out")))
        print(f"LoRA SFT, tiny qwen2, identity data, {args.steps} steps, cold:")
        our_wall, _, our_training = report("tunepipe run (3 step processes)", ours)
        if have_lf:
            lf_wall, _, lf_training = report("llamafactory-cli train", theirs)
            print(f"ratio LLaMA-Factory / tunepipe wall: {lf_wall / our_wall:.2f}x")
            # the same optimizer steps over the same 45 examples: the ratio of the Trainer's train_runtime
            print(f"ratio LLaMA-Factory / tunepipe training phase (train_runtime): {lf_training / our_training:.2f}x")
        else:
            print(f"LLaMA-Factory not found at {args.lf} (see issue 16 for the side venv): tunepipe alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
