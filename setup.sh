#!/usr/bin/env bash
# Sets up iota on this machine: a .venv with the package, and a .env from .env.example. Idempotent.
# Usage: bash setup.sh [miner|validator|orchestrator|dev]   (asks when run from a terminal without a role)
set -euo pipefail
cd "$(dirname "$0")"

role="${1:-}"
if [ -z "$role" ] && [ -t 0 ]; then
  read -r -p "Set up this machine as a miner or validator? [miner/validator/orchestrator/dev] " role
fi
role="${role:-dev}"
case "$role" in
  miner|validator|orchestrator) extras="postgres" ;;
  dev) extras="dev" ;;
  *) echo "setup.sh: unknown role '$role' (expected miner, validator, orchestrator or dev)" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup.sh: iota needs Python >= 3.10 ($("$PY" --version 2>&1) found)" >&2; exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# Reinstall only when the project's requirements changed since the last set-up of this role.
stamp=".venv/.iota-setup-$role"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup.sh: installing iota[$extras] into .venv (first run takes a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi
if [ ! -f .env ]; then
  cp .env.example .env
  echo "setup.sh: wrote .env from .env.example; edit it to configure this $role"
fi
echo "setup.sh: ready ($role). Run '.venv/bin/iota --help' to see the commands."
