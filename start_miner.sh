#!/usr/bin/env bash
# Runs a miner: it joins the orchestrator at IOTA_ORCHESTRATOR_URL and trains one stage.
# Sets this machine up first if needed (bash setup.sh miner), then runs `iota miner` with the settings in .env
# (a variable in the environment overrides .env). Extra arguments go to `iota miner`; PM2 runs this script
# (pm2/miner.config.js). IOTA_SKIP_SETUP=1 skips the set-up, for an environment you manage yourself.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${IOTA_SKIP_SETUP:-0}" != 1 ]; then
  bash setup.sh miner >&2
fi
# exec: the iota process takes this shell's place, so PM2's stop signal reaches it directly.
exec .venv/bin/iota miner "$@"
