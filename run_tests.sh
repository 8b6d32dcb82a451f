#!/usr/bin/env bash
# The test command: sets up if needed, then lint, type check and the test suite, timing each part.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh dev >/dev/null
export PATH="$PWD/.venv/bin:$PATH"

status=0
part() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@"; then echo "== $name passed in $((SECONDS - t0)) s"; else status=1; echo "== $name FAILED in $((SECONDS - t0)) s"; fi
}
part ruff ruff check iota tests bench
part format ruff format --check iota tests bench
part mypy mypy
part pytest python -m pytest -q "$@"
exit $status
