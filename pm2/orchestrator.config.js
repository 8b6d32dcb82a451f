// PM2 keeps the orchestrator running: `pm2 start pm2/orchestrator.config.js`, `pm2 logs orchestrator`.
// It runs start_orchestrator.sh (set-up if needed, then `iota orchestrator` with .env). Every decision is in
// the state database (IOTA_STATE_URL) before it is answered, so a restart loses nothing: miners retry through it.
// IOTA_LOG_DIR in the environment of `pm2 start` moves the log files (default: runs/logs in the repository).
const path = require("path");

const root = path.join(__dirname, "..");
const logs = process.env.IOTA_LOG_DIR || path.join(root, "runs", "logs");

module.exports = {
  apps: [
    {
      name: "orchestrator",
      script: path.join(root, "start_orchestrator.sh"),
      interpreter: "bash",
      cwd: root,
      autorestart: true,
      restart_delay: 3000,
      min_uptime: "60s",
      max_restarts: 10,
      // SIGINT: uvicorn stops accepting, answers the requests in progress, then exits.
      kill_signal: "SIGINT",
      kill_timeout: 30000,
      out_file: path.join(logs, "orchestrator.out.log"),
      error_file: path.join(logs, "orchestrator.err.log"),
      merge_logs: true,
    },
  ],
};
