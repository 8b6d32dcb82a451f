"""The README's quick start as a newcomer meets it: `bash start_local.sh` in a fresh clone of this checkout.

Clones the committed HEAD into a new folder (nothing of this checkout's .venv, runs/ or .env comes along), runs
`bash start_local.sh` there with its output piped (as in a log or CI, not a terminal) and prints every line as it
comes, then: the wall time in all and of set-up (until the first line of `iota local`), the longest silence between
two lines and where it was (the README promises never more than 10 s), and the losses the run's report gives.

PIP_* settings of this environment pass through, so an offline machine installs from its own wheel index.

Run:  python -m bench.quickstart [--keep DIR] [--json FILE] [-- extra start_local.sh arguments]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.pipeline import machine

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default="", help="clone into this folder (kept); default: a temporary one")
    parser.add_argument("--json", default="")
    parser.add_argument("extra", nargs="*", help="arguments for start_local.sh (after --)")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="iota-quickstart-"))
    subprocess.run(["git", "clone", "-q", str(REPO), str(folder)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IOTA_", "VIRTUAL_ENV"))}
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        ["bash", "start_local.sh", *args.extra],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            at = time.monotonic() - start
            lines.append((at, line.rstrip()))
            print(f"{at:7.1f}  {line.rstrip()}", flush=True)
    total = time.monotonic() - start
    gaps = [(b[0] - a[0], a) for a, b in zip(lines, lines[1:], strict=False)]
    gap, (gap_at, gap_line) = max(gaps) if gaps else (0.0, (0.0, ""))
    setup_s = next((at for at, text in lines if "iota local" in text and "setup.sh" not in text), total)
    report = folder / "runs" / "local-report.json"
    losses: dict[str, Any] = {}
    if report.exists():
        data = json.loads(report.read_text())
        losses = {
            k: data.get(k) for k in ("eval_loss", "baseline", "unigram_entropy", "final_loss") if k in data
        }
    result = {
        "machine": machine(),
        "returncode": proc.returncode,
        "wall_s": round(total, 1),
        "setup_s": round(setup_s, 1),
        "longest_silence_s": round(gap, 1),
        "silence_after": f"{gap_at:.1f} s: {gap_line[:120]}",
        "losses": losses,
        "folder": str(folder),
    }
    print(json.dumps(result, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
