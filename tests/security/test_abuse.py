"""A registered miner that breaks the protocol is struck, throttled, then banned with the reason in the operator's
log; honest refusals (races an honest miner can lose) cost nothing; the record survives a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bittensor.keyfiles import Keypair

from iota.orchestrator.abuse import AbuseConfig, AbusePolicy
from iota.protocol import Ack
from iota.storage.transfer import upload
from tests.security import MINERS, Net, refused, report_for, serve_net

THROTTLE_AT, BAN_AT = 3, 5


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    with serve_net(data_dir, keypairs, tmp_path) as net:
        net.orch.abuse = policy(net, throttle_interval_s=0.3)
        yield net


def policy(net: Net, **config: float) -> AbusePolicy:
    """A fresh policy over the run's database, as a restarted orchestrator builds it."""
    fields = {"throttle_at": THROTTLE_AT, "ban_at": BAN_AT, **config}
    exempt = [net.keys["operator"].ss58_address]
    return AbusePolicy(net.orch.state, net.orch.scheduler, AbuseConfig(**fields), exempt=exempt)  # type: ignore[arg-type]


def strikes(net: Net, name: str) -> int:
    assert net.orch.abuse is not None
    return net.orch.abuse.strikes(net.keys[name].ss58_address, net.clock())


def test_reports_for_items_never_leased_get_a_miner_throttled_then_banned(net: Net) -> None:
    work, data = net.lease_at(1)  # the mid's item; the tail will claim it
    out = net.activation(1.0)
    assert work.output_url and work.hop_id
    upload(work.output_url, out)
    claim = report_for(work, data, out).model_dump_json().encode()
    tail = net.keys["tail"].ss58_address

    statuses = []
    while len(statuses) < 40 and (not statuses or statuses[-1] != 403):
        response = net.signed("tail", f"/work/{work.hop_id}/report", claim)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            time.sleep(0.3)
    assert statuses.count(409) == BAN_AT, statuses  # each claim a strike, until the ban
    assert 429 in statuses[THROTTLE_AT:], statuses  # throttled after THROTTLE_AT strikes, before the ban
    assert statuses[-1] == 403 and "banned" in response.json()["detail"]

    (ban,) = net.events("ban")
    assert ban["hotkey"] == tail and "not leased to you" in ban["why"] and f"{BAN_AT} protocol" in ban["why"]
    (throttle,) = net.events("throttle")
    assert throttle["hotkey"] == tail and throttle["strikes"] == THROTTLE_AT
    miner = net.orch.state.miner(tail)
    assert miner is not None and miner.banned == ban["why"] and not miner.alive
    refused(net.clients["tail"].work, 403, "banned")
    # The honest holder of the item is untouched.
    assert net.clients["mid"].report(report_for(work, data, out)).ok
    assert strikes(net, "mid") == 0

    # A restarted orchestrator remembers: the ban and the strikes are in the state database.
    restarted = policy(net)
    assert restarted.ban_reason(tail) == ban["why"]
    assert restarted.strikes(tail, net.clock()) == BAN_AT

    # The operator lifts the ban: the miner starts with a clean record.
    net.clients["operator"].call("POST", "/operator/unban", Ack, params={"target": tail})
    assert strikes(net, "tail") == 0
    net.join("tail")
    assert net.clients["tail"].work().kind in ("wait", "forward")


def test_outputs_that_are_not_what_was_uploaded_are_strikes(net: Net) -> None:
    """Each such report is a strike, and one that proves something against the item ends the lease at once: the
    item is not left with a miner that broke the protocol until the lease runs out (a forged digest, or a tail's
    missing loss, stalled the run a whole lease)."""
    work, data = net.lease_at(1)
    out = net.activation(1.0)
    # Reported without uploading (or for an earlier lease): nothing is at the key it was issued, which proves nothing
    # against the item; the lease stands.
    refused(lambda: net.clients["mid"].report(report_for(work, data, out)), 400, "was not uploaded")
    hop = net.orch.state.hop(work.hop_id or 0)
    assert strikes(net, "mid") == 1 and hop is not None and hop.status == "leased"
    bad_reports = [
        (lambda w: report_for(w, data, out, input_sha256="0" * 64), "input digest"),
        (lambda w: report_for(w, data, net.activation(2.0)), "does not match the reported sha256"),
    ]
    for struck, (report, reason) in enumerate(bad_reports, start=2):
        assert work.output_url and work.hop_id
        upload(work.output_url, out)
        refused(lambda r=report, w=work: net.clients["mid"].report(r(w)), 400, reason)
        assert strikes(net, "mid") == struck
        hop = net.orch.state.hop(work.hop_id)
        assert hop is not None and hop.status == "queued" and hop.miner is None
        if struck < 1 + len(bad_reports):
            again = net.work("mid")
            assert again.hop_id == work.hop_id
            work = again


