"""Wall time, peak RSS and figures of every quantize method that runs here, on one tiny model, in one run.

    python bench/quantize.py [--arch llama] [--dir DIR] [--json OUT.json]

One tiny random model (tests/tiny_models.py: 2 layers, hidden 64) is saved as a merge artifact
(model/ + template.json), with a tokenized train split of 24 chat samples as gptq's calibration
input. Then each (method, bits) — bnb 8/4, hqq 8/4/3/2, gptq 8/4, mlc 4, those whose package is
installed — runs the quantize stage (`tunepipe.runtime.stages.quantize.run`) in its own process, one
after the other. Wall time is the child's from start to exit (imports included); peak RSS is the
child's ru_maxrss (os.wait4). The figures (greedy agreement, max relative logit error against the
unquantized model, on the stage's probe conversations) come from the step's metrics.
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


def child(directory: Path, method: str, bits: int) -> None:
    from tunepipe.runtime.context import StepContext
    from tunepipe.runtime.stages import quantize

    run = directory / f"{method}-{bits}"
    (run / "out").mkdir(parents=True)
    ctx = StepContext(
        id="quantize",
        kind="quantize",
        key="0" * 64,
        params={"method": method, "bits": bits},
        inputs={"model": directory / "merged", "calibration": directory / "data"},
        files={},
        seed=0,
        spec_dir=directory,
        out=run / "out",
        work=run / "work",
    )
    (run / "metrics.json").write_text(json.dumps(quantize.run(ctx)))


def measure(directory: Path, method: str, bits: int) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", method, str(bits), "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        return {"method": method, "bits": bits, "error": process.stderr.read().decode()[-400:]}
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
    args = parser.parse_args()
    if args.child:
        return child(args.dir, args.child[0], int(args.child[1]))
    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    setup(directory, args.arch)
    results = []
    for method, bits in RUNS:
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
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
