"""Run a step under torchrun: one worker per process, DDP through the Trainer (gloo on CPU, NCCL on GPUs).

The command is torchrun wrapped around the usual worker module:

    torchrun --nproc-per-node 2 --nnodes 1 --rdzv-backend c10d --rdzv-endpoint localhost:0
             --rdzv-id <key[:16]> --max-restarts 0 -m tunepipe.runtime.worker STEP.json

Every rank runs the stage; the worker commits rank 0's artifact only. On one node without an
rdzv_endpoint the c10d store binds a free port (`localhost:0`, what `torchrun --standalone`
does), so parallel runs never fight over master_port; `rdzv_backend: static` uses
`localhost:<master_port>` instead. Several nodes need the rendezvous endpoint of node 0; the
rendezvous id is the step key, the same on every node. Starting, polling and cancelling are the
local executor's: torchrun and its workers are one process group.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .base import Launch
from .local import LocalExecutor

WORKER_MODULE = "tunepipe.runtime.worker"


class TorchrunExecutor(LocalExecutor):
    kind = "torchrun"
    standby_ahead = 0  # torchrun starts the workers itself

    def prepare(self, step, step_json: Path, log_path: Path) -> Launch:
        return Launch(step.id, torchrun_argv(step.executor, step.key, step_json), log_path)


def torchrun_argv(options: dict, key: str, step_json: Path) -> list[str]:
    nproc = int(options.get("nproc_per_node") or 1)
    nnodes = int(options.get("nnodes") or 1)
    backend = options.get("rdzv_backend") or "c10d"
    endpoint = options.get("rdzv_endpoint")
    if nproc < 1 or nnodes < 1:
        raise UserError(f"executor: nproc_per_node and nnodes must be at least 1 (got {nproc} and {nnodes})")
    if nnodes > 1 and not endpoint:
        raise UserError(
            f"executor.rdzv_endpoint is required with nnodes: {nnodes} (host:port of a node every node can reach)"
        )
    if not endpoint:
        endpoint = f"localhost:{int(options.get('master_port') or 29500)}" if backend == "static" else "localhost:0"
    return [
        *torchrun_command(options.get("python")),
        "--nproc-per-node", str(nproc),
        "--nnodes", str(nnodes),
        "--rdzv-backend", backend,
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", key[:16],
        "--max-restarts", str(int(options.get("max_restarts") or 0)),
        "-m", WORKER_MODULE, str(step_json),
    ]  # fmt: skip


def torchrun_command(python: str | None) -> list[str]:
    """The torchrun script installed beside the interpreter (no PATH lookup), else the module."""
    python = python or sys.executable
    script = Path(python).parent / "torchrun"
    return [str(script)] if script.is_file() else [python, "-m", "torch.distributed.run"]


EXECUTOR = TorchrunExecutor
