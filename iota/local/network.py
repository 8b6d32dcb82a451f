"""The processes of `iota local`: each role an `iota <role>` subprocess, started, stopped and watched.

Wallets are created and registered on a file-backed LocalChain in the run directory, each role gets its
environment, and every process logs to run_dir/logs."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from iota.auth import create_wallet
from iota.chain.local import LocalChain
from iota.config import RunSettings
from iota.protocol import RunInfo, Status

LOCAL_DEFAULTS: dict[str, Any] = {
    # About five minutes on two CPU cores, set-up included: 3 stages x 2 miners, 5 epochs of the `tiny` preset
    # (122,880 tokens), which end below the corpus's unigram entropy and level with the one-process baseline
    # (docs/benchmarks.md, "The README's quick start").
    "preset": "tiny",
    "stages": 3,
    "epochs": 5,
    "samples_per_epoch": 48,
    "micro_batch": 4,
    "accumulate": 2,
    "lr": 3e-3,
    "warmup_tokens": 10_000,
    "total_tokens": 122_880,
    # Plain averaging: an epoch here is 12 inner steps a replica, and DiLoCo's Nesterov 0.7/0.9 (the run settings'
    # default, for hundreds of inner steps) overshoots after so few (held-out 7.29 against the baseline's 6.40 at 2
    # epochs; 6.25 with plain averaging).
    "outer_lr": 1.0,
    "outer_momentum": 0.0,
}


@dataclass
class LocalOptions:
    miners_per_stage: int = 2
    validators: int = 0
    run_dir: Path | None = None
    s3_endpoint: str | None = None
    baseline: bool = True
    port: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    miner_timeout_s: float = 20.0
    lease_s: float = 60.0
    max_in_flight: int = 8
    snapshot_rate: float | None = None  # IOTA_SNAPSHOT_RATE; None: the orchestrator's default
    progress: bool = True
    s3_access_key: str = "test"  # what a local S3-compatible server (moto, MinIO) accepts
    s3_secret_key: str = "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalNetwork:
    """The processes of one local run: wallets, chain and environments, then start, stop and watch each role.

    Tests drive it directly (kill a miner, restart the orchestrator); `run_local` runs it start to finish.
    """

    def __init__(self, options: LocalOptions):
        self.options = options
        run_dir = options.run_dir or Path("runs") / time.strftime("local-%Y%m%d-%H%M%S")
        self.run_dir = run_dir.resolve()
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        values = {**LOCAL_DEFAULTS, **options.overrides}
        values.setdefault("data_dir", str(Path("runs/data").resolve()))
        self.settings = RunSettings(**values)
        self.port = options.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

        wallets = self.run_dir / "wallets"
        # Weights may be set every 2 s here (the real chain's limit is far longer): runs on one machine are short.
        self.chain = LocalChain(self.run_dir / "chain.json", weights_rate_limit_s=2.0)
        self.orchestrator_hotkey = create_wallet(
            wallets, "orchestrator", "default", exist_ok=True
        ).hotkey.ss58_address
        self.operator = create_wallet(wallets, "operator", "default", exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("IOTA_")}
        self.common = {
            **base,
            "IOTA_CHAIN": "local",
            "IOTA_CHAIN_PATH": str(self.run_dir / "chain.json"),
            "IOTA_WALLET_PATH": str(wallets),
            "IOTA_WALLET_HOTKEY": "default",
            # CPU miners share the cores: spinning OpenMP workers would steal them from each other.
            "OMP_WAIT_POLICY": base.get("OMP_WAIT_POLICY", "PASSIVE"),
        }
        run_env = {f"IOTA_{k.upper()}": str(v) for k, v in self.settings.model_dump().items()}
        self.orch_env = {
            **self.common,
            **run_env,
            "IOTA_WALLET_NAME": "orchestrator",
            "IOTA_PORT": str(self.port),
            "IOTA_RUN_ID": "local",
            "IOTA_RUN_DIR": str(self.run_dir / "orchestrator"),
            # Fixed for the run, so URLs handed out before an orchestrator restart stay valid after it.
            "IOTA_URL_SECRET": secrets.token_hex(16),
            "IOTA_OPERATOR_HOTKEY": self.operator.hotkey.ss58_address,
            "IOTA_MINER_TIMEOUT_S": str(options.miner_timeout_s),
            "IOTA_LEASE_S": str(options.lease_s),
            "IOTA_MAX_IN_FLIGHT": str(options.max_in_flight),
            "IOTA_PHASE_TIMEOUT_S": "120",
        }
        if options.snapshot_rate is not None:
            self.orch_env["IOTA_SNAPSHOT_RATE"] = str(options.snapshot_rate)
        if options.s3_endpoint:
            self.orch_env.update(
                {
                    "IOTA_STORE": "s3",
                    "IOTA_S3_ENDPOINT": options.s3_endpoint,
                    "IOTA_S3_BUCKET": "iota",
                    "IOTA_S3_ACCESS_KEY": options.s3_access_key,
                    "IOTA_S3_SECRET_KEY": options.s3_secret_key,
                }
            )
            _ensure_bucket(options.s3_endpoint, "iota", self.orch_env)
        self.miner_names: list[str] = []

    # -- processes --------------------------------------------------------------------------------------

    def command(self, name: str, role: str) -> list[str]:
        """The command line of process `name` (bench/wan.py runs each role in a network namespace of its own)."""
        return [sys.executable, "-m", "iota", role]

    def _spawn(self, name: str, role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.run_dir / "logs" / f"{name}.log", "ab") as log:
            # cwd is the run directory: a developer's ./.env must not reach the processes of a local run.
            proc = subprocess.Popen(
                self.command(name, role),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
            )
        self.procs[name] = proc
        return proc

    def start_orchestrator(self, timeout_s: float = 300.0, watch: Callable[[], None] | None = None) -> None:
        """Start it and wait until it answers (it prepares the data first); `watch` is called while waiting."""
        self._spawn("orchestrator", "orchestrator", self.orch_env)
        deadline = time.monotonic() + timeout_s
        while self.status() is None:
            if watch is not None:
                watch()
            if self.procs["orchestrator"].poll() is not None:
                raise RuntimeError(
                    f"the orchestrator exited; see {self.run_dir / 'logs' / 'orchestrator.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the orchestrator did not answer within {timeout_s:.0f} s")
            time.sleep(0.3)

    def add_miner(self, name: str | None = None, threads: int = 1, adversary: str = "") -> str:
        """Create, register and start one miner; the orchestrator chooses its stage."""
        name = name or f"miner{len(self.miner_names)}"
        wallet = create_wallet(self.run_dir / "wallets", name, "default", exist_ok=True)
        self.chain.register(wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
        env = {
            **self.common,
            "IOTA_WALLET_NAME": name,
            "IOTA_ORCHESTRATOR_URL": self.url,
            "IOTA_ORCHESTRATOR_HOTKEY": self.orchestrator_hotkey,
            "IOTA_DEVICE": "cpu",
            "IOTA_THREADS": str(threads),
            "IOTA_MINER_DIR": str(self.run_dir / name),
            "IOTA_ADVERSARY": adversary,
        }
        self._spawn(name, "miner", env)
        if name not in self.miner_names:
            self.miner_names.append(name)
        return name

    def add_validator(
        self, name: str | None = None, weights_interval_s: float = 5.0, adversary: str = ""
    ) -> str:
        """Create a validator with a permit and stake on the local chain, and start it."""
        name = name or f"validator{sum(1 for n in self.procs if n.startswith('validator'))}"
        wallet = create_wallet(self.run_dir / "wallets", name, "default", exist_ok=True)
        self.chain.register(
            wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address, stake=1000.0, validator_permit=True
        )
        env = {
            **self.common,
            "IOTA_WALLET_NAME": name,
            "IOTA_ORCHESTRATOR_URL": self.url,
            "IOTA_ORCHESTRATOR_HOTKEY": self.orchestrator_hotkey,
            "IOTA_DEVICE": "cpu",
            "IOTA_WEIGHTS_INTERVAL_S": str(weights_interval_s),
            "IOTA_VALIDATOR_DIR": str(self.run_dir / name),
            "IOTA_ADVERSARY": adversary,
        }
        self._spawn(name, "validator", env)
        return name

    def signal(self, name: str, signum: int) -> None:
        self.procs[name].send_signal(signum)

    def stop(self, names: list[str] | None = None, timeout_s: float = 20.0) -> None:
        chosen = [n for n in (list(self.procs) if names is None else names) if self.procs[n].poll() is None]
        for name in chosen:
            self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in chosen:
            try:
                self.procs[name].wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs[name].kill()
                self.procs[name].wait()

    # -- watching ---------------------------------------------------------------------------------------

    def status(self) -> Status | None:
        try:
            return Status.model_validate_json(httpx.get(f"{self.url}/status", timeout=10).content)
        except (httpx.HTTPError, ValueError):
            return None

    def run_info(self) -> RunInfo:
        return RunInfo.model_validate_json(httpx.get(f"{self.url}/run", timeout=30).content)

    def log_tail(self, name: str) -> str:
        """The message of the last line process `name` logged (without loguru's time and place): what it is
        doing while it says nothing else."""
        path = self.run_dir / "logs" / f"{name}.log"
        with open(path, "rb") as log:
            log.seek(max(0, path.stat().st_size - 4096))
            lines = log.read().decode(errors="replace").splitlines()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return " ".join(last.split(" - ", 1)[-1].split())[:120]

    def hotkey(self, name: str) -> str:
        from iota.auth import load_hotkey

        return str(load_hotkey(self.run_dir / "wallets", name, "default").ss58_address)

    def scores_log(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/scores", timeout=30).json())

    def events(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/events", params={"limit": 1000}, timeout=10).json())

    def wait_until(
        self, predicate: Any, timeout_s: float, watch: Callable[[Status], None] | None = None
    ) -> Status:
        """Poll /status until predicate(status) holds; raise if the orchestrator dies or time runs out. `watch`
        sees every status polled (the progress of `iota local`)."""
        deadline, status = time.monotonic() + timeout_s, None
        while True:
            status = self.status() or status
            orch = self.procs.get("orchestrator")
            if orch is not None and orch.poll() is not None:
                raise RuntimeError(
                    f"the orchestrator exited; see {self.run_dir / 'logs' / 'orchestrator.log'}"
                )
            if status is not None and predicate(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"not reached within {timeout_s:.0f} s; last status: {status}")
            if watch is not None and status is not None:
                watch(status)
            time.sleep(0.5)


def _ensure_bucket(endpoint: str, bucket: str, env: dict[str, str]) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=env["IOTA_S3_ACCESS_KEY"],
        aws_secret_access_key=env["IOTA_S3_SECRET_KEY"],
    )
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
