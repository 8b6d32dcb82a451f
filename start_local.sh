#!/usr/bin/env bash
# The whole network on this machine: sets up if needed (bash setup.sh dev), then `iota local`, which trains,
# evaluates and writes its JSON report to runs/local-report.json unless --report says where.
# Usage: bash start_local.sh [iota local options]   e.g. --preset test --epochs 1   (see: .venv/bin/iota local --help)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh dev >&2

report=(--report runs/local-report.json)
for arg in "$@"; do
  case "$arg" in --report|--report=*) report=() ;; esac
done
echo "start_local.sh: starting iota local (its first line comes once Python has loaded torch)" >&2
# ${report[@]+...}: an empty array under `set -u` on the bash 3 of macOS.
exec .venv/bin/iota local ${report[@]+"${report[@]}"} "$@"
