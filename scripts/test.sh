#!/usr/bin/env bash
# The project's checks, as CI runs them (after scripts/install.sh): lint, layer contracts, types,
# then the test suite in two parts, the default (fast) tests and the `slow` ones, each timed and
# with its 20 slowest tests listed. Exits non-zero if any step fails; no test collected is a failure.
# Tests run on TEST_WORKERS pytest-xdist workers (default 2, one a core of CI's machine; 0: none): a file's
# tests, and the files sharing a session run, stay on one worker (tests/conftest.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
failed=()

step() {  # step NAME COMMAND...: run, time, remember a failure
    local name=$1 start=$SECONDS status=0
    shift
    echo "== $name"
    "$@" || status=$?
    [ "$status" -eq 5 ] && echo "$name: no test collected" # pytest's 5 counts as a failure
    echo "== $name: exit $status, $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed+=("$name")
}

step "ruff" .venv/bin/ruff check engine probes classifier_training toyworld_training tests benchmarks configs
step "import-linter" .venv/bin/lint-imports
step "mypy" .venv/bin/mypy
workers=(-n "${TEST_WORKERS:-2}")
step "default tests" .venv/bin/python -m pytest -q -p no:randomly "${workers[@]}" --durations=20
step "slow tests" .venv/bin/python -m pytest -q -p no:randomly "${workers[@]}" -m "slow and not gpu and not real_weights" \
    --durations=20

if [ "${#failed[@]}" -ne 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
