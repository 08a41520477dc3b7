#!/usr/bin/env bash
# One command per job, on a fresh machine: sets up .venv (once) and runs.
#   ./run.sh quality [pytest args]   the main job: `pytest -m quality` on the demo zoo
#   ./run.sh test    [pytest args]   the test suite, then the fast quality tier
#   ./run.sh bench   [pytest args]   benchmarks of the evaluation hot path
# Installs go through constraints.txt (torch==2.13.0, the CPU wheel this project's machines use).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {
  local stamp=".venv/.quantgate-installed"
  local want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "run.sh: installing quantgate and its evaluation stack into .venv (first run: a few minutes)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    # llama-cpp-python compiles llama.cpp here (no Linux wheels on PyPI). Only the libraries the bindings load
    # are built (no multimodal part, tools, tests, server, nor the tools' "common" library: cmake/): 2.3 min
    # of compiling on 2 cores instead of 4.6 with the common library, and 18.7 with the package's defaults.
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_PROJECT_INCLUDE='$PWD/cmake/llama-cpp-library-only.cmake'}" \
      CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      .venv/bin/python -m pip install -q -c constraints.txt -e ".[eval,gptq,llamacpp,bnb,compressed,demo,plots,test]"
    echo "$want" > "$stamp"
  fi
}

# The HTML report's test renders it in Chromium from the distribution's packages. Installed here when it is
# missing and this is a root shell with apt-get (about 35 s); otherwise that test is skipped, naming why.
browser() {
  if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "run.sh: installing Debian's chromium for the HTML report's browser test" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "run.sh: chromium could not be installed; the browser test will be skipped" >&2
  fi
}

# pytest-xdist workers for the quality runs: one per core, at most 4 (the zoo has 28 variants), none on one core.
workers() {
  local n
  n=$(nproc 2>/dev/null || echo 1)
  [ "$n" -gt 4 ] && n=4
  [ "$n" -ge 2 ] && echo "-n $n"
  return 0
}

job=${1:-}
shift || true
case "$job" in
  quality)
    setup
    # the variants side by side on the CPU's cores (pytest-xdist; `-n 0` runs them in one process)
    exec .venv/bin/python -m pytest -m quality quality_tests --quality-html reports/quality.html $(workers) "$@"
    ;;
  test)
    setup
    browser
    # The test files side by side on the CPU's cores (pytest-xdist, a file per worker: a module's fixtures such as
    # its recipe builds are made once). Most tests are inner pytest runs and subprocesses; each worker keeps to its
    # core and so do the processes it starts (tests/conftest.py), so their threads never outnumber the cores.
    w=$(workers)
    .venv/bin/python -m pytest tests ${w:+$w --dist loadfile} "$@"
    # The fast tier's variants side by side on the CPU's cores (pytest-xdist, one variant per worker, the
    # same records as a serial run: docs/big-models.md).
    exec .venv/bin/python -m pytest -m quality quality_tests --quality-profile fast --quality-strict \
      --quality-json reports/quality-fast.json $(workers)
    ;;
  bench)
    setup
    exec .venv/bin/python -m pytest benchmarks --benchmark-only "$@"
    ;;
  *)
    echo "usage: ./run.sh quality|test|bench [pytest args]" >&2
    exit 2
    ;;
esac
