#!/usr/bin/env bash
# Runs the orchestrator: it serves the run to miners and validators on IOTA_HOST:IOTA_PORT.
# Sets this machine up first if needed (bash setup.sh orchestrator), then runs `iota orchestrator` with the settings in .env
# (a variable in the environment overrides .env). Extra arguments go to `iota orchestrator`; PM2 runs this script
# (pm2/orchestrator.config.js). IOTA_SKIP_SETUP=1 skips the set-up, for an environment you manage yourself.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${IOTA_SKIP_SETUP:-0}" != 1 ]; then
  bash setup.sh orchestrator >&2
fi
# exec: the iota process takes this shell's place, so PM2's stop signal reaches it directly.
exec .venv/bin/iota orchestrator "$@"
