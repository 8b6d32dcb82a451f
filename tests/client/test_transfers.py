"""The patience of a miner's transfers (iota.client.transfers) against a real server that fails on purpose: through
a store that stays down longer than one transfer's own retries, and not at all where retrying cannot help."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest
from loguru import logger

from iota.client import transfers
from iota.storage import DigestMismatch, TransferError
from tests.storage.test_transfer import Script, flaky  # noqa: F401  (the misbehaving server, a fixture)

PAYLOAD_SHA = hashlib.sha256(b"payload").hexdigest()  # what the flaky server's GET answers


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


def test_a_store_down_longer_than_one_transfer_is_waited_for(
    flaky: tuple[str, Script],  # noqa: F811
    warnings: list[str],
) -> None:
    url, script = flaky
    script.statuses = [503] * 6  # one transfer tries 5 times; the sixth failure comes after the first wait
    with httpx.Client() as http:
        assert transfers.get(f"{url}/obj", PAYLOAD_SHA, 100, http) == b"payload"
    assert len(script.bodies) == 7
    assert len(warnings) == 1 and warnings[0].startswith("download failed (download of")
    assert warnings[0].endswith("refused with 503: payload); retrying in 1 s")


def test_patience_runs_out(
    flaky: tuple[str, Script],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    warnings: list[str],
) -> None:
    url, script = flaky
    script.statuses = [502] * 100
    monkeypatch.setattr(transfers, "TRANSFER_PATIENCE_S", 0.1)  # less than one transfer's own retries take
    with httpx.Client() as http, pytest.raises(TransferError) as caught:
        transfers.put(f"{url}/obj", b"x", http)
    assert caught.value.status == 502 and len(script.bodies) == 5 and warnings == []


@pytest.mark.parametrize("status", [403, 404])
def test_a_refused_url_is_not_waited_for(
    flaky: tuple[str, Script],  # noqa: F811
    warnings: list[str],
    status: int,
) -> None:
    url, script = flaky
    script.statuses = [status] * 3
    with httpx.Client() as http, pytest.raises(TransferError) as caught:
        transfers.get(f"{url}/obj", None, 100, http)
    assert caught.value.status == status and len(script.bodies) == 1 and warnings == []


def test_wrong_bytes_are_not_fetched_again(flaky: tuple[str, Script], warnings: list[str]) -> None:  # noqa: F811
    url, script = flaky
    with httpx.Client() as http, pytest.raises(DigestMismatch):
        transfers.get(f"{url}/obj", "0" * 64, 100, http)
    assert len(script.bodies) == 1 and warnings == []