def test_honest_refusals_are_not_strikes(net: Net) -> None:
    work, data = net.lease_at(1)
    assert work.output_url and work.hop_id
    out = net.activation(1.0)
    upload(work.output_url, out)
    # A report for a closed epoch, and one after the lease expired: races an honest miner loses.
    refused(lambda: net.clients["mid"].report(report_for(work, data, out, epoch=1)), 409, "is closed")
    again = net.work("mid")
    assert again.hop_id == work.hop_id and again.output_url
    upload(again.output_url, out)
    net.clock.offset += net.run.settings.lease_s + 1
    refused(lambda: net.clients["mid"].report(report_for(again, data, out)), 409, "expired")
    # A report retried after the first one was recorded (its answer was lost on the way).
    third = net.work("mid")
    assert third.output_url
    upload(third.output_url, out)
    net.clients["mid"].report(report_for(third, data, out))
    refused(lambda: net.clients["mid"].report(report_for(third, data, out)), 409, "it is done")
    # Never registered with this run: told to register, not punished.
    refused(net.clients["idle"].work, 404, "has not registered")
    # The lapse itself was one strike (a lease not finished costs its holder); the late report added none.
    assert strikes(net, "mid") == 1 and strikes(net, "idle") == 0
    assert net.events("throttle") == net.events("ban") == []


def test_malformed_bodies_from_a_verified_hotkey_are_strikes(net: Net) -> None:
    net.join(*MINERS)
    for body in (b"{", b'{"device": 3}', b"[]"):
        response = net.signed("head", "/miners/register", body)
        assert response.status_code == 422, response.text
    response = net.signed("head", "/work/not-a-number/report", b"{}")
    assert response.status_code == 422
    assert strikes(net, "head") == 4
    # The operator is never struck; an unsigned request has no hotkey to strike.
    assert net.signed("operator", "/miners/register", b"{").status_code in (403, 422)
    assert strikes(net, "operator") == 0


def test_strikes_leave_the_window() -> None:
    """The policy alone, on a real SQLite state store: old strikes are forgotten, in memory and in the table."""
    from iota.orchestrator.scheduler import Policy, Scheduler
    from iota.orchestrator.state import StateStore
    from iota.state.db import open_database

    state = StateStore(open_database("sqlite:///:memory:"))
    scheduler = Scheduler(state, Policy(3, 4, 1, 8, 60.0, 600.0), lambda hop, lease: f"k/{hop.id}/{lease}")
    abuse = AbusePolicy(state, scheduler, AbuseConfig(window_s=100.0, throttle_at=2, ban_at=3))
    assert abuse.strike("5Hostile", "claim", now=1000.0) == 1
    assert abuse.strike("5Hostile", "claim", now=1050.0) == 2
    assert abuse.admit("5Hostile", now=1050.0) == 0.0  # the slow lane's one request
    assert abuse.admit("5Hostile", now=1050.0) > 0.0  # and no more
    assert abuse.strike("5Hostile", "claim", now=1120.0) == 2  # the first one has left the window
    assert abuse.ban_reason("5Hostile") is None
    assert state.db.scalar("SELECT COUNT(*) FROM abuse_strikes") == 2
    assert abuse.admit("5Hostile", now=1200.0) == 0.0  # a clean window, no throttle
    assert abuse.strike("5Hostile", "claim", now=1201.0) == 2
    assert abuse.strike("5Hostile", "forged", now=1202.0) == 3
    assert abuse.ban_reason("5Hostile") == "3 protocol violations in 100 s, last: forged"
    with pytest.raises(Exception, match="banned"):
        abuse.admit("5Hostile", now=1203.0)
    assert state.events(10)[0]["kind"] == "ban"


def test_a_throttled_miner_takes_no_new_samples(net: Net) -> None:
    """Past the throttle a miner may still finish the backwards of graphs it holds, but is handed no forward:
    a miner that keeps breaking the protocol cannot keep taking new samples and sitting on them."""
    net.join(*MINERS)
    head = net.keys["head"].ss58_address
    for _ in range(THROTTLE_AT):
        net.orch.abuse.strike(head, "a confirmed bad output", net.clock())
    refused = net.orch.work(head)
    assert refused.kind == "wait" and refused.hop_id is None
    net.orch.abuse.forgive(head)
    assert net.orch.work(head).kind == "forward"
