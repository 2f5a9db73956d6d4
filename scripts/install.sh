#!/usr/bin/env bash
# Set up tunepipe with its training, export and test dependencies in ./.venv (or the active venv).
# torch is installed first and pinned: a bare `torch` requirement on a CPU-only machine may pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi
"$PY" -m pip install --quiet --disable-pip-version-check "torch==${TUNEPIPE_TORCH:-2.13.0}"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[train,export,dev]"
# Byte-compile the package now: where PYTHONDONTWRITEBYTECODE is set, Python would otherwise
# recompile tunepipe's modules on every `tunepipe validate` (~50 ms).
"$PY" -m compileall -q src >/dev/null
echo "tunepipe installed in $("$PY" -c 'import sys; print(sys.prefix)')"
