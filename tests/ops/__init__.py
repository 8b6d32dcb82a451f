"""Operations tests: a real orchestrator and miners as `iota <role>` processes, driven the way an operator does.

`OpsNet` wires a network like `iota local` does (wallets and a LocalChain in a temporary folder, each role a
subprocess with IOTA_* settings), but starts each piece on demand so a test can run one miner under PM2.
`tool()` finds a command-line tool the tests need, installing it (npm, apt) when it is missing, as CI starts
from a fresh machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import pytest

from iota.auth import create_wallet, load_hotkey
from iota.chain.local import LocalChain
from iota.client.orchestrator import OrchestratorClient
from iota.config import MinerSettings
from iota.protocol import Ack, Status

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(tempfile.gettempdir()) / "iota-test-tools"  # kept between runs: npm installs once per machine
T = TypeVar("T")

# A run that does not end by itself (epochs 0) on the smallest preset: the tests stop it.
RUN = {
    "IOTA_PRESET": "test",
    "IOTA_STAGES": "3",
    "IOTA_EPOCHS": "0",
    "IOTA_SAMPLES_PER_EPOCH": "100000",
    "IOTA_MICRO_BATCH": "2",
    "IOTA_MAX_IN_FLIGHT": "4",
    "IOTA_LEASE_S": "60",
    "IOTA_MINER_TIMEOUT_S": "60",
}


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float = 60.0, every_s: float = 0.25) -> T:
    """Poll `check` until it returns something other than None/False; fail the test with `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pm2_command() -> list[str]:
    """pm2 from PATH, else installed from npm into a cached prefix (CI starts without it)."""
    found = shutil.which("pm2")
    if found:
        return [found]
    local = TOOLS / "npm" / "node_modules" / ".bin" / "pm2"
    if not local.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("pm2 is not installed and there is no npm to install it with (needs node >= 16)")
        (TOOLS / "npm").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--prefix", str(TOOLS / "npm"), "--no-audit", "--no-fund", "pm2"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return [str(local)]


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installed from Debian's packages when missing (the tests run as root in CI)."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(
            "chromium and chromedriver are missing; install them: apt-get install chromium chromium-driver"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, capture_output=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
        check=True,
        capture_output=True,
        env=env,
        timeout=900,
    )
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "apt-get installed chromium but it is not on PATH"
    return browser, driver


class OpsNet:
    """Wallets, a LocalChain and the orchestrator of one test run in `root`; miners start on demand."""

    def __init__(self, root: Path, data_dir: Path, miners: int, run: dict[str, str] | None = None):
        self.root = root
        self.data_dir = data_dir
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wallets = root / "wallets"
        self.chain = LocalChain(root / "chain.json")
        self.orchestrator_hotkey = create_wallet(self.wallets, "orchestrator", "default").hotkey.ss58_address
        self.operator_hotkey = create_wallet(self.wallets, "operator", "default").hotkey.ss58_address
        # One wallet with a hotkey per miner, as an operator with several GPUs has: m0, m1, ...
        self.hotkeys: dict[str, str] = {}
        for i in range(miners):
            wallet = create_wallet(self.wallets, "miners", f"m{i}")
            self.chain.register(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
            self.hotkeys[f"m{i}"] = wallet.hotkey.ss58_address
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run = {**RUN, **(run or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Settings from the environment only: no .env of the developer's checkout leaks into the test.
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}

    # -- processes --------------------------------------------------------------------------------------

    def _spawn(self, name: str, role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "iota", role],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        self.procs[name] = proc
        return proc

    def start_orchestrator(self) -> None:
        env = {
            **self.base_env,
            **self.run,
            "IOTA_CHAIN": "local",
            "IOTA_CHAIN_PATH": str(self.root / "chain.json"),
            "IOTA_WALLET_PATH": str(self.wallets),
            "IOTA_WALLET_NAME": "orchestrator",
            "IOTA_WALLET_HOTKEY": "default",
            "IOTA_PORT": str(self.port),
            "IOTA_RUN_ID": "ops",
            "IOTA_RUN_DIR": str(self.root / "orchestrator"),
            "IOTA_DATA_DIR": str(self.data_dir),
            "IOTA_OPERATOR_HOTKEY": self.operator_hotkey,
        }
        proc = self._spawn("orchestrator", "orchestrator", env)

        def ready() -> Status | None:
            if proc.poll() is not None:
                pytest.fail(f"the orchestrator exited:\n{self.log('orchestrator')[-3000:]}")
            return self.try_status()

        wait_for("the orchestrator to answer GET /status", ready, timeout_s=240, every_s=0.5)

    def miner_env(self, name: str) -> dict[str, str]:
        """The environment of miner `name` (m0, m1, ...), every setting spelled out.

        So nothing comes from a .env in the working directory (PM2 runs the miner in the repository).
        """
        defaults = {f"IOTA_{k.upper()}": str(f.default) for k, f in MinerSettings.model_fields.items()}
        return {
            **self.base_env,
            **defaults,
            "IOTA_CHAIN": "local",
            "IOTA_CHAIN_PATH": str(self.root / "chain.json"),
            "IOTA_WALLET_PATH": str(self.wallets),
            "IOTA_WALLET_NAME": "miners",
            "IOTA_WALLET_HOTKEY": name,
            "IOTA_ORCHESTRATOR_URL": self.url,
            "IOTA_ORCHESTRATOR_HOTKEY": self.orchestrator_hotkey,
            "IOTA_DEVICE": "cpu",
            "IOTA_AUTOCAST": "false",
            "IOTA_THREADS": "1",
            "IOTA_MINER_DIR": str(self.root / name),
        }

    def start_miner(self, name: str) -> subprocess.Popen[bytes]:
        return self._spawn(name, "miner", self.miner_env(name))

    def stop(self) -> None:
        """Miners first, while the orchestrator can still hear their goodbyes; then the orchestrator."""
        miners = [p for name, p in self.procs.items() if name != "orchestrator"]
        for group in (miners, [p for name, p in self.procs.items() if name == "orchestrator"]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the orchestrator's HTTP face -------------------------------------------------------------------

    def try_status(self) -> Status | None:
        try:
            return Status.model_validate_json(httpx.get(f"{self.url}/status", timeout=5).content)
        except (httpx.HTTPError, ValueError):
            return None

    def status(self) -> Status:
        status = self.try_status()
        assert status is not None, f"GET {self.url}/status failed"
        return status

    def status_json(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/status", timeout=5).json())

    def events(self, kind: str | None = None, hotkey: str | None = None) -> list[dict[str, Any]]:
        """GET /events, newest first, filtered by kind and hotkey."""
        events = httpx.get(f"{self.url}/events", params={"limit": 1000}, timeout=5).json()
        return [
            e
            for e in events
            if (kind is None or e["kind"] == kind) and (hotkey is None or e["hotkey"] == hotkey)
        ]

    def miner_stage(self, hotkey: str) -> int | None:
        status = self.try_status()
        if status is None:
            return None
        return next(
            (m.stage for st in status.stages for m in st.miners if m.hotkey == hotkey and m.alive), None
        )

    def operate(self, action: str, target: str = "", value: str = "") -> Ack:
        """POST /operator/{action}, signed by the run's operator key (btauth/1), as `iota run` does."""
        keypair = load_hotkey(self.wallets, "operator", "default")
        client = OrchestratorClient(self.url, keypair, self.orchestrator_hotkey, give_up_s=20)
        try:
            return client.call("POST", f"/operator/{action}", Ack, params={"target": target, "value": value})
        finally:
            client.close()


def multi_gpu() -> ModuleType:
    """pm2/multi_gpu.py as a module (it is a script, not part of the iota package)."""
    spec = importlib.util.spec_from_file_location("multi_gpu", REPO / "pm2" / "multi_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pm2_jlist(pm2: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [*pm2, "jlist"], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    # The JSON is one line; a first start of the daemon prints a banner (with "[PM2]" lines) before it.
    lines = [line for line in out.splitlines() if line.startswith("[{") or line == "[]"]
    assert lines, f"pm2 jlist printed no process list:\n{out}"
    return list(json.loads(lines[-1]))
