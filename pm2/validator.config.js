// PM2 keeps a validator running: `pm2 start pm2/validator.config.js`, `pm2 logs validator`.
// It runs start_validator.sh (set-up if needed, then `iota validator` with .env).
// IOTA_LOG_DIR in the environment of `pm2 start` moves the log files (default: runs/logs in the repository).
const path = require("path");

const root = path.join(__dirname, "..");
const logs = process.env.IOTA_LOG_DIR || path.join(root, "runs", "logs");

module.exports = {
  apps: [
    {
      name: "validator",
      script: path.join(root, "start_validator.sh"),
      interpreter: "bash",
      cwd: root,
      autorestart: true,
      restart_delay: 3000,
      min_uptime: "60s",
      max_restarts: 10,
      // SIGINT asks the validator to stop; it has a minute before PM2 kills it.
      kill_signal: "SIGINT",
      kill_timeout: 60000,
      out_file: path.join(logs, "validator.out.log"),
      error_file: path.join(logs, "validator.err.log"),
      merge_logs: true,
    },
  ],
};
