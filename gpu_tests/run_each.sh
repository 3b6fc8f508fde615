#!/usr/bin/env bash
# Each gpu_tests module in its own pytest process under its own time limit, its full output in
# <log dir>/<module>.log and one summary line per module on stdout (with a failure's FAILED and
# assertion lines): a hung or slow module costs only its own limit, and a failure's traceback is
# kept in its log whatever the caller's output keeps.
#   gpu_tests/run_each.sh [log dir (default gpu_tests_logs)] [seconds per module (default 120)] [module ...]
# Modules (or node ids) named after the limit run in that order (default: every gpu_tests/test_*.py).
set -u
cd "$(dirname "$0")/.."
logs="${1:-gpu_tests_logs}"
limit="${2:-120}"
shift $(( $# < 2 ? $# : 2 ))
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(gpu_tests/test_*.py)
mkdir -p "$logs"
status=0
for module in "${modules[@]}"; do
    name="$(basename "${module%%::*}" .py)"  # a node id (file::test) logs as file__test
    [[ "$module" == *::* ]] && name="${name}__${module##*::}"
    start=$SECONDS
    timeout "$limit" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "$module" > "$logs/$name.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=1
    verdict="$(grep -E '^[0-9]+ (passed|failed|skipped)|^=+ .*(passed|failed|error)' "$logs/$name.log" | tail -1)"
    [ $rc -eq 124 ] && verdict="timed out after ${limit}s"
    echo "$name: rc=$rc $((SECONDS - start))s ${verdict}"
    grep -E '^(FAILED|ERROR) ' "$logs/$name.log" | head -20
    # the assertion lines too: a caller may get back only some of the logs
    [ $rc -ne 0 ] && grep -E '^E  ' "$logs/$name.log" | grep -v 'CUDA kernel errors\|TORCH_USE_CUDA_DSA\|CUDA_LAUNCH_BLOCKING\|docs.nvidia' | head -12
done
exit $status
