"""Hostile clients cannot starve honest miners: a real orchestrator process under uvicorn with server_options, honest
miners doing register/work/upload/report cycles, and an attacker process that holds many connections sending
headers byte by byte (slowloris) while flooding valid signed requests from one registered hotkey. Every role has
its own loopback address, as it would have its own machine. The honest cycle rate under attack must stay within a
factor of the rate without it; the figures are printed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.auth import HotkeyAuth
from iota.chain.local import LocalChain
from iota.config import OrchestratorSettings
from iota.protocol import RegisterRequest, Report, Work, WorkRequest
from iota.storage.transfer import upload

pytestmark = pytest.mark.slow  # starts an orchestrator and an attacker process (~30 s)

HONEST = ("//Honest0", "//Honest1", "//Honest2")
FLOODER, ORCHESTRATOR, COLD = "//Flooder", "//Orchestrator", "//Cold"
MEASURE_S = 5.0
# Honest rate under attack >= baseline / FACTOR. Measured 1.7-1.9x on 2 shared cores, where the attacker's own
# process takes one core; uvicorn with limit_concurrency=256 and neither guard drops the honest rate to 0 (503s).
FACTOR = 3.0
SLOW_CONNECTIONS = 300
FLOOD_TASKS = 8

SERVER = """
import sys, json
from pathlib import Path
import uvicorn
from iota.chain.local import LocalChain
from iota.config import OrchestratorSettings
from iota.config import OrchestratorSettings
from iota.orchestrator.app import server_options
from iota.orchestrator.assembly import assemble
args = json.loads(sys.argv[1])
settings = OrchestratorSettings(_env_file=None, **args["settings"])
assembled = assemble(settings, LocalChain(args["chain"]), args["hotkey"])
uvicorn.run(assembled.app, **server_options(settings))
"""

ATTACKER = """
import asyncio, json, sys, time
import httpx
from bittensor.keyfiles import Keypair
from iota.auth import HotkeyAuth
url, host, port, flooder, orchestrator, slow, tasks, seconds = json.loads(sys.argv[1])
stats = {"slow_opened": 0, "slow_closed_by_server": 0, "flood": {}}
stop = time.monotonic() + seconds

async def slow_client():
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.50", 0))
        except OSError:
            await asyncio.sleep(0.1)
            continue
        stats["slow_opened"] += 1
        try:
            for byte in b"POST /miners/heartbeat HTTP/1.1\\r\\nHost: x\\r\\nX-Padding: " + b"a" * 10_000:
                writer.write(bytes([byte]))
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        stats["slow_closed_by_server"] += 1
                        await asyncio.sleep(0.5)  # then connect again
                        break
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() > stop:
                    break
        except (ConnectionError, OSError):
            stats["slow_closed_by_server"] += 1
        writer.close()

async def flood(client):
    while time.monotonic() < stop:
        try:
            response = await client.post("/miners/heartbeat")
            key = str(response.status_code)
        except httpx.HTTPError as error:
            key = type(error).__name__
        stats["flood"][key] = stats["flood"].get(key, 0) + 1

async def main():
    auth = HotkeyAuth(Keypair.create_from_uri(flooder), orchestrator)
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.60")
    limits = httpx.Limits(max_connections=tasks)
    async with httpx.AsyncClient(base_url=url, auth=auth, transport=transport, limits=limits, timeout=10) as client:
        join = {"device": "cpu", "memory_bytes": 2**34, "session": "flood"}  # a miner of the run: valid requests
        await client.post("/miners/register", json=join)
        await asyncio.gather(*[slow_client() for _ in range(slow)], *[flood(client) for _ in range(tasks)])

asyncio.run(main())
print(json.dumps(stats))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def repo_env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": str(root)}


@dataclass
class Orchestrator:
    url: str
    port: int
    hotkey: str


