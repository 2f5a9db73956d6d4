"""How `tunepipe validate`, `plan` and a fully cached `run` scale with the number of steps.

    python bench/plan_scale.py [--repeat 5] [--steps 10 50 200] [--dvc PATH] [--keep DIR]

The plans are real: one spec per size over the bundled tiny model and data (examples/), with a
`sweep:` over the sft learning rate: data and template shared, a train and an infer step per point,
so N points give 2 + 2N steps (4, 24 and 99 points for 10, 50 and 200 steps). The cache is built
once with the test suite's fast stand-in stages (tests/fake_stages.py, through
$TUNEPIPE_STAGE_MODULES): the points of the smaller sweeps are the first points of the largest, so
one build caches all three. Each timed command is a fresh process, as a user runs it (start-up,
loading and validating every point, planning, the cache checks all count); the figures are medians
of --repeat runs, of the wall clock and of the CPU time (user + system of the process: on a shared
machine the wall clock also counts waiting for a core, the CPU time much less). The script checks
that the cached run built nothing and that none of the three commands imported torch, numpy or
transformers (`python -X importtime`).

Printed: the seconds per size and command, the per-step slope between sizes, and two linearity
figures: the measured time at the largest size over the time the two smallest sizes predict on a
straight line (1.0 = linear, 2 = twice as slow as linear), and the same measured time over the
smallest size's time scaled by steps (which charges start-up to every step: well under 1 when
start-up dominates). When dvc is installed (on PATH or --dvc), `dvc repro`'s no-op on a dvc.yaml of
the same steps is timed at each size too (as bench/noop_run.py does for the quickstart).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(REPO / "tests"))  # fake_stages: the stand-in stages that build the cache fast
sys.path.insert(0, str(REPO / "bench"))  # noop_run: its dvc project

HEAVY = ("torch", "numpy", "transformers")
COMMANDS = ("validate", "plan", "run")


def spec_text(points: int) -> str:
    """A sweep spec over the bundled tiny model and data whose plan has 2 + 2 * points steps."""
    rates = ", ".join(f"{(i + 1) * 1e-4:.4g}" for i in range(points))
    return f"""version: 1
name: scale-{points}
seed: 42
model: {{model_name_or_path: {EXAMPLES / "models" / "tiny-llama"}, train_from_scratch: true}}
data: {{dataset: identity, dataset_dir: {EXAMPLES / "data"}, cutoff_len: 128, val_size: 0.1}}
template: {{template: chatml}}
train:
  - {{name: sft, finetuning_type: lora, lora_target: all, num_train_epochs: 1}}
infer: {{prompt: Who are you?, max_new_tokens: 8}}
sweep:
  matrix:
    train.sft.learning_rate: [{rates}]
