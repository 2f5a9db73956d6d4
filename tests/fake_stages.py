"""Test-only stages and a tiny flag catalog, for the engine tests (tests/test_engine_*.py).

The worker imports this module for every step kind when `TUNEPIPE_STAGE_MODULES=*=fake_stages` and
`tests/` is on PYTHONPATH. Each stage derives its output bytes from its inputs only, so two clean
builds give identical artifacts. Knobs, by environment variable:

    FAKE_SLOW=train:0.05      write the artifact as 5 files with that many seconds between them
    FAKE_FAIL=train           exit with an error in that kind
    FAKE_BIG=train:BYTES      write a file of that many bytes into the artifact
    FAKE_BUILDS=/path/file    append "<step id> <pid> <start time> hidden:<packages|->" each time a
                              stage runs (the stage table's OPTIONAL_IMPORTS the worker hid: Step.without)

`python tests/fake_stages.py run PROJECT [run_plan keyword=JSON ...]` compiles PROJECT/spec.json
with the fixture catalog and runs it: the entry point of the tests that kill or race runners.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

from tunepipe.spec.catalog import Catalog, Flag

HERE = Path(__file__).resolve().parent


# -- the fixture catalog -----------------------------------------------------------------------
def _flag(name, section, type, default=None, affects="artifact", used_by=None):
    return Flag(
        name=name, section=section, type=type, default=default, affects=affects, used_by=tuple(used_by or [section])
    )


CATALOG = Catalog(
    sections={},
    flags={
        f.name: f
        for f in [
            _flag("name", "pipeline", "str", affects="runtime"),
            _flag("seed", "pipeline", "int", 42, used_by=["data", "template", "train"]),
            _flag("model_name_or_path", "model", "str", used_by=["template", "train", "merge", "infer"]),
            _flag("model_revision", "model", "str", "main", used_by=["template", "train", "merge", "infer"]),
            _flag("dataset", "data", "list"),
            _flag("dataset_dir", "data", "path"),
            _flag("val_size", "data", "number", 0.1),
            _flag("preprocessing_num_workers", "data", "int", affects="runtime"),
            _flag("cutoff_len", "data", "int", 512, used_by=["template"]),
            _flag("template", "template", "str", "auto"),
            _flag("template_file", "template", "path"),
            _flag("stage", "train", "enum", "sft"),
            _flag("learning_rate", "train", "float", 5e-5),
            _flag("num_train_epochs", "train", "number", 3.0),
            _flag("logging_steps", "train", "int", 10, affects="runtime"),
            _flag("output_dir", "train", "path", affects="runtime"),
            _flag("deepspeed", "train", "path"),
            _flag("merge_lora", "merge", "bool", False),
            _flag("method", "quantize", "enum", "bnb"),
            _flag("bits", "quantize", "int", 8),
            _flag("format", "export", "enum", used_by=["export", "verify"]),
            _flag("quantized", "export", "str"),
            _flag("onnx_opset", "export", "int", 17),
            _flag("export_dir", "export", "path", affects="runtime"),
            _flag("atol", "verify", "float", 1e-3),
            _flag("prompt", "infer", "str"),
            _flag("kind", "executor", "enum", "local", affects="runtime"),
        ]
    },
)


# -- a project on disk ---------------------------------------------------------------------------
# The step ids of make_project's spec, in plan order (test_engine_plan checks the compiler makes them).
PROJECT_STEPS = [
    "data",
    "template",
    "train",
    "merge",
    "quantize",
    "verify.quantize",
    "export.gguf",
    "verify.gguf",
    "export.onnx",
    "verify.onnx",
    "infer",
]


def make_project(root: Path, **spec_changes) -> Path:
    """A spec (PROJECT/spec.json) with its inputs: dataset dir, model dir, template file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "dataset_info.json").write_text(
        json.dumps({"identity": {"file_name": "identity.json"}, "corpus": {"file_name": "corpus.txt"}})
    )
    (root / "data" / "identity.json").write_text('[{"instruction": "who are you?", "output": "tunepipe"}]')
    (root / "data" / "corpus.txt").write_text("once upon a time\n")
    (root / "data" / "unrelated.json").write_text("not read by any dataset")
    (root / "models" / "tiny").mkdir(parents=True, exist_ok=True)
    (root / "models" / "tiny" / "config.json").write_text('{"hidden_size": 8}')
    (root / "models" / "tiny" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (root / "chat.tpl").write_text("<|user|>{{q}}<|assistant|>{{a}}")
    spec = {
        "version": 1,
        "name": "fake",
        "seed": 42,
        "model": {"model_name_or_path": "models/tiny"},
        "data": {"dataset": ["identity"], "dataset_dir": "data", "val_size": 0.1},
        "template": {"template": "chatml", "template_file": "chat.tpl"},
        "train": [{"stage": "sft", "learning_rate": 1e-3, "logging_steps": 5, "output_dir": "out/model"}],
        "merge": {"merge_lora": True},
        "quantize": [{"method": "bnb", "bits": 8}],
        "export": [{"format": "gguf", "quantized": "bnb8", "export_dir": "out/gguf"}, {"format": "onnx"}],
        "infer": {"prompt": "who are you?"},
        "executor": {"kind": "local"},
    }
    spec.update(spec_changes)
    write_spec(root, spec)
    return root / "spec.json"


def read_spec(root: Path) -> dict:
    return json.loads((root / "spec.json").read_text())


def write_spec(root: Path, spec: dict) -> None:
    (root / "spec.json").write_text(json.dumps(spec, indent=2))


def compile_project(root: Path, **kwargs):
    from tunepipe.compiler.plan import compile_plan

    return compile_plan(read_spec(root), root / "spec.json", catalog=CATALOG, **kwargs)


def worker_env(env: dict | None = None) -> dict:
    """The environment a runner needs for its workers to find these stages."""
    env = dict(os.environ if env is None else env)
    env["TUNEPIPE_STAGE_MODULES"] = "*=fake_stages"
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(HERE), env.get("PYTHONPATH", "")] if p)
    return env


