#!/usr/bin/env bash
# Sets up iota on this machine: a .venv with the package at the versions of requirements.lock, and a .env from
# .env.example. Idempotent: a .venv that already matches is left alone.
# Usage: bash setup.sh [miner|validator|orchestrator|dev]   (asks when run from a terminal without a role)
#        bash setup.sh lock   rewrites requirements.lock from .venv (see "Reproducible installs" in README.md)
# PYTHON=/path/to/python3 chooses the interpreter that creates .venv (Python >= 3.10).
set -euo pipefail
cd "$(dirname "$0")"

role="${1:-}"
if [ -z "$role" ] && [ -t 0 ]; then
  read -r -p "Set up this machine as a miner or validator? [miner/validator/orchestrator/dev] " role
fi
role="${role:-dev}"
case "$role" in
  miner|validator) extras="" ;;  # they keep no database: no PostgreSQL driver
  orchestrator) extras="postgres" ;;
  dev|lock) extras="dev" ;;
  *) echo "setup.sh: unknown role '$role' (expected miner, validator, orchestrator or dev)" >&2; exit 2 ;;
esac

# Python run inside .venv: `satisfied` checks it against the lock, `lock` writes the lock from it. -I: the
# checkout's own iota.egg-info (in the working directory) must not stand in for the installed one.
venv_python() {
  .venv/bin/python -I - "$@" <<'EOF'
import json, pathlib, sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

action, extra = sys.argv[1], sys.argv[2]


def base_version(version):
    return version.split("+", 1)[0]  # torch's +cpu or +cu128: the lock holds for either build


def project_requirements():
    import tomllib

    project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"].get(extra, [])]


def wanted(requirement, extras):
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""})


if action == "lock":
    # The installed closure of iota[extra]: every distribution its requirements reach, at its installed version.
    pins, done, todo = {}, {}, [(r, set(r.extras)) for r in project_requirements() if wanted(r, {extra})]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        new = ({""} | extras) - done.setdefault(name, set())  # "" stands for its requirements without extras
        if not new:
            continue
        done[name] |= new
        dist = metadata.distribution(requirement.name)
        pins[name] = f"{dist.metadata['Name']}=={base_version(dist.version)}"
        for line in dist.requires or []:
            child = Requirement(line)
            if wanted(child, new):
                todo.append((child, set(child.extras)))
    header = "# Exact versions of iota[dev] and everything it needs: written by `bash setup.sh lock`, read by setup.sh.\n"
    pathlib.Path("requirements.lock").write_text(header + "".join(f"{pins[n]}\n" for n in sorted(pins)))
    print(f"setup.sh: wrote requirements.lock ({len(pins)} packages)")
    sys.exit(0)

# satisfied: .venv holds this checkout (editable), every requirement of pyproject.toml for these extras, and each
# package the lock pins (for dev: every one of them) at the lock's version.
url = json.loads(metadata.distribution("iota").read_text("direct_url.json") or "{}").get("url", "")
if url != pathlib.Path.cwd().resolve().as_uri():
    sys.exit(1)
lock = {}
for line in pathlib.Path("requirements.lock").read_text().splitlines():
    if line and not line.startswith("#"):
        name, version = line.split("==")
        lock[canonicalize_name(name)] = version
names = [canonicalize_name(r.name) for r in project_requirements() if wanted(r, {extra})]
for name in sorted(lock) if extra == "dev" else names:
    installed = base_version(metadata.version(name))
    if name in lock and installed != lock[name]:
        sys.exit(1)
for requirement in project_requirements():
    if wanted(requirement, {extra}) and not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
        sys.exit(1)
EOF
}

# `patiently WHAT COMMAND...`: says WHAT, runs the command, and says every 8 s that it still runs: pip prints
# nothing while it unpacks and installs the wheels it collected (minutes for torch on a slow disk), nor does venv
# while it installs pip, and a silent terminal looks like a hung one.
patiently() {
  local what="$1"; shift
  echo "setup.sh: $what"
  ( n=0; while sleep 8; do n=$((n + 8)); echo "setup.sh: still $what (${n} s)"; done ) &
  local beat=$!
  trap "kill $beat 2>/dev/null" EXIT  # an interrupted set-up leaves no beat behind
  local rc=0
  "$@" || rc=$?
  kill "$beat" 2>/dev/null || true
  trap - EXIT
  return "$rc"
}

PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null; then
  echo "setup.sh: $PY not found; install Python >= 3.10 or set PYTHON=/path/to/python3" >&2; exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup.sh: iota needs Python >= 3.10 ($("$PY" --version 2>&1) found)" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  patiently "creating .venv with $("$PY" --version 2>&1)" "$PY" -m venv .venv
fi

if [ "$role" = lock ]; then
  venv_python lock dev
  exit 0
fi

# Reinstall only when the requirements or the lock changed since the last set-up of this role.
stamp=".venv/.iota-setup-$role"
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup.sh: .venv is set up for $role already; nothing to install"
elif venv_python satisfied "$extras" 2>/dev/null; then
  echo "setup.sh: .venv already has iota${extras:+[$extras]} at the versions of requirements.lock; nothing to install"
  echo "$want" > "$stamp"
else
  # pip says what it collects, package by package; a first install takes minutes.
  patiently "upgrading pip in .venv" .venv/bin/python -m pip install -q --upgrade pip \
    || echo "setup.sh: could not upgrade pip (offline?); going on with $(.venv/bin/python -m pip --version)"
  if [ "$extras" = dev ]; then
    patiently "installing the $(grep -vc '^#' requirements.lock) packages of requirements.lock" \
      .venv/bin/python -m pip install -r requirements.lock
    patiently "installing iota itself from this checkout (editable; its requirements are in place)" \
      .venv/bin/python -m pip install --no-deps -e .
  else
    patiently "installing iota${extras:+[$extras]} at the versions of requirements.lock" \
      .venv/bin/python -m pip install -c requirements.lock -e ".${extras:+[$extras]}"
  fi
  echo "$want" > "$stamp"
fi
if [ ! -f .env ]; then
  cp .env.example .env
  echo "setup.sh: wrote .env from .env.example; edit it to configure this $role"
fi
echo "setup.sh: ready ($role). Run '.venv/bin/iota --help' to see the commands."
