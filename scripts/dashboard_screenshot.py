"""Take docs/dashboard.png: a local run (three stages with a miner each, two validators) in headless Chromium,
once the first epoch has ended (phases, a checkpoint) and validators have sent verdicts.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png] [--timeout-s 900]

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium (the dev extra).
tests/ops/test_dashboard_browser.py checks the same page against GET /status; this only pictures a fuller run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from iota.local.network import LocalNetwork, LocalOptions
from iota.protocol import Status

STAGES = 3
RUN = {"preset": "test", "stages": STAGES, "epochs": 0, "samples_per_epoch": 12, "micro_batch": 2}
WIDTH = 1280


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    browser_path, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser_path or not driver_path:
        print(
            "chromium and chromedriver are missing: apt-get install chromium chromium-driver", file=sys.stderr
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        options = LocalOptions(
            miners_per_stage=1, validators=2, run_dir=Path(tmp) / "run", baseline=False, overrides=RUN
        )
        net = LocalNetwork(options)
        try:
            net.start_orchestrator()
            for _ in range(STAGES):
                net.add_miner()
            for _ in range(options.validators):
                net.add_validator()
            print(f"local run at {net.url}; waiting for the first checkpoint after training and for verdicts")

            def ready(status: Status) -> bool:
                return status.epoch >= 1 and len(net.scores_log().get("verdicts", [])) >= 2

            net.wait_until(ready, args.timeout_s)
            time.sleep(12)  # tokens/s over a few polls and the page's 5 s details: what a watcher sees
            shoot(net.url, args.out, browser_path, driver_path, Path(tmp) / "chromium")
        finally:
            net.stop()
    print(f"wrote {args.out}")
    return 0


def shoot(url: str, out: Path, browser_path: str, driver_path: str, profile: Path) -> None:
    """The whole page, as tall as it is, after it has polled for a while."""
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDTH},1000")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.get(url + "/")
        time.sleep(40)  # the rates and the tokens/s chart need the page's own history of /status
        missing = driver.execute_script("return document.documentElement.scrollHeight - window.innerHeight")
        driver.set_window_size(WIDTH, 1000 + max(int(missing), 0) + 16)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


if __name__ == "__main__":
    raise SystemExit(main())
