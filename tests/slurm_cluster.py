"""A real one-node SLURM cluster on localhost for the SLURM executor's tests (tests/test_slurm.py).

From Debian's `slurm-wlm` and `munge` packages (scripts/slurm-ci.sh installs them) it starts, all
in one temporary directory and in the foreground, so that each is stopped by its own PID:

    munged      its own generated key, socket, pid, log and seed files
    slurmctld   a generated slurm.conf: one node (this host's short name, 2 CPUs, RealMemory of
    slurmd      the machine), one default partition, proctrack/linuxproc, task/none, no accounting
                (no slurmdbd: `sacct` knows nothing), free ports, short timeouts, SlurmUser: the
                user running the tests (root in CI)

and waits until `sinfo` shows the node idle. `SLURM_CONF` points the client commands (sbatch,
squeue, scancel, scontrol, sinfo) at it: the `slurm_cluster` fixture sets it for the whole test
session, so the executor and the jobs (sbatch exports the environment) find this cluster.

The fixture skips, naming what is missing, only when the binaries are absent; any other failure to
start is an error carrying the daemons' logs. `python tests/slurm_cluster.py` starts a cluster,
prints how to use it and stops it on Ctrl-C (a cluster for trying `tunepipe run --executor slurm`).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
# Daemons live in sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
KILL_WAIT_S = 5  # SIGTERM to SIGKILL of a cancelled job
CPUS = 2


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    partition: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """What a client command needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, capture_output=True, text=True, check=check, timeout=60, env={**os.environ, **self.env}
        )

    def node_state(self) -> str:
        result = self.command("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def logs(self) -> str:
        parts = []
        for name in DAEMONS:
            path = self.root / "log" / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"--- {name} ({path}) ---\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is still queued, then SIGTERM each daemon by PID (slurmd first, munged last)
        and SIGKILL what outlives the grace."""
        if all(p.poll() is None for p in self.processes.values()) and len(self.processes) == len(DAEMONS):
            self.cancel_all()
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def cancel_all(self) -> None:
        """scancel every job and wait until none runs: slurmstepd outlives slurmd, its jobs with it."""
        jobs = self.command("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if not jobs:
            return
        self.command("scancel", *jobs, check=False)
        deadline = time.monotonic() + STOP_TIMEOUT_S + KILL_WAIT_S
        while self.command("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SEARCH_PATH) is None]


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd with their state in `root`; returns once the node is idle."""
    for sub in ("munge", "etc", "state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o711)  # munged wants every directory above its socket searchable
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(root, root / "etc" / "slurm.conf", node, partition="debug")
    munge_socket = root / "munge" / "munge.socket"
    cluster.conf.write_text(slurm_conf(root, node, munge_socket, memory_mib(), ports=free_ports(2)))
    try:
        start_munged(cluster, munge_socket)
        daemon(cluster, "slurmctld", "-D", "-c", "-f", str(cluster.conf))
        daemon(cluster, "slurmd", "-D", "-f", str(cluster.conf), "-N", node)
        wait_until_idle(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def slurm_conf(root: Path, node: str, munge_socket: Path, memory: int, ports: list[int]) -> str:
    # cred_expire also delays the restart of a requeued job (default 120 s)
    auth = f"socket={munge_socket},cred_expire=5"
    user = pwd.getpwuid(os.getuid()).pw_name
    return "\n".join([
        "# generated by tests/slurm_cluster.py: a one-node cluster for tunepipe's tests",
        "ClusterName=tunepipe-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        f"SlurmUser={user}",  # root in CI
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        f"AuthInfo={auth}",
        "CredType=cred/munge",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "SlurmctldTimeout=10",
        "SlurmdTimeout=10",
        "MessageTimeout=10",
        "InactiveLimit=0",
        f"KillWait={KILL_WAIT_S}",
        "MinJobAge=2",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",  # a requeued job restarts within seconds
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={memory} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])  # fmt: skip


def memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_munged(cluster: SlurmCluster, munge_socket: Path) -> None:
    key = cluster.root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge = cluster.root / "munge"
    daemon(
        cluster,
        "munged",
        "--foreground",
        "--force",
        f"--socket={munge_socket}",
        f"--key-file={key}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--seed-file={munge / 'munged.seed'}",
        f"--log-file={cluster.root / 'log' / 'munged.log'}",
    )
    wait_for(cluster, "munged", lambda: munge_socket.exists())


def daemon(cluster: SlurmCluster, name: str, *args: str) -> None:
    """Start `name` in the foreground in its own session (its output goes beside its log)."""
    with open(cluster.root / "log" / f"{name}.out", "wb") as out:
        cluster.processes[name] = subprocess.Popen(
            [shutil.which(name, path=SEARCH_PATH), *args], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, env={**os.environ, **cluster.env}, start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (only a prctl call)
        )  # fmt: skip


_PRCTL = ctypes.CDLL(None).prctl  # looked up here: the child only calls it
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even killed with -9 (Linux prctl PR_SET_PDEATHSIG)."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until_idle(cluster: SlurmCluster) -> None:
    wait_for(cluster, "the node to be idle", lambda: cluster.node_state() == "idle")


def wait_for(cluster: SlurmCluster, what: str, ready) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [n for n, p in cluster.processes.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            outputs = "\n".join(
                f"--- {n}.out ---\n{(cluster.root / 'log' / f'{n}.out').read_text(errors='replace')[-2000:]}"
                for n in cluster.processes
            )
            why = f"{', '.join(dead)} exited" if dead else f"timed out after {START_TIMEOUT_S:.0f}s"
            raise RuntimeError(f"SLURM test cluster: waiting for {what}: {why}\n{outputs}\n{cluster.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster for the session; SLURM_CONF set for this process and its children."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM binaries absent ({', '.join(missing)}): install them with scripts/slurm-ci.sh")
    # A short root: munge's socket path must fit a unix socket address (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="tunepipe-slurm-"))
    cluster = start_cluster(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        try:
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if missing_binaries():
        raise SystemExit(f"missing: {', '.join(missing_binaries())} (run scripts/slurm-ci.sh)")
    started = time.monotonic()
    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="tunepipe-slurm-")))
    print(
        f"cluster up in {time.monotonic() - started:.1f}s; node {cluster.node} idle\n"
        f"export SLURM_CONF={cluster.conf}\n(Ctrl-C stops it)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