"""


def tunepipe_argv(command: str, spec: Path) -> list[str]:
    return [str(Path(sys.executable).with_name("tunepipe")), command, str(spec)]


def median_seconds(argv: list[str], repeat: int, env: dict, cwd: Path | None = None) -> tuple[float, float]:
    """Median wall-clock seconds of `repeat` runs, and median CPU seconds (the child's user + system):
    on a shared machine the wall time includes waiting for a core, the CPU time much less so."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def heavy_imports(argv: list[str], env: dict) -> list[str]:
    """The HEAVY modules a command imports (`python -X importtime` lists every import on stderr)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], env=env, check=True, capture_output=True, text=True
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def cached_run_check(spec: Path, steps: int, env: dict) -> None:
    """Refuse to time a run that is not a no-op: every step must report cached."""
    done = subprocess.run(tunepipe_argv("run", spec), env=env, check=True, capture_output=True, text=True)
    if f"{steps} steps ({steps} cached)" not in done.stderr:
        raise SystemExit(f"{spec.name}: the run is not fully cached:\n{done.stderr[-2000:]}")


def dvc_seconds(spec: Path, dvc: str, repeat: int, scratch: Path) -> tuple[float, float]:
    """`dvc repro`'s no-op on a dvc.yaml whose stages mirror the plan's steps (bench/noop_run.py)."""
    from noop_run import dvc_project

    from tunepipe.compiler.sweep import compile_resolved
    from tunepipe.spec import load_spec

    root = scratch / f"dvc-{spec.stem}"
    plan = compile_resolved(load_spec(spec), [])
    # `train@p3`: dvc reads `@` in a stage name as its foreach syntax, so the points are spelled `train-p3`
    steps = [replace(s, id=s.id.replace("@", "-"), deps=[d.replace("@", "-") for d in s.deps]) for s in plan.steps]
    dvc_project(replace(plan, steps=steps), root)
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([dvc, "repro", "-q"], cwd=root, check=True, stdout=subprocess.DEVNULL)
    return median_seconds([dvc, "repro"], repeat, dict(os.environ), cwd=root)


def slope_report(name: str, sizes: list[int], seconds: list[float]) -> str:
    slopes = [(seconds[i + 1] - seconds[i]) / (sizes[i + 1] - sizes[i]) for i in range(len(sizes) - 1)]
    parts = [f"{sizes[i]}→{sizes[i + 1]}: {1000 * s:.2f} ms/step" for i, s in enumerate(slopes)]
    line = f"  {name:<9} slope " + ", ".join(parts)
    if len(sizes) >= 3:
        straight = seconds[0] + slopes[0] * (sizes[-1] - sizes[0])  # the line through the two smallest sizes
        line += f"; at {sizes[-1]} steps measured/linear {seconds[-1] / straight:.2f}"
    line += f", measured/({sizes[0]}-step time × {sizes[-1] // sizes[0]}) {seconds[-1] / (seconds[0] * sizes[-1] / sizes[0]):.2f}"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200], help="plan sizes (even, ≥ 4)")
    parser.add_argument("--dvc", default=shutil.which("dvc"), help="the dvc executable (default: on PATH)")
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temporary dir)")
    args = parser.parse_args()
    sizes = sorted(args.steps)
    if any(n < 4 or n % 2 for n in sizes):
        raise SystemExit("--steps: each size is 2 + 2 × points: an even number, at least 4")

    import fake_stages

    env = fake_stages.worker_env()
    # As a user runs it: Python caches bytecode (an installed package has it; an editable one writes it
    # on first import, here the check runs below). Without it every module compiles at each start-up.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="tunepipe-scale-") as tmp:
        scratch = args.keep or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        specs = {}
        for n in sizes:
            specs[n] = scratch / f"scale-{n}.yaml"
            specs[n].write_text(spec_text((n - 2) // 2))
        largest = specs[sizes[-1]]
        print(f"building the {sizes[-1]}-step plan with the stand-in stages (once) ...", flush=True)
        started = time.perf_counter()
        subprocess.run([*tunepipe_argv("run", largest), "--jobs", "2"], env=env, check=True, capture_output=True)
        print(f"  built in {time.perf_counter() - started:.1f}s", flush=True)
        for n in sizes:
            cached_run_check(specs[n], n, env)  # also writes each spec's lock section: the timed runs rewrite nothing

        for command in COMMANDS:
            found = heavy_imports(tunepipe_argv(command, largest), env)
            if found:
                raise SystemExit(f"tunepipe {command} imported {', '.join(found)}: the light paths must not")
        print(f"none of {', '.join(COMMANDS)} imported {', '.join(HEAVY)} (python -X importtime)")

        timed: dict[str, list[tuple[float, float]]] = {}
        for command in COMMANDS:
            timed[command] = [median_seconds(tunepipe_argv(command, specs[n]), args.repeat, env) for n in sizes]
        for n in sizes:
            cached_run_check(specs[n], n, env)  # still a no-op after the timed runs
        if args.dvc:
            timed["dvc repro"] = [dvc_seconds(specs[n], args.dvc, args.repeat, scratch) for n in sizes]

        figures = {}
        for clock, index in (("wall", 0), ("cpu", 1)):
            figures[clock] = {name: [pair[index] for pair in pairs] for name, pairs in timed.items()}
            print(f"\n{clock} seconds, fresh process, median of {args.repeat} (validate / plan / fully cached run):")
            print(f"  {'steps':<9} " + "".join(f"{n:>9}" for n in sizes))
            for name, seconds in figures[clock].items():
                print(f"  {name:<9} " + "".join(f"{s:9.3f}" for s in seconds))
            print(f"per-step cost ({clock}):")
            for name, seconds in figures[clock].items():
                print(slope_report(name, sizes, seconds))
        if args.dvc:
            wall = figures["wall"]
            ratios = ", ".join(f"{n}: {d / r:.1f}x" for n, d, r in zip(sizes, wall["dvc repro"], wall["run"]))
            print(f"dvc repro no-op / tunepipe cached run (wall): {ratios}")
        else:
            print("dvc is not installed: no dvc repro baseline (pip install dvc, or pass --dvc PATH)")
        print(json.dumps({"steps": sizes, "seconds": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
