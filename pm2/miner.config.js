// PM2 keeps one miner running: `pm2 start pm2/miner.config.js`, `pm2 logs miner`, `pm2 stop miner`.
// It runs start_miner.sh (set-up if needed, then `iota miner` with .env). Several GPUs on one host: generate one
// app per GPU and hotkey with `python pm2/multi_gpu.py` (docs/running-a-miner.md).
// IOTA_LOG_DIR in the environment of `pm2 start` moves the log files (default: runs/logs in the repository).
const path = require("path");

const root = path.join(__dirname, "..");
const logs = process.env.IOTA_LOG_DIR || path.join(root, "runs", "logs");

module.exports = {
  apps: [
    {
      name: "miner",
      script: path.join(root, "start_miner.sh"),
      interpreter: "bash",
      cwd: root,
      autorestart: true,
      // A crash is restarted after 3 s; ten crashes in a row, each within a minute of its start, mean a
      // configuration error, and PM2 stops trying (`pm2 ls` shows "errored", the log says why).
      restart_delay: 3000,
      min_uptime: "60s",
      max_restarts: 10,
      // `pm2 stop` sends SIGINT, then SIGKILL after kill_timeout. On SIGINT the miner finishes the step it is
      // in (a forward, backward or upload), releases what it holds and says goodbye (POST /miners/leave), so
      // its samples are requeued at once instead of when their leases expire. Two minutes covers a step and a
      // large upload in progress.
      kill_signal: "SIGINT",
      kill_timeout: 120000,
      out_file: path.join(logs, "miner.out.log"),
      error_file: path.join(logs, "miner.err.log"),
      merge_logs: true,
    },
  ],
};
