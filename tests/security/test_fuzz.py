"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), every case signed by a registered miner or the
operator so that it gets past authentication into the handlers: no 5xx, and a refused case changes no state.

The share of cases that reached a handler is measured by a recorder around the orchestrator (a handler calls one
of its methods) and printed; the test holds it at 80% or more. The strike policy is set out of reach here, so that
the fuzzing miner is never throttled or banned (that policy has its own tests).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from bittensor.keyfiles import Keypair
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from iota.auth import HotkeyAuth
from iota.orchestrator.abuse import AbuseConfig, AbusePolicy
from iota.orchestrator.app import STORAGE_PREFIX
from iota.protocol import RegisterRequest
from tests.security import TABLES, Net, serve_net

EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 10}  # per operation: ~30 s on 2 cores
AUTH_STATUSES = {401, 426, 429}  # and 403 with an X-Iota-Auth-Error code: refused before any handler


class Recorder:
    """Stands in for the orchestrator behind the app and notes whether a handler used it for this request."""

    BOOKKEEPING = frozenset({"abuse", "clock"})  # also read by the 422 handler, which is not a route handler

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.used = False

    def __getattr__(self, name: str) -> Any:
        if name not in self.BOOKKEEPING:
            self.used = True
        return getattr(self._inner, name)


@dataclass
class Tally:
    cases: int = 0
    past_auth: int = 0
    handled: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    # No lease expires while fuzzing; a fuzzed request for work is held briefly, not for up to its hold_s.
    limits = {"rate_per_hotkey": 1e6, "rate_per_ip": 1e6, "lease_s": 600.0, "max_hold_s": 0.2}
    with serve_net(data_dir, keypairs, tmp_path, **limits) as net:
        net.orch.abuse = AbusePolicy(
            net.orch.state,
            net.orch.scheduler,
            AbuseConfig(throttle_at=10**9, ban_at=10**9),
            exempt=[keypairs["operator"].ss58_address],
        )
        yield net


def state_of(net: Net) -> dict[str, list[tuple[Any, ...]]]:
    db = net.orch.state.db
    return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}  # noqa: S608


def signer_of(path: str) -> str:
    if path.startswith("/operator/"):
        return "operator"
    return "validator" if path.startswith("/validators/") else "head"


def send(client: httpx.Client, kwargs: dict[str, Any]) -> httpx.Response:
    """A schemathesis case (requests-style keyword arguments) sent through httpx, which the auth signs."""
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() not in ("connection",)}
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        body["content"] = kwargs["data"]
    return client.request(
        kwargs["method"],
        kwargs["url"],
        headers=headers,
        params=kwargs.get("params") or None,
        cookies=kwargs.get("cookies") or None,
        **body,
    )


def fuzz_operation(
    operation: Any, mode: GenerationMode, examples: int, check: Callable[[schemathesis.Case], None]
) -> None:
    """`examples` cases of one operation in one generation mode; failures are collected by `check`, not shrunk."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        check(case)

    try:
        fuzz()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # an operation without parameters has no invalid input


def test_fuzzed_api_never_fails_and_refusals_change_nothing(net: Net) -> None:
    recorder = Recorder(net.app.state.orchestrator)
    net.app.state.orchestrator = recorder
    net.join("head")  # a miner of the run, so that its calls get past "register first"
    schema = schemathesis.openapi.from_dict(httpx.get(f"{net.url}/openapi.json").json())
    orchestrator_hotkey = net.keys["orchestrator"].ss58_address
    clients = {
        name: httpx.Client(base_url=net.url, auth=HotkeyAuth(net.keys[name], orchestrator_hotkey), timeout=10)
        for name in ("head", "validator", "operator")
    }
    tallies = {mode: Tally() for mode in EXAMPLES}
    storage = Tally()
    plain = httpx.Client(base_url=net.url, timeout=10)

    head = net.keys["head"].ss58_address

    def check(case: schemathesis.Case, tally: Tally) -> None:
        kwargs = case.as_transport_kwargs(base_url=net.url)
        miner = net.orch.state.miner(head)
        if miner is None or not miner.alive:  # a fuzzed /miners/leave: back, so the next case goes deep
            net.orch.register(
                head, RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
            )
        before = state_of(net)
        recorder.used = False
        client = (
            plain
            if case.operation.path.startswith(STORAGE_PREFIX)
            else clients[signer_of(case.formatted_path)]
        )
        try:
            response = send(client, kwargs)
        except httpx.HTTPError as error:
            tally.failures.append(f"{case.operation.label}: {type(error).__name__} {error} for {kwargs}")
            return
        status = response.status_code
        tally.cases += 1
        tally.statuses[status] += 1
        tally.past_auth += not (status in AUTH_STATUSES or "x-iota-auth-error" in response.headers)
        tally.handled += recorder.used
        if status >= 500:
            tally.failures.append(f"{case.operation.label} -> {status} {response.text[:200]} for {kwargs}")
        elif (
            status >= 400 and "requeued" not in response.text and state_of(net) != before
        ):  # a requeue is kept
            tally.failures.append(f"{case.operation.label} -> {status} changed state: {kwargs}")

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():
            # Object routes take presigned URLs, not hotkeys (test_key_scoping): fuzzed for 5xx, not counted.
            tally = storage if operation.path.startswith(STORAGE_PREFIX) else tallies[mode]
            fuzz_operation(operation, mode, examples, lambda case, t=tally: check(case, t))

    for client in (*clients.values(), plain):
        client.close()
    for mode, tally in tallies.items():
        print(
            f"{mode.value}: {tally.cases} cases, {tally.past_auth / tally.cases:.0%} past authentication, "
            f"{tally.handled / tally.cases:.0%} reached a handler; statuses {dict(sorted(tally.statuses.items()))}"
        )
    failures = [f for tally in (*tallies.values(), storage) for f in tally.failures]
    assert not failures, f"{len(failures)} failures, first ones:\n" + "\n".join(failures[:8])
    positive = tallies[GenerationMode.POSITIVE]
    assert positive.handled >= 0.8 * positive.cases
    assert sum(t.past_auth for t in tallies.values()) >= 0.8 * sum(t.cases for t in tallies.values())
