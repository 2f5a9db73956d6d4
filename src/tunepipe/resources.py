"""What a resource failure means, in one line: a full disk, a permission, a read-only filesystem, an
out-of-memory kill. Used by the worker (an OSError inside a step), the runner (a step that died) and
the CLI (an OSError of the runner itself). Light: standard library only.
"""

from __future__ import annotations

import errno
import shutil
import signal
from pathlib import Path

LOW_DISK_BYTES = 64 << 20

ADVICE = {
    errno.ENOSPC: ("no space left on the device", "free space there, or point TUNEPIPE_CACHE at a larger disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space there, or point TUNEPIPE_CACHE at a larger disk"),
    errno.EACCES: ("permission denied", "fix the permissions, or point TUNEPIPE_CACHE at a directory you may write"),
    errno.EPERM: (
        "operation not permitted",
        "fix the permissions, or point TUNEPIPE_CACHE at a directory you may write",
    ),
    errno.EROFS: ("read-only file system", "point TUNEPIPE_CACHE at a writable directory"),
    errno.ENOMEM: ("out of memory", "free memory, or lower batch sizes / cutoff_len"),
}


def describe_os_error(exc: OSError) -> str | None:
    """One line for a resource error (None for any other OSError)."""
    if exc.errno not in ADVICE:
        return None
    what, todo = ADVICE[exc.errno]
    where = exc.filename or ""
    return f"{what}{f': {where}' if where else ''} — {todo}"


def describe_exit(returncode: int, cache_dir: Path) -> str | None:
    """Why a step's process ended as it did, when the exit status or the host says more than its log."""
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return (
            "killed by SIGKILL — most often the kernel's out-of-memory killer (check `dmesg`); "
            "lower per_device_train_batch_size / cutoff_len, or give the step more memory"
        )
    try:
        free = shutil.disk_usage(next(p for p in [Path(cache_dir), *Path(cache_dir).parents] if p.exists())).free
    except (OSError, StopIteration):
        return None
    if free < LOW_DISK_BYTES:
        return f"the cache's disk is full ({free >> 20} MB free at {cache_dir}) — free space, or point TUNEPIPE_CACHE at a larger disk"
    return None
