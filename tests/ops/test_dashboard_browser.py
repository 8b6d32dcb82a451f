"""The dashboard at GET / in a real headless Chromium: its figures are GET /status's, it follows the run, it has a
row per miner and a loss chart with axes, and it warns when /status stops answering.

Chromium and chromedriver come from Debian's packages (installed by the test when missing); selenium drives them.
UPDATE_SCREENSHOTS=1 also writes the screenshot taken while miners train to docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ops import REPO, OpsNet, chromium_paths, wait_for

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is in the dev extra: bash setup.sh dev"
)
from selenium.webdriver.chrome.service import Service  # noqa: E402

pytestmark = pytest.mark.slow

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1100,720",
]
FOLLOW_S = 5.0  # the page polls /status every second; it must show a change within a few


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    binary, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    # An explicit driver path: selenium never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver: Any) -> dict[str, Any]:
    """What the page shows: the headline figures, the cells of the stages and miners tables, and the loss chart's
    axes, as rendered text.

    Read in one script, between two of the page's refreshes (each replaces the tables' rows).
    """
    return dict(
        driver.execute_script(
            """
            const text = (id) => document.getElementById(id).innerText.trim();
            const cells = (table) => [...document.querySelectorAll(`#${table} tbody tr`)].map(
                (r) => [...r.querySelectorAll('td')].map((td) => td.innerText.trim()));
            const axis = (which) => ({
                ticks: [...document.querySelectorAll(`#loss .axis.${which} text.tick`)].map((t) => t.textContent),
                label: document.querySelector(`#loss .axis.${which} text.label`)?.textContent ?? null});
            return {run: text('run'), epoch: text('epoch'), phase: text('phase'), tokens: text('tokens'),
                    lost: text('lost'), stale: document.body.classList.contains('is-stale'),
                    warning: text('stale'), stages: cells('stages'),
                    miners: [...document.querySelectorAll('#miners tbody tr[data-hotkey]')].map(
                        (r) => [r.dataset.hotkey, ...[...r.querySelectorAll('td')].map((td) => td.innerText.trim())]),
                    x: axis('x'), y: axis('y'), points: (document.querySelector('#loss path.series')
                        ?.getAttribute('d') ?? '').split(/[ML]/).filter(Boolean).length};
            """
        )
    )


def shown_if(driver: Any, key: str, at_least: Any) -> dict[str, Any] | None:
    """What the page shows, once its ``key`` has reached ``at_least`` (None before)."""
    page = shown(driver)
    return page if page[key] >= at_least else None


def expected_rows(status: dict[str, Any]) -> list[list[str]]:
    """The stages table as GET /status says it should read."""
    return [
        [
            str(st["index"]),
            f"{len(st['miners'])} ({sum(m['alive'] for m in st['miners'])})",
            str(sum(m["hops_done"] for m in st["miners"])),
            str(st["queued_forward"]),
            str(st["queued_backward"]),
            str(st["leased"]),
        ]
        for st in status["stages"]
    ]


def expected_miners(status: dict[str, Any]) -> list[list[str]]:
    """Per miner as GET /status says: hotkey, stage, state and hops done (the columns the page takes from it)."""
    miners = sorted(
        (m for st in status["stages"] for m in st["miners"]), key=lambda m: (m["stage"], m["hotkey"])
    )
    return [
        [m["hotkey"], str(m["stage"]), "alive" if m["alive"] else "gone", str(m["hops_done"])] for m in miners
    ]


def page_miners(page: dict[str, Any]) -> list[list[str]]:
    """The same columns of the page's miners table (hotkey, uid, stage, device, state, hops done, ...)."""
    return [[row[0], row[3], row[5], row[6]] for row in page["miners"]]


