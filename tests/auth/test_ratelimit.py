"""Token buckets, client-IP resolution behind proxies, and the per-IP middleware in front of authentication."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from iota.auth import RateLimiter, client_ip
from iota.auth.ratelimit import parse_networks
from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER
from tests.auth import MINER, FakeClock, build_app, make_authenticator, signed


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # another key, another bucket
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    clock.now += 100  # a long pause refills to burst, not beyond
    assert [limiter.acquire("a") for _ in range(4)][-1] > 0


def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = parse_networks(["10.0.0.0/8", "127.0.0.1"])
    assert client_ip("203.0.113.9", "1.2.3.4", proxies) == "203.0.113.9"  # spoofed header ignored
    assert client_ip("10.0.0.2", "198.51.100.7", proxies) == "198.51.100.7"
    # The client prepended a fake hop; our proxies appended the real one on the right.
    assert client_ip("127.0.0.1", "1.1.1.1, 198.51.100.7, 10.0.0.3", proxies) == "198.51.100.7"
    assert client_ip("10.0.0.2", None, proxies) == "10.0.0.2"


def _statuses(client: TestClient, forwarded: list[str]) -> list[int]:
    # Unsigned requests: the per-IP limit runs before authentication, so even these are counted.
    version = {VERSION_HEADER: str(PROTOCOL_VERSION)}
    return [client.get("/miner", headers={**version, "X-Forwarded-For": ip}).status_code for ip in forwarded]


def test_per_ip_limit_ignores_spoofed_forwarded_for_from_untrusted_peer() -> None:
    app = build_app(make_authenticator(), ip_limiter=RateLimiter(1 / 60, 2), trusted_proxies=["10.0.0.0/8"])
    client = TestClient(app, client=("203.0.113.9", 4000))
    statuses = _statuses(client, ["1.1.1.1", "2.2.2.2", "3.3.3.3"])
    assert statuses == [401, 401, 429]  # a fresh X-Forwarded-For each time bought nothing
    refused = client.get("/miner")
    assert refused.json()["detail"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert "date" in refused.headers  # even the limiter's answer tells the client the time


def test_per_ip_limit_counts_forwarded_clients_separately_behind_trusted_proxy() -> None:
    app = build_app(make_authenticator(), ip_limiter=RateLimiter(1 / 60, 2), trusted_proxies=["10.0.0.0/8"])
    client = TestClient(app, client=("10.0.0.5", 4000))
    assert _statuses(client, ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]) == [401] * 4
    assert _statuses(client, ["5.5.5.5"] * 3) == [401, 401, 429]
    # A signed request from a fresh client IP passes the limiter and the signature check.
    signed_ok = client.get("/miner", headers={**signed(MINER, "GET", "/miner"), "X-Forwarded-For": "6.6.6.6"})
    assert signed_ok.status_code == 200
