"""PM2 runs a miner through start_miner.sh: kill -9 is survived without losing a sample, `pm2 stop` says goodbye.

A real orchestrator and one miner per stage: m0 (stage 0, the head) under PM2 with pm2/miner.config.js, m1 and m2
as plain subprocesses. The head holds the forward graph of every sample in flight, so killing it is the case
where most work is open.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iota.protocol import Status
from tests.ops import REPO, OpsNet, multi_gpu, pm2_command, pm2_jlist, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def test_generated_ecosystem_runs_one_miner_per_gpu_and_hotkey(tmp_path: Path) -> None:
    out = tmp_path / "miners.config.js"
    subprocess.run(
        [sys.executable, str(REPO / "pm2" / "multi_gpu.py"), "write", "--hotkeys", "h0,h1,h2"]
        + ["--gpus", "0,2,3", "--wallet-name", "rig", "--health-port-base", "9100", "--out", str(out)],
        check=True,
        capture_output=True,
    )
    apps = multi_gpu().read_apps(out)  # as PM2 reads it: node evaluates the file
    assert [a["name"] for a in apps] == ["miner-h0", "miner-h1", "miner-h2"]
    envs = [a["env"] for a in apps]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "2", "3"]  # type: ignore[index]
    assert [e["IOTA_WALLET_HOTKEY"] for e in envs] == ["h0", "h1", "h2"]  # type: ignore[index]
    assert {e["IOTA_WALLET_NAME"] for e in envs} == {"rig"}  # type: ignore[index]
    assert [e["IOTA_HEALTH_PORT"] for e in envs] == ["9100", "9101", "9102"]  # type: ignore[index]
    assert len({e["IOTA_MINER_DIR"] for e in envs}) == 3  # type: ignore[index]
    for app in apps:  # each is the miner of pm2/miner.config.js: same script, stop signal and kill timeout
        assert app["script"] == str(REPO / "start_miner.sh")
        assert app["kill_signal"] == "SIGINT" and app["kill_timeout"] == 120000
        assert str(app["out_file"]).endswith(f"{app['name']}.out.log")
    refused = subprocess.run(
        [sys.executable, str(REPO / "pm2" / "multi_gpu.py"), "write", "--hotkeys", "h0,h1", "--gpus", "0"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "2 hotkeys need 2 GPUs" in refused.stderr


def test_pm2_restarts_a_killed_miner_and_stop_releases_its_work(tmp_path: Path, data_dir: Path) -> None:
    if not (REPO / ".venv" / "bin" / "iota").exists():
        pytest.fail("start_miner.sh runs .venv/bin/iota: run `bash setup.sh dev` first")
    pm2 = pm2_command()
    net = OpsNet(tmp_path, data_dir, miners=3)
    head = net.hotkeys["m0"]
    pm2_env = {
        **net.miner_env("m0"),
        "PM2_HOME": str(tmp_path / "pm2"),  # a PM2 daemon of this test's own
        "IOTA_LOG_DIR": str(net.logs),
        "IOTA_SKIP_SETUP": "1",  # the checkout's .venv is set up already (dev includes every role's packages)
    }

    def pm2_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*pm2, *args], env=pm2_env, capture_output=True, text=True, check=True, timeout=180
        )

    def miner_app() -> dict:
        return next(a for a in pm2_jlist(pm2, pm2_env) if a["name"] == "miner")

    net.start_orchestrator()
    try:
        pm2_run("start", str(REPO / "pm2" / "miner.config.js"))
        wait_for("the PM2 miner to register", lambda: net.miner_stage(head) == 0, timeout_s=120)
        net.start_miner("m1")
        net.start_miner("m2")
        wait_for("every stage to have its miner", lambda: all(st.miners for st in net.status().stages), 120)

        # kill -9 while the head holds open work: PM2 restarts it, it registers with a new session. Work past the
        # head's forward means the head holds that sample's graph (it is stage 0's only miner), so the sample can
        # only restart; a sample that is only queued at the head has nothing to restart. The pid is read first so
        # that the kill follows the status that saw such work at once.
        first = miner_app()

        def training() -> Status | None:
            status = net.status()
            s0, *rest = status.stages
            past_head = s0.queued_backward + sum(
                st.queued_forward + st.queued_backward + st.leased for st in rest
            )
            return status if status.samples_completed >= 2 and past_head > 0 else None

        busy = wait_for("training with work past the head", training, timeout_s=120, every_s=0.05)
        os.kill(first["pid"], signal.SIGKILL)
        restarted = wait_for(
            "PM2 to restart the killed miner",
            lambda: (
                (a := miner_app())["pm2_env"]["restart_time"] >= 1
                and a["pm2_env"]["status"] == "online"
                and a["pid"] not in (0, first["pid"])
                and a
            ),
            timeout_s=60,
        )
        wait_for("the miner to register again", lambda: len(net.events("register", head)) >= 2, timeout_s=120)
        gone = net.events("miner_gone", head)
        assert [e["why"] for e in gone] == ["re-registered with a new session"]
        after = net.status()
        assert after.samples_requeued >= 1, "the samples waiting on the killed head were not restarted"
        assert after.samples_lost == 0
        assert net.miner_stage(head) == 0, "the restarted miner keeps its stage"
        # Training goes on through the restarted miner: samples complete again, none lost.
        wait_for(
            "samples to complete after the restart",
            lambda: net.status().samples_completed >= after.samples_completed + 2,
            timeout_s=120,
        )
        assert busy.samples_completed < net.status().samples_completed

        # One status for all the miners of a multi-GPU host (here one wallet, hotkeys m0..m2, on the CPU).
        config = tmp_path / "miners.config.js"
        subprocess.run(
            [sys.executable, str(REPO / "pm2" / "multi_gpu.py"), "write", "--hotkeys", "m0,m1,m2"]
            + ["--wallet-name", "miners", "--device", "cpu", "--out", str(config)],
            check=True,
            capture_output=True,
        )
        shown = subprocess.run(
            [sys.executable, str(REPO / "pm2" / "multi_gpu.py"), "status", str(config)],
            env={**net.miner_env("m0"), "IOTA_LOG_DIR": str(net.logs)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        blocks = {b.split(" ", 1)[0]: b for b in shown.stdout.split("== miner-")[1:]}
        assert sorted(blocks) == ["m0", "m1", "m2"]
        for name, block in blocks.items():
            assert net.hotkeys[name] in block
            assert f"stage       {net.miner_stage(net.hotkeys[name])}\n" in block

        # pm2 stop: SIGINT, the miner finishes its step, releases its work and leaves (well before SIGKILL).
        started = time.monotonic()
        pm2_run("stop", "miner")
        took = time.monotonic() - started
        assert miner_app()["pm2_env"]["status"] == "stopped"
        left = wait_for(
            "the left event", lambda: net.events("miner_gone", head)[0]["why"].startswith("left"), 10
        )
        assert left
        assert net.events("miner_gone", head)[0]["why"] == "left (stopped by its operator)"
        assert took < 60, f"pm2 stop took {took:.0f} s: the miner did not exit on SIGINT"
        pm2_log = (net.logs / "miner.err.log").read_text() + (net.logs / "miner.out.log").read_text()
        assert "signal 2: finishing the current step" in pm2_log  # the stop reached python, not only bash
        final = net.status()
        assert final.samples_lost == 0
        assert not any(m.alive for m in final.stages[0].miners), "the stopped head still counts as alive"
        assert restarted["pid"] != first["pid"]
    finally:
        subprocess.run([*pm2, "kill"], env=pm2_env, capture_output=True, timeout=120)
        net.stop()
