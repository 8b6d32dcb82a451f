"""Values a registered miner can put in a well-formed, signed request that the state store cannot take or /status
could not serve: each is refused with a 4xx and a reason, is a strike, and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bittensor.keyfiles import Keypair

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
    assert response.status_code == 400 and "finite" in response.json()["detail"], response.text
    assert net.snapshot() == before
    assert (
        net.orch.abuse is not None and net.orch.abuse.strikes(net.keys["tail"].ss58_address, net.clock()) == 1
    )
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
        assert response.status_code == status, (target, response.status_code, response.text[:300])
    assert net.snapshot() == before
