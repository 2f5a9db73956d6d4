"""Wall time, peak RSS and figures of every quantize method that runs here, on one tiny model, in one run.

    python bench/quantize.py [--arch llama] [--dir DIR] [--json OUT.json] [--part quantize|qlora]

One tiny random model (tests/tiny_models.py: 2 layers, hidden 64) is saved as a merge artifact
(model/ + template.json), with a tokenized train split of 24 chat samples as gptq's calibration
input. Then each (method, bits) — bnb 8/4, hqq 8/4/3/2, gptq 8/4, mlc 4, those whose package is
installed — runs the quantize stage (`tunepipe.runtime.stages.quantize.run`) in its own process, one
after the other. Wall time is the child's from start to exit (imports included); peak RSS is the
child's ru_maxrss (os.wait4). The figures (greedy agreement, max relative logit error against the
unquantized model, on the stage's probe conversations) come from the step's metrics.

Then QLoRA: the train stage (`tunepipe.runtime.stages.train.run`, LoRA r 8 on every linear layer,
TRAIN_STEPS steps, the same seed and data: 24 tokenized chat samples) on the full-precision model and
on the model quantized while it loads — bnb 4 (NF4) / 8 (int8), hqq 4 (`tuner_backend: hqq`) — each
in its own process: wall time, peak RSS, the train loop's seconds, and the first and last logged loss.
On a model this small peak RSS is torch's own footprint: it shows no saving; the loop times compare
the quantized layers' CPU kernels (dequantize, then matmul) with a float32 matmul.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("bnb", 8), ("bnb", 4), ("hqq", 8), ("hqq", 4), ("hqq", 3), ("hqq", 2), ("gptq", 8), ("gptq", 4), ("mlc", 4))
PACKAGES = {"bnb": "bitsandbytes", "hqq": "hqq", "gptq": "gptqmodel"}
TRAIN_RUNS = (("lora", 0), ("bnb", 4), ("bnb", 8), ("hqq", 4))  # (how the base is loaded, bits)
TRAIN_STEPS = 20


def setup(directory: Path, arch: str) -> None:
    """The merge artifact and the calibration data (a template artifact's train split)."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_model

    make_tiny_model(arch, directory / "merged" / "model", seed=1)
    (directory / "merged" / "template.json").write_text(json.dumps({"name": "chatml", "source": "registry"}))
    tokenizer = AutoTokenizer.from_pretrained(directory / "merged" / "model")
    ids = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": f"What is {i} plus {i * 3}?"},
                {"role": "assistant", "content": f"It is {i * 4}."},
            ],
            tokenize=True,
        )
        for i in range(24)
    ]
    ids = [list(x["input_ids"] if hasattr(x, "keys") else x) for x in ids]
    (directory / "data").mkdir()
    np.save(directory / "data" / "train.input_ids.npy", np.concatenate(ids).astype(np.int32))
    np.save(directory / "data" / "train.offsets.npy", np.cumsum([0] + [len(x) for x in ids]).astype(np.int64))


def step_params(kind: str) -> dict:
    """Every flag a `kind` step reads, with the catalog's defaults (what the compiler passes)."""
    from tunepipe.spec.catalog import load_catalog

    return {f.name: f.default for f in load_catalog().flags.values() if kind in f.used_by or f.section == kind}


def child(directory: Path, method: str, bits: int) -> None:
    from tunepipe.runtime.context import StepContext
    from tunepipe.runtime.stages import quantize

    run = directory / f"{method}-{bits}"
    (run / "out").mkdir(parents=True)
    ctx = StepContext(
        id="quantize",
        kind="quantize",
        key="0" * 64,
        params={**step_params("quantize"), "method": method, "bits": bits},
        inputs={"model": directory / "merged", "calibration": directory / "data"},
        files={},
        seed=0,
        spec_dir=directory,
        out=run / "out",
        work=run / "work",
    )
    (run / "metrics.json").write_text(json.dumps(quantize.run(ctx)))


