#!/usr/bin/env bash
# Sets up iota on this machine: a .venv with the package, and a .env from .env.example. Idempotent.
# Usage: bash setup.sh [miner|validator|orchestrator|dev]   (asks when run from a terminal without a role)
# PYTHON=/path/to/python3 chooses the interpreter that creates .venv (Python >= 3.10).
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
if ! command -v "$PY" >/dev/null; then
  echo "setup.sh: $PY not found; install Python >= 3.10 or set PYTHON=/path/to/python3" >&2; exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup.sh: iota needs Python >= 3.10 ($("$PY" --version 2>&1) found)" >&2; exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# True when .venv already holds this checkout (editable) and every requirement of pyproject.toml for these
# extras at a matching version: then nothing is downloaded (a prepared or offline venv works as is).
satisfied() {
  # -I: the checkout's own iota.egg-info (in the working directory) must not stand in for the installed one.
  .venv/bin/python -I - "$extras" <<'EOF' 2>/dev/null
import json, pathlib, sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement

extra = sys.argv[1]
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
wanted = project["dependencies"] + project["optional-dependencies"].get(extra, [])
url = json.loads(metadata.distribution("iota").read_text("direct_url.json") or "{}").get("url", "")
if url != pathlib.Path.cwd().resolve().as_uri():
    sys.exit(1)
for line in wanted:
    requirement = Requirement(line)
    if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
        continue
    if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
        sys.exit(1)
EOF
}

# Reinstall only when the project's requirements changed since the last set-up of this role.
stamp=".venv/.iota-setup-$role"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if satisfied; then
    echo "setup.sh: .venv already has iota[$extras] and its requirements"
  else
    echo "setup.sh: installing iota[$extras] into .venv (first run takes a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
  fi
  echo "$want" > "$stamp"
fi
if [ ! -f .env ]; then
  cp .env.example .env
  echo "setup.sh: wrote .env from .env.example; edit it to configure this $role"
fi
echo "setup.sh: ready ($role). Run '.venv/bin/iota --help' to see the commands."
