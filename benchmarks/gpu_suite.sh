#!/usr/bin/env bash
# The whole test suite on a GPU machine (docs/testing.md), summary printed last.
# Usage: benchmarks/gpu_suite.sh [workers (default 14)] [more pytest args...]
# Test paths among the args (tests/...) replace the whole suite (tests/).
# The log goes to $OUT/gpu_suite.log when $OUT is set, else /tmp/gpu_suite.log; COMMIT=<sha>
# names the commit where the tree has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
workers=${1:-14}
shift $(( $# > 0 ? 1 : 0 ))
log=${OUT:-/tmp}/gpu_suite.log
timeout_arg=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_arg=(--timeout 300)
suite=(tests/)
for arg in "$@"; do [[ $arg == tests/* ]] && suite=(); done
start=$(date +%s)
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -n "$workers" "${suite[@]}" -p no:cacheprovider \
  --durations=25 "${timeout_arg[@]}" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
wall=$(( $(date +%s) - start ))
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git; pass COMMIT=...)")}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
jaxv=$(python3 -c "import jax; print(jax.__version__, jax.default_backend())" 2>/dev/null)
echo "---- gpu_suite summary"
echo "date $(date -u '+%F %H:%M UTC'), commit $commit, ${gpu:-no GPU}, jax $jaxv, $workers workers"
echo "result: $(grep -E '^=* ?[0-9]+ (passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | sed 's/^ *//')"
echo "wall: ${wall} s, pytest exit status $status"
exit "$status"
