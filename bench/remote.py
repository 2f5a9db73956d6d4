"""Time a fully remote-cached quickstart on a fresh local store against its cold build.

    python bench/remote.py [SPEC] [--s3] [--workdir DIR]      # default SPEC: examples/quickstart.yaml

Machine A: a copy of the spec's directory, an empty TUNEPIPE_CACHE, `tunepipe run` (the cold build,
timed), then every artifact of its store pushed to a remote cache: a local directory standing in for
a shared filesystem, and with --s3 also moto's S3 server of tests/s3_server.py (`moto[server]`,
`s3fs`). Machine B, per remote: a second copy of the spec's directory with its own empty store pulls
every artifact (every file checked against the remote manifest while it streams; timed), checks
that each pulled artifact's digests equal A's, then runs `tunepipe run`, which must build nothing
(timed). Prints the times, the bytes moved, the ratio cold build / (pull + cached run), and whether
B's lock file equals A's. `--workdir DIR` keeps the scratch files there, and a later call with the
same DIR reuses its cold build and that build's time (machines B start fresh each call).

Until the runner pulls by itself (issue 14's runner part), the pull here is what it will do before
building each stale step; a fully remote-cached run costs about the pull plus the cached run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # s3_server, for --s3

from tunepipe.store import LocalStore, tree_digest
from tunepipe.store.remote import RemoteStore, open_remote

LOCK = "tunepipe.lock"


def checkout(spec: Path, dest: Path) -> Path:
    """A fresh copy of the spec's directory (no store, no lock): another machine's checkout."""
    shutil.copytree(spec.parent, dest, ignore=shutil.ignore_patterns(".tunepipe", LOCK))
    return dest / spec.name


def tunepipe_run(spec: Path, cache: Path) -> float:
    tunepipe = Path(sys.executable).with_name("tunepipe")
    started = time.perf_counter()
    done = subprocess.run(
        [str(tunepipe), "run", str(spec)],
        check=False,
        env={**os.environ, "TUNEPIPE_CACHE": str(cache)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"tunepipe run {spec} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - started


def digests(store: LocalStore) -> dict[str, str]:
    return {e.key: tree_digest({n: f["sha256"] for n, f in e.manifest["files"].items()}) for e in store.ls()}


def push_all(store: LocalStore, remote: RemoteStore) -> tuple[float, int]:
    started, moved = time.perf_counter(), 0
    for entry in store.ls():
        moved += remote.push(entry.key, store.fetch(entry.key), entry.manifest)
    return time.perf_counter() - started, moved


def pull_all(remote: RemoteStore, store: LocalStore) -> tuple[float, int]:
    started, moved = time.perf_counter(), 0
    for entry in remote.ls():
        moved += remote.pull(entry.key, store)
    return time.perf_counter() - started, moved


def machine_b(name: str, remote: RemoteStore, spec: Path, scratch: Path, cold_s: float, built: dict[str, str]) -> None:
    spec_b = checkout(spec, scratch / f"machine-b-{name}")
    store_b = LocalStore(scratch / f"cache-b-{name}")
    pull_s, pulled = pull_all(remote, store_b)
    if digests(store_b) != built:
        raise SystemExit(f"{name}: the pulled artifacts differ from the built ones")
    run_s = tunepipe_run(spec_b, store_b.root)
    if digests(store_b) != built:
        raise SystemExit(f"{name}: the run on the pulled store built something")
    same_lock = (spec_b.parent / LOCK).read_text() == (spec.parent / LOCK).read_text()
    print(
        f"{name:>9}: pull {pull_s:6.2f} s ({pulled / 1e6:.1f} MB, {pulled / 1e6 / pull_s:.0f} MB/s), "
        f"cached run {run_s:.2f} s -> {pull_s + run_s:.2f} s; cold / remote-cached {cold_s / (pull_s + run_s):.1f}x; "
        f"lock {'equal' if same_lock else 'DIFFERS'}"
    )


def cold_build(spec: Path, work: Path) -> tuple[Path, LocalStore, float]:
    """Machine A's checkout, store and cold build time (reused when `work` already has them)."""
    spec_a, store_a, timing = work / "machine-a" / spec.name, LocalStore(work / "cache-a"), work / "cold_s.txt"
    if timing.is_file():
        print(f"reusing the cold build in {work}")
        return spec_a, store_a, float(timing.read_text())
    shutil.rmtree(work / "machine-a", ignore_errors=True)
    shutil.rmtree(store_a.root, ignore_errors=True)
    checkout(spec, work / "machine-a")
    print(f"cold build of {spec.name} on machine A ...", flush=True)
    cold_s = tunepipe_run(spec_a, store_a.root)
    timing.write_text(f"{cold_s}\n")
    return spec_a, store_a, cold_s


def bench(spec: Path, work: Path, s3: bool) -> None:
    spec_a, store_a, cold_s = cold_build(spec, work)
    built = digests(store_a)
    print(f"cold build: {cold_s:.1f} s, {len(built)} artifacts, {sum(e.size for e in store_a.ls()) / 1e6:.1f} MB")
    for stale in ("remote", *(p.name for p in work.glob("machine-b-*")), *(p.name for p in work.glob("cache-b-*"))):
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "remote").mkdir()
    remotes = {"directory": lambda: open_remote(str(work / "remote"))}
    server = None
    if s3:
        from s3_server import s3_env, start_s3_server

        server = start_s3_server()
        os.environ.update(s3_env(server.endpoint, work))
        remotes["s3 (moto)"] = lambda: open_remote(server.url(f"bench-{os.getpid()}"))
    try:
        for name, opener in remotes.items():
            remote = opener()
            push_s, pushed = push_all(store_a, remote)
            print(f"{name:>9}: push {push_s:6.2f} s ({pushed / 1e6:.1f} MB)")
            machine_b(name.split()[0], remote, spec_a, work, cold_s, built)
    finally:
        if server is not None:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", type=Path, default=REPO / "examples" / "quickstart.yaml")
    parser.add_argument("--s3", action="store_true", help="also through moto's S3 server (tests/s3_server.py)")
    parser.add_argument("--workdir", type=Path, help="keep the scratch files here (and reuse its cold build)")
    args = parser.parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        bench(args.spec.resolve(), args.workdir.resolve(), args.s3)
        return 0
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-remote-") as scratch:
        bench(args.spec.resolve(), Path(scratch), args.s3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
