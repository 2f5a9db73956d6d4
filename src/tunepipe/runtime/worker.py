"""`python -m tunepipe.runtime.worker STEP.json`: run one step in this process and commit its artifact.

STEP.json is written by the runner (docs/internals.md). The worker imports the stage module
`tunepipe.runtime.stages.<kind>` (or an override from $TUNEPIPE_STAGE_MODULES, e.g.
`data=my_stages,*=fake_stages`, which tests use), calls `run(ctx)` with `ctx.out` a fresh temporary
directory in the store, then writes the manifest and commits by atomic rename.

Under torchrun every rank runs the stage; only rank 0 ($RANK unset or 0) writes the artifact, the
other ranks write into a throwaway directory. SIGTERM (a cancel) and the death of the parent process
unwind through the `finally` that removes the temporary directory; SIGKILL leaves it behind under
`<cache>/tmp`, where nothing reads it and `tunepipe cache gc` removes it.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import UserError
from ..resources import describe_os_error
from ..store import STEP_LOG, open_store
from .context import StepContext

# peft calls a transformers API that transformers 5 deprecates; the warning says nothing to a user.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# Recorded in the manifest when the stage imported them (the worker never imports them itself).
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "numpy",
    "deepspeed",
    "gguf",
    "onnx",
    "onnxruntime",
    "onnxscript",
)


def stage_module_name(kind: str) -> str:
    overrides = dict(
        item.split("=", 1) for item in os.environ.get("TUNEPIPE_STAGE_MODULES", "").split(",") if "=" in item
    )
    return overrides.get(kind) or overrides.get("*") or f"tunepipe.runtime.stages.{kind}"


def stage_module(kind: str):
    return importlib.import_module(stage_module_name(kind))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "tunepipe": __version__}
    for name in LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS; this is a report, not a limit).
    return 1024 * max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )


def _terminate(signum: int, frame: Any) -> None:
    # Once: under srun a step gets TERM from slurmstepd and again from torchrun, and a second
    # SystemExit would interrupt the cleanup in run_step's `finally`.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _exit_with_parent() -> None:
    """A step must not outlive its runner (killed with -9, it cannot cancel us): watch for re-parenting."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def fetch_inputs(store, step: dict[str, Any]) -> dict[str, Path]:
    """Every input artifact (by role) as a local directory, re-hashed against its manifest before the
    stage reads a byte of it: a damaged input (a same-size overwrite, a flipped bit) is never trusted.
    Inputs are found by key when the step starts, not when it was submitted (a queued SLURM job's
    inputs are built by the jobs it waits for)."""
    inputs = {}
    for role, key in sorted(step.get("upstream", {}).items()):
        problems = store.verify(key)
        if problems:
            raise UserError(
                f"input {role} of {step['id']} (artifact {key[:12]}) is damaged: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                ["`tunepipe cache verify` removes damaged artifacts; the next run rebuilds them"],
            )
        inputs[role] = store.fetch(key)
    return inputs


