"""Time a fully cached `tunepipe run` next to `dvc repro`'s no-op on an equivalent dvc.yaml.

    python bench/noop_run.py [SPEC] [--repeat 5] [--dvc PATH]   # default SPEC: examples/quickstart.yaml
    python bench/noop_run.py --fake                              # the engine alone, on tests/fake_stages.py

Builds SPEC first when it is not fully cached. Each timed run is a fresh process, as a user sees it:
start-up, spec loading, planning and the cache checks all count. When dvc is installed (on PATH or
given with --dvc) the script writes a dvc project whose stages mirror the plan's steps (the same
input files as dependencies, upstream outputs, each step's artifact copied as its output), lets
`dvc repro` build it once, then times its no-op and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # fake_stages, for --fake

from tunepipe.compiler.plan import Plan, compile_plan  # noqa: E402
from tunepipe.store import open_store  # noqa: E402


def median_seconds(command: list[str], repeat: int, cwd: Path | None = None, env: dict | None = None) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def real_project(spec: Path) -> tuple[Plan, list[str], dict]:
    from tunepipe.spec import load_spec

    resolved = load_spec(spec)
    tunepipe = Path(sys.executable).with_name("tunepipe")
    return compile_plan(resolved.data, resolved.path), [str(tunepipe), "run", str(spec)], dict(os.environ)


def fake_project(root: Path) -> tuple[Plan, list[str], dict]:
    import fake_stages

    fake_stages.make_project(root)
    command = [sys.executable, str(REPO / "tests" / "fake_stages.py"), "run", str(root)]
    return fake_stages.compile_project(root), command, fake_stages.worker_env()


def dvc_project(plan: Plan, root: Path) -> None:
    """A dvc.yaml with one stage per step: same local inputs, upstream outputs, the artifact as output."""
    store = open_store(plan.cache_dir)
    stages = {}
    for step in plan.steps:
        deps = []
        for role, names in step.digests.items():
            if "hub" not in names:
                base = step.files[role]
                deps += [str(base)] if base.is_file() else [str(base / name) for name in names]
        deps += [f"out/{dep}" for dep in step.deps]
        source = shlex.quote(str(store.fetch(step.key)))
        stages[step.id.replace(".", "_")] = {
            "cmd": f"mkdir -p out && cp -r {source} out/{step.id}",
            "deps": deps,
            "outs": [f"out/{step.id}"],
        }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text(json.dumps({"stages": stages}, indent=2))  # JSON is YAML


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", type=Path, default=REPO / "examples" / "quickstart.yaml")
    parser.add_argument("--fake", action="store_true", help="time the engine on the fake stages of the tests")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dvc", default=shutil.which("dvc"), help="the dvc executable (default: on PATH)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as scratch:
        scratch = Path(scratch)
        plan, command, env = fake_project(scratch / "project") if args.fake else real_project(args.spec.resolve())
        store = open_store(plan.cache_dir)
        if not all(store.has(step.key) for step in plan.steps):
            print(f"building {plan.name} first ({len(plan.steps)} steps) ...", flush=True)
            subprocess.run(command, env=env, check=True)
        built = {entry.key for entry in store.ls()}
        ours = median_seconds(command, args.repeat, env=env)
        if {entry.key for entry in store.ls()} != built:
            raise SystemExit("the cached run built something: not a no-op, no timing to report")
        print(f"tunepipe run, fully cached ({len(plan.steps)} steps), median of {args.repeat}: {ours:.3f} s")

        if not args.dvc:
            print("dvc is not installed: no comparison (pip install dvc, or pass --dvc PATH)")
            return 0
        dvc_root = scratch / "dvc"
        dvc_project(plan, dvc_root)
        subprocess.run([args.dvc, "init", "--no-scm", "-q"], cwd=dvc_root, check=True)
        subprocess.run([args.dvc, "repro", "-q"], cwd=dvc_root, check=True, stdout=subprocess.DEVNULL)
        theirs = median_seconds([args.dvc, "repro"], args.repeat, cwd=dvc_root)
        print(f"dvc repro, no-op ({len(plan.steps)} stages),    median of {args.repeat}: {theirs:.3f} s")
        print(f"ratio dvc / tunepipe: {theirs / ours:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
