#!/bin/bash
# Runs every test binary in BUILD/tests and every tests/e2e/*.sh script; prints one closing line
# "N passed, N failed" (and skipped). Exit status 0 only when nothing failed.
# usage: run-tests.sh [BUILD] [filter]   (filter: only tests whose name contains it)
set -u
build=${1:-build}
filter=${2:-}
export STRATA_FIXTURES=${STRATA_FIXTURES:-$build/fixtures}
export STRATA_BIN=${STRATA_BIN:-$build/strata}
pass=0; fail=0; skip=0; failed=()
run_one() {
    local name=$1; shift
    local t0=$(date +%s.%N)
    local log="$build/test-logs/$name.log"
    mkdir -p "$build/test-logs"
    "$@" >"$log" 2>&1
    local rc=$?
    local dt=$(printf "%.1f" "$(echo "$(date +%s.%N) - $t0" | bc)")
    case $rc in
        0) pass=$((pass+1)); echo "PASS $name (${dt}s)";;
        77) skip=$((skip+1)); echo "SKIP $name: $(grep -m1 SKIP "$log" | sed 's/^ *//')";;
        *) fail=$((fail+1)); failed+=("$name"); echo "FAIL $name (exit $rc, ${dt}s)"; tail -n 40 "$log" | sed 's/^/    /';;
    esac
}
for t in "$build"/tests/test_*; do
    [ -x "$t" ] || continue
    n=$(basename "$t")
    [ -n "$filter" ] && [[ "$n" != *"$filter"* ]] && continue
    run_one "$n" "$t"
done
for s in tests/e2e/*.sh; do
    [ -f "$s" ] || continue
    n=$(basename "$s" .sh)
    [ -n "$filter" ] && [[ "e2e_$n" != *"$filter"* ]] && continue
    run_one "e2e_$n" bash "$s"
done
echo "$pass passed, $fail failed, $skip skipped"
[ $fail -eq 0 ] || { echo "failed: ${failed[*]}"; exit 1; }
