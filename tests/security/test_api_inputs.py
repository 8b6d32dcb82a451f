"""Values a registered miner can put in a well-formed, signed request that the state store cannot take or /status
could not serve: each is refused with a 4xx and a reason, is a strike, and changes nothing. A refusal names what is
wrong without repeating the value, and no body, signed or not, gets a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bittensor.keyfiles import Keypair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER
from iota.storage.transfer import upload
from tests.security import MINERS, Net, report_for, serve_net


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    with serve_net(data_dir, keypairs, tmp_path) as net:
        yield net


@pytest.mark.parametrize("loss", ["NaN", "Infinity", "-Infinity"])
def test_a_loss_that_is_not_a_finite_number_is_refused(net: Net, loss: str) -> None:
    work, data = net.lease_at(2)
    out = net.activation(1.0)
    assert work.output_url
    upload(work.output_url, out)
    honest = report_for(work, data, out, loss=2.5).model_dump_json()
    before = net.snapshot()
    response = net.signed(
        "tail", f"/work/{work.hop_id}/report", honest.replace('"loss":2.5', f'"loss":{loss}').encode()
    )
    # Refused by the message's schema (422: nothing changes) or by the orchestrator (400: the item is given back at
    # once, as for any report refused as its sender's fault), with the reason either way, and a strike.
    assert response.status_code in (400, 422) and "finite" in response.text, response.text
    assert (
        net.orch.abuse is not None and net.orch.abuse.strikes(net.keys["tail"].ss58_address, net.clock()) == 1
    )
    if response.status_code == 400:
        hop = net.orch.state.hop(work.hop_id or 0)
        assert hop is not None and hop.status == "queued"
        work = net.work("tail")
        assert work.output_url
        upload(work.output_url, out)
        honest = report_for(work, data, out, loss=2.5).model_dump_json()
    else:
        assert net.snapshot() == before
    assert net.signed("tail", f"/work/{work.hop_id}/report", honest.encode()).status_code == 200


def test_numbers_beyond_the_database_and_oversized_strings_are_refused(net: Net) -> None:
    net.join(*MINERS)
    before = net.snapshot()
    huge = 2**63
    cases = {
        f"/work/{huge}/release?epoch=0": (b"", 422),
        f"/work/1/release?epoch={huge}": (b"", 422),
        f"/work/{huge}/report": (b"{}", 422),
        "/miners/register": (b'{"device": "cpu", "memory_bytes": %d, "session": "s"}' % huge, 400),
        "/miners/register#negative": (b'{"device": "cpu", "memory_bytes": -1, "session": "s"}', 400),
        "/miners/register#long": (
            b'{"device": "cpu", "memory_bytes": 1, "session": "%s"}' % (b"s" * 4096),
            400,
        ),
    }
    for target, (body, status) in cases.items():
        path, _, query = target.split("#")[0].partition("?")
        params = dict(p.split("=") for p in query.split("&")) if query else None
        response = net.signed("head", path, body, params)
        # Bounded by the message's schema (422) or by the orchestrator (400).
        assert response.status_code in (status, 422), (target, response.status_code, response.text[:300])
    assert net.snapshot() == before


# -- what a 422 says, and that no body gives a 500 ------------------------------------------------------------

SECRET = "s3cr3t-" + "q" * 40  # a value that must never come back in an answer


def test_a_refused_body_is_not_repeated_in_the_answer(net: Net) -> None:
    net.join(*MINERS)
    secret = SECRET.encode()
    cases = {
        "wrong type": b'{"device": "cpu", "memory_bytes": "%s", "session": "s"}' % secret,
        "too long": b'{"device": "cpu", "memory_bytes": 1, "session": "%s"}' % (secret * 100),
        "unknown fields": b"{%s}" % b",".join(b'"f%d": "%s"' % (i, secret) for i in range(5000)),
        "not json": b'{"device": "%s' % secret,
    }
    # An unsigned body is refused for its signature, before its values are looked at.
    unsigned = {**JSON, VERSION_HEADER: str(PROTOCOL_VERSION)}
    for why, body in cases.items():
        signed = net.signed("head", "/miners/register", body)
        anonymous = httpx.post(f"{net.url}/miners/register", content=body, headers=unsigned)
        for answer in (signed, anonymous):
            assert answer.status_code in (400, 401, 422), (why, answer.status_code)
            assert "q" * 40 not in answer.text, (why, answer.text[:300])
            assert len(answer.content) < 4096, (
                why,
                len(answer.content),
            )  # 5000 wrong fields: a bounded answer
        if signed.status_code == 422:
            assert all(set(error) == {"type", "loc", "msg"} for error in signed.json()["detail"]), why


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_number_json_cannot_carry_is_refused_not_a_server_error(net: Net, value: str) -> None:
    # Refused with its input in FastAPI's own 422, which cannot encode it as JSON: a 500 and a traceback.
    net.join("head")
    number = value.encode()
    bodies = {
        "/work": b'{"hold_s": %s}' % number,
        "/miners/register": b'{"device": "cpu", "memory_bytes": %s, "session": "s"}' % number,
        "/validators/verdict": b'{"audit_id": "a", "miner": "m", "epoch": %s}' % number,
    }
    for path, body in bodies.items():
        answer = net.signed("validator" if path.startswith("/validators") else "head", path, body)
        assert answer.status_code == 422, (path, answer.status_code, answer.text[:300])
        assert answer.json()["detail"][0]["loc"][0] == "body"


JSON = {"content-type": "application/json"}
HOSTILE_VALUES: list[Any] = [
    float("nan"),
    float("inf"),
    2**63,  # past the database's integers
    -(2**63) - 1,
    10**400,  # past a float
    -1,
    "text",
    "x" * 20_000,
    [],
    {},
    None,
    json.loads("[" * 64 + "]" * 64),  # nested 64 deep
]


def valid_bodies(net: Net) -> dict[tuple[str, str], dict[str, Any]]:
    """(signer, path) -> a body the route takes, to replace one field of at a time."""
    audit = {
        "audit_id": "a" * 32,
        "miner": net.keys["head"].ss58_address,
        "epoch": 0,
        "stage": 0,
        "passed": True,
    }
    return {
        ("head", "/miners/register"): {"device": "cpu", "memory_bytes": 1 << 30, "session": "s"},
        ("head", "/work"): {"forward": True, "hold_s": 0.0},
        ("head", "/work/1/report"): {
            "run_id": "run-test",
            "epoch": 0,
            "hop_id": 1,
            "inner_step": 0,
            "input_sha256": None,
            "output_sha256": "0" * 64,
            "output_md5": "0" * 32,
            "loss": 1.0,
            "tokens": 0,
        },
        ("head", "/phase/report"): {
            "run_id": "run-test",
            "epoch": 0,
            "inner_step": 0,
            "result": {"kind": "upload", "norm": 1.0},
        },
        ("validator", "/validators/verdict"): {
            **audit,
            "hops_replayed": 1,
            "depth": 1,
            "reason": "",
            "errors": {},
        },
    }


def test_no_body_gets_a_server_error(net: Net) -> None:
    """Every field of every message a registered caller sends, replaced in turn by each hostile value: refused or
    taken, never a 5xx."""
    net.join(*MINERS)
    net.orch.abuse = None  # strikes would ban the sender before every body reached its route
    failures = []
    for (signer, path), body in valid_bodies(net).items():
        for field in body:
            for value in HOSTILE_VALUES:
                raw = json.dumps({**body, field: value}).encode()
                answer = net.signed(signer, path, raw)
                if answer.status_code >= 500:
                    failures.append((path, field, repr(value)[:40], answer.status_code, answer.text[:200]))
    assert not failures, failures


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=64),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=16), inner, max_size=6),
        max_leaves=30,
    )
)
def test_no_json_value_gets_a_server_error(net: Net, body: Any) -> None:
    net.orch.abuse = None
    raw = json.dumps(body).encode()  # NaN and Infinity included, as Python writes them
    for signer, path in (
        ("head", "/miners/register"),
        ("head", "/work/1/report"),
        ("validator", "/validators/verdict"),
    ):
        answer = net.signed(signer, path, raw)
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:200])
