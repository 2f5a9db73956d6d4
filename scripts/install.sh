#!/usr/bin/env bash
# Set up tunepipe with its training, export, remote-cache and test dependencies in ./.venv (or the
# active venv). torch is installed first and pinned for every later install: a bare `torch`
# requirement on a CPU-only machine may pull a multi-GB CUDA build.
# llama-cpp-python has no wheel on PyPI: the first install builds it from its sdist (about 15 min
# on 2 cores, a CPU build); pip's wheel cache makes later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY=.venv/bin/python
else
  PY="$VIRTUAL_ENV/bin/python"
fi
TORCH="torch==${TUNEPIPE_TORCH:-2.13.0}"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# torch pinned, plus the S3 stack at versions known to resolve together: left free, pip backtracks
# for many minutes between boto3's and aiobotocore's botocore pins (and then fails on fsspec).
{ echo "$TORCH"; cat scripts/constraints-s3.txt; } >"$constraints"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
pip=("$PY" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "$TORCH"
"${pip[@]}" -c "$constraints" -e ".[train,export,quantize,remote,dev]"
# Byte-compile the package now: where PYTHONDONTWRITEBYTECODE is set, Python would otherwise
# recompile tunepipe's modules on every `tunepipe validate` (~50 ms).
"$PY" -m compileall -q src >/dev/null
echo "tunepipe installed in $("$PY" -c 'import sys; print(sys.prefix)')"