def run_step(step: dict[str, Any]) -> None:
    store = open_store(Path(step["cache_dir"]))
    key = step["key"]
    log = logging.getLogger(f"tunepipe.step.{step['id']}")
    committer = int(os.environ.get("RANK", "0")) == 0
    if store.has(key) and not step.get("force"):
        log.info("%s is already in the store (built by another run); nothing to do", step["id"])
        return
    inputs = fetch_inputs(store, step)
    out = store.begin(key) if committer else Path(tempfile.mkdtemp(prefix=f"tunepipe-{key[:12]}-"))
    try:
        work = store.scratch.work_dir(key)
        ctx = StepContext(
            id=step["id"],
            kind=step["kind"],
            key=key,
            params=step["params"],
            inputs=inputs,
            artifacts={step["upstream"][role]: path for role, path in inputs.items()},
            upstream=dict(step["upstream"]),
            files={role: Path(p) for role, p in step["files"].items()},
            seed=step.get("seed"),
            spec_dir=Path(step["spec_dir"]),
            out=out,
            work=work,
            log=log,
        )
        started = time.time()
        metrics = stage_module(step["kind"]).run(ctx) or {}
        wall_s = time.time() - started
        if not committer:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        if step.get("log") and Path(step["log"]).is_file():
            shutil.copyfile(step["log"], out / STEP_LOG)
        manifest = {
            "id": step["id"],
            "kind": step["kind"],
            "stage_version": step.get("stage_version"),
            "params": step["params"],
            "upstream": step.get("upstream", {}),
            "metrics": metrics,
            "versions": library_versions(),
            "wall_s": round(wall_s, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        store.commit(out, key, manifest, replace=bool(step.get("force")))
        shutil.rmtree(work, ignore_errors=True)
        log.info("%s committed as %s", step["id"], key[:12])
    finally:
        store.abort(out)  # a no-op after a commit moved it away


def hide(packages: tuple[str, ...] | list[str]) -> None:
    """Make installed packages look absent to this process: `import` fails and `find_spec` answers
    None (sys.modules[name] = None), which is what transformers' and peft's availability checks ask.
    For the packages STEP.json's `without` names (the stage table's OPTIONAL_IMPORTS that the step
    never uses): set before the libraries that probe them are imported."""
    for name in packages:
        sys.modules.setdefault(name, None)


def standby(kind: str, without: list[str]) -> Path | None:
    """`worker --standby KIND [--without PKG,...]`: import the stage module of KIND and the libraries its
    run imports (the stage table's `preload`) now, with the step's `without` packages hidden (`hide`;
    a fresh worker reads them from STEP.json), then wait for the step. The local executor starts a worker
    like this while the steps before it run, so that a training step does not begin with seconds of
    importing torch: it writes one line, `STEP.json<TAB>LOG`, to our stdin when the step is
    submitted. From then on the process is that step's worker, exactly as if started for it (stdout
    and stderr go to LOG). EOF instead (the run ended or failed first): None, exit quietly."""
    from ..stage_table import STAGES

    hide(without)
    module = stage_module_name(kind)
    preload = STAGES[kind].preload if kind in STAGES and module == STAGES[kind].module else ()
    for name in (*preload, module):
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the step itself reports what is missing, in its log
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        return None
    step_json, log_path = line.split("\t")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return Path(step_json)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    standby_form = len(argv) in (2, 4) and argv[0] == "--standby" and (len(argv) == 2 or argv[2] == "--without")
    if not (len(argv) == 1 or standby_form):
        print(
            "usage: python -m tunepipe.runtime.worker STEP.json | --standby KIND [--without PKG,...]", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    _exit_with_parent()
    if argv[0] == "--standby":
        step_json = standby(argv[1], argv[3].split(",") if len(argv) == 4 else [])
        if step_json is None:
            return 0
        argv = [str(step_json)]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    step = json.loads(Path(argv[0]).read_text())
    hide(step.get("without", []))
    try:
        run_step(step)
    except UserError as e:
        print(f"error: {e.message}", *e.details, sep="\n", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a full disk, a permission: one line saying what and where, not a traceback
        line = describe_os_error(e)
        if line is None:
            raise
        print(f"error: {step['id']}: {line}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"error: {step['id']}: out of memory — lower per_device_train_batch_size / cutoff_len, or free memory",
            file=sys.stderr,
        )
        return 1
    return 0


def exit_now(code: int) -> None:
    """End the worker without the interpreter's teardown. Once the step has committed (or reported its
    error) nothing is left but to exit, and finalizing what a model step imported (torch, transformers,
    sympy: hundreds of thousands of objects) takes ~1.5 s on 2 cores, longer than many steps run.
    What a normal exit does that matters still happens, in its order: other non-daemon threads are
    joined, atexit handlers run, logging and stdio are flushed. The artifact needs none of it: its
    commit fsynced it."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging.shutdown is one of them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())  # a bug's traceback propagates from main() and exits the usual way
