#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client commands) and munge for tests/test_slurm.py.
# Idempotent and quiet: does nothing when the binaries are already there. Needs root (CI runs as root).
set -euo pipefail
need=(sbatch squeue scancel scontrol sinfo slurmctld slurmd munged)
missing() { for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || return 0; done; return 1; }
missing || exit 0
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
  tail -30 "$log" >&2
  exit 1
fi
rm -f "$log"
# The Debian packages start their own daemons on install where a service manager runs; the tests
# start theirs with their own configuration, so stop any that came up (this host's, not ours).
for service in slurmctld slurmd munge; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done
missing && { echo "slurm-ci: binaries still missing after install: ${need[*]}" >&2; exit 1; }
echo "slurm-ci: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) and munge"
