#!/usr/bin/env bash
# The test command: sets up if needed, then lint, format check, type check, import contracts and the test suite,
# timing each part.
# Usage: bash run_tests.sh [pytest arguments]   e.g. bash run_tests.sh -m "not slow"   or   tests/train -x
# Every part runs even when an earlier one fails; the exit status is non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")"

started=$SECONDS
echo "== setup: bash setup.sh dev"
if ! bash setup.sh dev >/dev/null; then
  echo "== setup FAILED: nothing can be checked without .venv (run 'bash setup.sh dev' to see why)" >&2
  exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"

summary=()
failed=0
part() {
  local name="$1"; shift
  local t0=$SECONDS rc=0
  echo
  echo "== $name: $*"
  "$@" || rc=$?
  if [ "$name" = pytest ] && [ "$rc" = 5 ]; then
    echo "pytest collected no tests: a run that checks nothing is a failure, not a pass"
  fi
  local verdict="passed"
  if [ "$rc" != 0 ]; then verdict="FAILED (exit $rc)"; failed=1; fi
  local line
  line="$(printf '%-8s %-18s %5d s' "$name" "$verdict" $((SECONDS - t0)))"
  echo "== $line"
  summary+=("$line")
}

part ruff ruff check .
part format ruff format --check .
part mypy mypy
part imports lint-imports  # the layering contracts in pyproject.toml ([tool.importlinter])
# Without arguments: everything but the long runs marked `extended` (run those with: bash run_tests.sh -m extended).
if [ "$#" -eq 0 ]; then set -- -m "not extended"; fi
part pytest python -m pytest -q -ra --durations=15 "$@"

echo
echo "== summary"
printf '   %s\n' "${summary[@]}"
echo "   total $((SECONDS - started)) s: $([ "$failed" = 0 ] && echo "all passed" || echo "FAILED")"
exit "$failed"
