#!/usr/bin/env bash
# Runs a validator: it audits miners' work and sets weights on the chain.
# Sets this machine up first if needed (bash setup.sh validator), then runs `iota validator` with the settings in .env
# (a variable in the environment overrides .env). Extra arguments go to `iota validator`; PM2 runs this script
# (pm2/validator.config.js). IOTA_SKIP_SETUP=1 skips the set-up, for an environment you manage yourself.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${IOTA_SKIP_SETUP:-0}" != 1 ]; then
  bash setup.sh validator >&2
fi
# exec: the iota process takes this shell's place, so PM2's stop signal reaches it directly.
exec .venv/bin/iota validator "$@"