# -- the stages ----------------------------------------------------------------------------------
def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _read_artifact(path: Path) -> bytes:
    return b"".join(
        p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "step.log")
    )


def run(ctx) -> dict:
    kind = ctx.kind
    builds = os.environ.get("FAKE_BUILDS")
    if builds:
        with open(builds, "a") as f:
            from tunepipe.stage_table import OPTIONAL_IMPORTS

            hidden = ",".join(name for name in OPTIONAL_IMPORTS if importlib.util.find_spec(name) is None) or "-"
            f.write(f"{ctx.id} {os.getpid()} {time.time()} hidden:{hidden}\n")
    if kind in os.environ.get("FAKE_FAIL", "").split(","):
        print(f"fake {kind} is failing on purpose", flush=True)
        raise RuntimeError(f"fake failure in {kind}")
    print(f"fake {kind} running {ctx.id}", flush=True)
    if kind == "data":
        names = json.loads((ctx.files["dataset_dir"] / "dataset_info.json").read_text())
        text = b"".join((ctx.files["dataset_dir"] / names[d]["file_name"]).read_bytes() for d in ctx.params["dataset"])
        payload = _digest(text, ctx.params["seed"], ctx.params["val_size"])
    else:
        upstream = [_read_artifact(ctx.inputs[role]) for role in sorted(ctx.inputs)]
        local = [_read_artifact(p) if p.is_dir() else p.read_bytes() for _, p in sorted(ctx.files.items())]
        key_params = {
            k: v
            for k, v in ctx.params.items()
            if k not in ("logging_steps", "output_dir", "export_dir", "preprocessing_num_workers")
        }
        payload = _digest(kind, upstream, local, key_params)

    slow = dict(item.split(":") for item in os.environ.get("FAKE_SLOW", "").split(",") if ":" in item)
    if kind in slow:
        for i in range(5):
            (ctx.out / f"part{i}.bin").write_bytes(payload.encode() * 2000)
            time.sleep(float(slow[kind]))
    big = dict(item.split(":") for item in os.environ.get("FAKE_BIG", "").split(",") if ":" in item)
    if kind in big:  # FAKE_BIG=train:BYTES: a large artifact (a full disk's test)
        (ctx.out / "weights.bin").write_bytes(b"\0" * int(big[kind]))
    (ctx.out / f"{kind}.txt").write_text(payload + "\n")
    if kind == "infer":
        (ctx.out / "answer.txt").write_text(f"answer {payload[:8]}\n")
    return {"payload": payload[:12]}


# -- a runner in its own process -----------------------------------------------------------------
def main(argv: list[str]) -> int:
    from tunepipe.errors import StepFailed, UserError
    from tunepipe.runner import run_plan

    command, root, *options = argv
    assert command == "run"
    # Ctrl-C raises KeyboardInterrupt, as in a terminal's foreground command, even when the tests were
    # started from a background shell (which starts its jobs with SIGINT ignored, and children inherit it)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    kwargs = {k: json.loads(v) for k, v in (o.split("=", 1) for o in options)}
    try:
        result = run_plan(compile_project(Path(root)), **kwargs)
    except UserError as e:
        print(e.message, *e.details, sep="\n", file=sys.stderr)
        return e.exit_code
    except StepFailed as e:
        print(e, e.log_tail, sep="\n", file=sys.stderr)
        return 1
    print(json.dumps({o.id: o.status for o in result.outcomes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
