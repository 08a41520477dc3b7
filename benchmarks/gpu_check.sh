#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py says what it checks): one line per check.
#
# On a bare machine with one NVIDIA GPU, its own CUDA torch and transformers (the `device` tool's machine:
# torch 2.11, transformers 5.17, accelerate, pytest, pytest-xdist, no internet), from a checkout:
#     bash benchmarks/gpu_check.sh
# Packages that machine lacks travel as wheels in .whl/ (benchmarks/gpu_pack.sh downloads them and sets aside
# the tracked files the check does not need, so that the tree fits the tool's 64 MiB); they are installed into
# /tmp/site, never over the machine's own torch.
# Here, on the CPU, the same script proves itself (not CUDA): QG_DEVICE=cpu QG_ZOO=build/zoo bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu-check: wheels: FAIL: the carried wheels did not install"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec $PY benchmarks/gpu_check.py "$@"