def test_dashboard_shows_status_and_follows_the_run(tmp_path: Path, browser: Any) -> None:
    net = OpsNet(tmp_path / "net", tmp_path / "data", miners=3)
    net.start_orchestrator()
    try:
        browser.get(net.url + "/")
        wait_for("the page to show the run", lambda: shown(browser)["run"] == "ops", FOLLOW_S)

        # Nothing moves yet (no miners): every figure must equal GET /status's exactly.
        status = net.status_json()
        page = shown(browser)
        assert page["epoch"] == str(status["epoch"]) == "0"
        assert page["phase"] == status["phase"] == "train"
        assert page["tokens"] == str(status["tokens_trained"]) == "0"
        assert page["lost"] == str(status["samples_lost"])
        assert page["stages"] == expected_rows(status)
        assert len(page["stages"]) == 3 and page["stages"][0][1] == "0 (0)"
        assert page["miners"] == [] and not page["stale"]

        # The operator pauses the run (a signed POST /operator/pause): the phase says so within a few seconds.
        net.operate("pause")
        assert net.status_json()["paused"] is True
        wait_for("the page to show the pause", lambda: shown(browser)["phase"] == "train (paused)", FOLLOW_S)
        net.operate("resume")
        wait_for("the page to show the resume", lambda: shown(browser)["phase"] == "train", FOLLOW_S)

        # Miners join and train: the stages and miners tables and the tokens follow.
        for name in net.hotkeys:
            net.start_miner(name)
        wait_for("tokens to be trained", lambda: net.status_json()["tokens_trained"] > 0, timeout_s=180)
        wait_for(
            "the page to show every miner alive",
            lambda: [row[1] for row in shown(browser)["stages"]] == ["1 (1)"] * 3,
            FOLLOW_S,
        )
        wait_for(
            "a row per miner with its stage and state",
            lambda: (
                [row[:3] for row in page_miners(shown(browser))]
                == [row[:3] for row in expected_miners(net.status_json())]
            ),
            FOLLOW_S,
        )
        assert sorted(row[0] for row in page_miners(shown(browser))) == sorted(net.hotkeys.values())
        before = net.status_json()["tokens_trained"]
        page_tokens = wait_for(
            "the page to show the tokens trained",
            lambda: (n := int(shown(browser)["tokens"])) >= before and n,
            FOLLOW_S,
        )
        assert page_tokens <= net.status_json()["tokens_trained"]  # read between two /status: never ahead

        # The loss chart has both axes, with their titles and numbered ticks.
        wait_for("a loss curve to draw", lambda: len(net.status_json()["loss_curve"]) >= 8, timeout_s=120)
        page = wait_for("the loss chart with its axes", lambda: shown_if(browser, "points", 8), FOLLOW_S)
        assert len(page["x"]["ticks"]) >= 2
        assert page["x"]["label"] == "tokens trained" and page["y"]["label"] == "loss"
        y_ticks = [float(t) for t in page["y"]["ticks"]]
        assert len(y_ticks) >= 2 and y_ticks == sorted(y_ticks) and len(set(y_ticks)) == len(y_ticks)
        # Scores and audits (GET /dashboard/data, every 5 s) fill the miners' rows.
        wait_for("scores on the miners' rows", lambda: all(r[8] != "-" for r in shown(browser)["miners"]), 15)

        # The whole page, for docs/dashboard.png.
        browser.set_window_size(1280, 1000)
        missing = browser.execute_script("return document.documentElement.scrollHeight - window.innerHeight")
        browser.set_window_size(1280, min(1000 + max(missing, 0) + 16, 4000))
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
        if os.environ.get("UPDATE_SCREENSHOTS") == "1":
            shutil.copy(shot, REPO / "docs" / "dashboard.png")

        # Paused, the run comes to rest (leased items finish, nothing new is handed out) and the page settles on
        # GET /status exactly again, the stages and miners tables included.
        net.operate("pause")

        def agree() -> bool:
            status = net.status_json()
            page = shown(browser)
            return (
                page["phase"] == "train (paused)"
                and page["tokens"] == str(status["tokens_trained"])
                and page["stages"] == expected_rows(status)
                and page_miners(page) == expected_miners(status)
            )

        wait_for("the paused run and the page to agree", agree, timeout_s=60, every_s=0.5)
        tokens = net.status_json()["tokens_trained"]
    finally:
        net.stop()

    # The orchestrator is gone: the page says its figures are stale instead of showing them as current.
    page = wait_for("the stale-data warning", lambda: shown_if(browser, "stale", True), timeout_s=20)
    assert "/status has not answered for" in page["warning"] and page["tokens"] == str(tokens)
