"""Role dependencies: miner, validator (permit and stake) and operator routes, and the per-hotkey rate limit."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from iota.auth import RateLimiter
from tests.auth import (
    MINER,
    OPERATOR,
    POOR_VALIDATOR,
    STRANGER,
    VALIDATOR,
    build_app,
    code_of,
    make_authenticator,
    signed,
)


@pytest.fixture
def client() -> TestClient:
    return TestClient(build_app(make_authenticator()))


def get(client: TestClient, keypair: Any, path: str) -> Any:
    return client.get(path, headers=signed(keypair, "GET", path))


def test_each_role_reaches_its_own_routes(client: TestClient) -> None:
    assert get(client, MINER, "/miner").json() == {"uid": 0}
    assert get(client, VALIDATOR, "/validator").json() == {"uid": 1}
    assert get(client, OPERATOR, "/operator").json() == {"hotkey": OPERATOR.ss58_address}


@pytest.mark.parametrize(
    ("keypair", "path", "code"),
    [
        (MINER, "/validator", "no_validator_permit"),
        (MINER, "/operator", "not_operator"),
        (POOR_VALIDATOR, "/validator", "insufficient_stake"),
        (VALIDATOR, "/operator", "not_operator"),
        (OPERATOR, "/miner", "not_registered"),  # the operator is no neuron
        (STRANGER, "/miner", "unregistered"),  # refused before any role check
    ],
)
def test_wrong_role_refused(client: TestClient, keypair: Any, path: str, code: str) -> None:
    response = get(client, keypair, path)
    assert response.status_code == 403
    assert code_of(response) == code


def test_insufficient_stake_says_how_much_is_needed(client: TestClient) -> None:
    detail = get(client, POOR_VALIDATOR, "/validator").json()["detail"]
    assert detail["stake"] == 10.0 and detail["min_stake"] == 1000.0
    assert "need 1000" in detail["message"]


def test_operator_routes_closed_without_configured_operator() -> None:
    authenticator = make_authenticator()
    authenticator.operator_hotkey = None
    client = TestClient(build_app(authenticator))
    # Now the (unregistered) operator key is a stranger, and a registered validator is still no operator.
    assert code_of(get(client, OPERATOR, "/operator")) == "unregistered"
    response = get(client, VALIDATOR, "/operator")
    assert response.status_code == 403 and "no operator hotkey" in response.json()["detail"]["message"]


def test_per_hotkey_rate_limit() -> None:
    limiter = RateLimiter(rate_per_s=1 / 60, burst=3)
    client = TestClient(build_app(make_authenticator(hotkey_limiter=limiter)))
    statuses = [get(client, MINER, "/miner").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    refused = get(client, MINER, "/miner")
    assert code_of(refused) == "rate_limited"
    assert 55 <= int(refused.headers["Retry-After"]) <= 60
    # The bucket is the hotkey's, not everyone's.
    assert get(client, VALIDATOR, "/validator").status_code == 200
