"""A real orchestrator app (LocalStore, SQLite, LocalChain) on uvicorn in this process, and miners beside it."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from bittensor.keyfiles import Keypair

from iota.chain.local import LocalChain
from iota.client.orchestrator import OrchestratorClient
from iota.config import OrchestratorSettings
from iota.miner.main import MinerDaemon
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.service import Orchestrator
from iota.storage import LocalStore
from iota.train.worker import StageWorker
from tests.support import running_server


@dataclass
class Net:
    url: str
    orch: Orchestrator
    settings: OrchestratorSettings
    orchestrator_hotkey: str
    keys: list[Keypair]  # on the chain before the orchestrator started (it may cache the subnet's members)
    root: Path
    miners: list[MinerDaemon] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def miner(self, worker_factory: type[StageWorker] = StageWorker, depth: int = 1) -> MinerDaemon:
        """A miner with the next registered hotkey, `depth` requests and uploads in flight; not started."""
        key = self.keys[len(self.miners)]
        client = OrchestratorClient(self.url, key, self.orchestrator_hotkey, timeout_s=10, give_up_s=20)
        miner = MinerDaemon(
            client,
            torch.device("cpu"),
            use_autocast=False,
            cache_size=8,
            memory_bytes=1 << 34,
            cache_dir=self.root / f"miner{len(self.miners)}",
            worker_factory=worker_factory,
            depth=depth,
        )
        self.miners.append(miner)
        return miner

    def start(self, miner: MinerDaemon) -> None:
        """Run the miner's loop on a thread (the way `iota miner` runs it, less the signal handlers)."""
        thread = threading.Thread(target=miner.run_until_stopped, daemon=True)
        thread.start()
        self.threads.append(thread)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.orch.state.transaction():
            return list(self.orch.state.db.execute(sql, params))

    def join(self, timeout_s: float) -> None:
        for thread in self.threads:
            thread.join(timeout_s)
            assert not thread.is_alive(), "a miner did not finish"


@pytest.fixture
def make_net(data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Net]]:
    """Start an orchestrator for a 3-stage run of the `test` preset with these settings; stops miners after."""
    started: list[tuple[Net, Any]] = []

    def make(miners: int = 3, **overrides: Any) -> Net:
        fields: dict[str, Any] = {
            "preset": "test",
            "data_dir": data_dir,
            "run_dir": tmp_path / "run",
            "run_id": "run-test",
            "stages": 3,
            "epochs": 1,
            "lease_s": 60.0,
            "miner_timeout_s": 600.0,
            **overrides,
        }
        settings = OrchestratorSettings(_env_file=None, **fields)
        orchestrator_key = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
        chain = LocalChain(tmp_path / "chain.json")
        cold = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
        keys = [Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for _ in range(miners)]
        for key in keys:
            chain.register(key.ss58_address, cold.ss58_address)
        store = LocalStore(tmp_path / "run" / "store", "http://127.0.0.1:9/storage", secrets.token_bytes(32))
        assembled = assemble(settings, chain, orchestrator_key.ss58_address, store=store, local_store=store)
        server = running_server(assembled.app)
        url = server.__enter__()
        store.base_url = url + STORAGE_PREFIX  # the store's URLs name the port the server picked
        net = Net(url, assembled.orchestrator, settings, orchestrator_key.ss58_address, keys, tmp_path)
        started.append((net, server))
        return net

    yield make
    for net, server in started:
        for miner in net.miners:
            miner.state.stopping = True
        for thread in net.threads:
            thread.join(30)
        server.__exit__(None, None, None)