@pytest.fixture
def orchestrator(data_dir: Path, tmp_path: Path) -> Iterator[Orchestrator]:
    chain = LocalChain(tmp_path / "chain.json")
    cold = Keypair.create_from_uri(COLD).ss58_address
    for uri in (*HONEST, FLOODER):
        chain.register(Keypair.create_from_uri(uri).ss58_address, cold)
    port = free_port()
    hotkey = Keypair.create_from_uri(ORCHESTRATOR).ss58_address
    settings = {
        "preset": "test",
        "data_dir": str(data_dir),
        "run_dir": str(tmp_path / "run"),
        "run_id": "run-starve",
        "stages": 1,  # every miner is head and tail: a cycle is /work, an upload and a report with the loss
        "micro_batch": 2,
        "samples_per_epoch": 10**6,
        "epochs": 1,
        "wire_dtype": "fp32",
        "lease_s": 60.0,
        "miner_timeout_s": 600.0,
        "port": port,
        "public_url": f"http://127.0.0.1:{port}",
    }
    args = json.dumps({"settings": settings, "chain": str(tmp_path / "chain.json"), "hotkey": hotkey})
    server = subprocess.Popen([sys.executable, "-c", SERVER, args], env=repo_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/run", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the orchestrator did not start"
            time.sleep(0.2)
        yield Orchestrator(url, port, hotkey)
    finally:
        server.terminate()
        server.wait(timeout=10)


class HonestMiner(threading.Thread):
    """Work, upload, report, as fast as the orchestrator answers; each from its own loopback address."""

    def __init__(self, orch: Orchestrator, uri: str, address: str) -> None:
        super().__init__(daemon=True)
        self.cycles = 0
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        auth = HotkeyAuth(Keypair.create_from_uri(uri), orch.hotkey)
        self.api = httpx.Client(base_url=orch.url, auth=auth, transport=self.transport(address), timeout=10)
        self.bucket = httpx.Client(transport=self.transport(address), timeout=10)

    @staticmethod
    def transport(address: str) -> httpx.HTTPTransport:
        return httpx.HTTPTransport(local_address=address)

    def post(self, path: str, body: str = "") -> httpx.Response:
        while True:
            response = self.api.post(path, content=body, headers={"content-type": "application/json"})
            if response.status_code not in (429, 503):
                response.raise_for_status()
                return response
            self.errors[str(response.status_code)] += 1
            time.sleep(float(response.headers.get("retry-after", "0.05")))

    def run(self) -> None:
        request = RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
        self.post("/miners/register", request.model_dump_json())
        while not self.stop.is_set():
            try:
                self.cycle()
            except httpx.HTTPStatusError as error:
                self.errors[f"{error.response.status_code} {error.response.text[:120]}"] += 1
            except httpx.HTTPError as error:
                self.errors[type(error).__name__] += 1

    def cycle(self) -> None:
        work = Work.model_validate_json(self.post("/work", WorkRequest().model_dump_json()).content)
        if work.kind != "forward" or not work.output_url or not work.output_size:
            time.sleep(work.wait_s)
            return
        out = bytes(work.output_size)
        upload(work.output_url, out, client=self.bucket)
        report = Report(
            run_id=work.run_id,
            epoch=work.epoch,
            hop_id=work.hop_id or 0,
            inner_step=0,
            input_sha256=None,
            output_sha256=_sha256(out),
            output_md5=None,
            loss=1.0,
        )
        self.post(f"/work/{work.hop_id}/report", report.model_dump_json())
        self.cycles += 1


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def honest_rate(miners: list[HonestMiner], seconds: float) -> float:
    start = sum(m.cycles for m in miners)
    time.sleep(seconds)
    return (sum(m.cycles for m in miners) - start) / seconds


def test_honest_miners_keep_their_rate_under_slowloris_and_a_signed_flood(orchestrator: Orchestrator) -> None:
    miners = [HonestMiner(orchestrator, uri, f"127.0.0.{2 + i}") for i, uri in enumerate(HONEST)]
    for miner in miners:
        miner.start()
    try:
        time.sleep(1.0)  # registered and warm
        baseline = honest_rate(miners, MEASURE_S)
        attack_s = MEASURE_S + 4.0
        spec = [orchestrator.url, "127.0.0.1", orchestrator.port, FLOODER, orchestrator.hotkey]
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, json.dumps([*spec, SLOW_CONNECTIONS, FLOOD_TASKS, attack_s])],
            env=repo_env(),
            stdout=subprocess.PIPE,
        )
        time.sleep(3.0)  # the attacker is up (imports) and its connections are open
        under_attack = honest_rate(miners, MEASURE_S)
        output, _ = attacker.communicate(timeout=60)
    finally:
        for miner in miners:
            miner.stop.set()
        for miner in miners:
            miner.join(timeout=15)
    stats = json.loads(output.decode().strip().splitlines()[-1])
    errors = sum((m.errors for m in miners), Counter())
    print(
        f"honest cycles/s: {baseline:.1f} without attack, {under_attack:.1f} under attack; honest retries {dict(errors)}; "
        f"attacker: {stats}"
    )
    assert baseline > 0
    assert under_attack >= baseline / FACTOR
    flood = stats["flood"]
    # The flood got no more than its hotkey's rate limit allows (defaults: 200 requests/s, a burst of 400); how much
    # of it was refused depends on how fast the attacker could send on a loaded machine, so that is not asserted.
    rate = OrchestratorSettings.model_fields["rate_per_hotkey"].default
    assert flood.get("200", 0) <= 1.1 * (rate * attack_s + 2 * rate), flood
    assert (
        stats["slow_opened"] >= SLOW_CONNECTIONS and stats["slow_closed_by_server"] >= SLOW_CONNECTIONS // 2
    )