def train_child(directory: Path, method: str, bits: int) -> None:
    """One QLoRA (or plain LoRA) train step on the merged model; metrics + the logged losses."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_support import make_ctx, tokenized, train_params

    from tunepipe.runtime.stages import train

    data = directory / "sft"
    if not data.is_dir():
        tokenized(data, directory / "merged" / "model", n=24)
    quantized = {"bnb": {"quantization_method": "bnb"}, "hqq": {"tuner_backend": "hqq"}}.get(method, {})
    params = train_params(max_steps=TRAIN_STEPS, learning_rate=2e-2, quantization_bit=bits or None, **quantized)
    run = directory / f"train-{method}-{bits}"
    run.mkdir()
    ctx = make_ctx(run, params, data=data, model=directory / "merged" / "model", step_id=f"{method}{bits}")
    metrics = train.run(ctx)
    state = json.loads((ctx.out / "trainer_state.json").read_text())
    metrics["losses"] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    (run / "metrics.json").write_text(json.dumps(metrics))


def spawn(directory: Path, mode: str, method: str, bits: int) -> tuple[float, int, object, str]:
    """Run this file as a child in `mode`; (wall s, exit code, rusage, stderr tail)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, mode, method, str(bits), "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    error = process.stderr.read().decode()[-400:]
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - started, os.waitstatus_to_exitcode(status), usage, error


def measure_train(directory: Path, method: str, bits: int) -> dict:
    wall, code, usage, error = spawn(directory, "--train-child", method, bits)
    if code != 0:
        return {"train": method, "bits": bits, "error": error}
    metrics = json.loads((directory / f"train-{method}-{bits}" / "metrics.json").read_text())
    return {
        "train": method,
        "bits": bits,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "train_s": round(metrics["train_runtime_s"], 2),
        "first_loss": round(metrics["losses"][0], 3),
        "last_loss": round(metrics["losses"][-1], 3),
        "steps": metrics["steps"],
    }


def measure(directory: Path, method: str, bits: int) -> dict:
    wall, code, usage, error = spawn(directory, "--child", method, bits)
    if code != 0:
        return {"method": method, "bits": bits, "error": error}
    metrics = json.loads((directory / f"{method}-{bits}" / "metrics.json").read_text())
    return {
        "method": method,
        "bits": bits,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "stage_s": round(metrics["wall_s"], 2),
        "greedy_agreement": round(metrics["greedy_agreement"], 3),
        "max_rel_logit_error": round(metrics["max_rel_logit_error"], 4),
        "modules": metrics["modules"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BITS"))
    parser.add_argument("--train-child", nargs=2, metavar=("METHOD", "BITS"))
    parser.add_argument("--part", choices=("quantize", "qlora"), help="run only this part (default: both)")
    args = parser.parse_args()
    if args.child:
        return child(args.dir, args.child[0], int(args.child[1]))
    if args.train_child:
        return train_child(args.dir, args.train_child[0], int(args.train_child[1]))
    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    setup(directory, args.arch)
    results = []
    for method, bits in RUNS if args.part != "qlora" else ():
        if method in PACKAGES and importlib.util.find_spec(PACKAGES[method]) is None:
            results.append({"method": method, "bits": bits, "skipped": f"{PACKAGES[method]} not installed"})
            continue
        results.append(measure(directory, method, bits))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'method':<6} {'bits':>4} {'wall s':>7} {'RSS MB':>7} {'agree':>6} {'rel err':>8}")
    for r in results:
        if "wall_s" in r:
            print(
                f"{r['method']:<6} {r['bits']:>4} {r['wall_s']:>7} {r['peak_rss_mb']:>7} {r['greedy_agreement']:>6} "
                f"{r['max_rel_logit_error']:>8}"
            )
        else:
            print(f"{r['method']:<6} {r['bits']:>4}  {r.get('skipped') or 'failed: ' + r['error']}")
    trains = []
    for method, bits in TRAIN_RUNS if args.part != "quantize" else ():
        if method in PACKAGES and importlib.util.find_spec(PACKAGES[method]) is None:
            trains.append({"train": method, "bits": bits, "skipped": f"{PACKAGES[method]} not installed"})
            continue
        trains.append(measure_train(directory, method, bits))
        print(json.dumps(trains[-1]), flush=True)
    print(f"\n{'base':<6} {'bits':>4} {'wall s':>7} {'RSS MB':>7} {'train s':>8} {'loss first → last':>18}")
    for r in trains:
        if "wall_s" in r:
            loss = f"{r['first_loss']} → {r['last_loss']}"
            print(f"{r['train']:<6} {r['bits']:>4} {r['wall_s']:>7} {r['peak_rss_mb']:>7} {r['train_s']:>8} {loss:>18}")
        else:
            print(f"{r['train']:<6} {r['bits']:>4}  {r.get('skipped') or 'failed: ' + r['error']}")
    if args.json:
        args.json.write_text(json.dumps({"quantize": results, "qlora": trains}, indent=2))


if __name__ == "__main__":
    main()
