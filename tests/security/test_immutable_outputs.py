"""An accepted output stays what was accepted, and a bad one costs its producer, never an honest miner.

A hop's output URL is write-once, a report is checked against the digest the store computed (LocalStore on a real
server; S3 on moto), and a consumer that finds its input bad releases the item with that claim: the orchestrator
checks it against the store, then strikes the producer and restarts the sample at the head, or, when the claim is
false, strikes the consumer and requeues its item. A sample restarted too often is dropped and counted.
"""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.chain.local import LocalChain
from iota.model import wire
from iota.orchestrator.abuse import AbuseConfig, AbusePolicy
from iota.orchestrator.assembly import assemble
from iota.orchestrator.scheduler import SchedulingError
from iota.orchestrator.service import Orchestrator
from iota.protocol import RegisterRequest, Work
from iota.storage import DigestMismatch, S3Store
from iota.storage.transfer import download, upload
from tests.orchestrator import run_settings
from tests.security import MINERS, Net, refused, report_for, serve_net
from tests.storage.test_s3 import signature_holds
from tests.support.s3 import S3Bucket


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    with serve_net(data_dir, keypairs, tmp_path) as net:
        exempt = [net.keys["operator"].ss58_address]
        config = AbuseConfig(throttle_at=20, ban_at=50)
        net.orch.abuse = AbusePolicy(net.orch.state, net.orch.scheduler, config, exempt=exempt)
        yield net


def strikes(net: Net, name: str) -> int:
    assert net.orch.abuse is not None
    return net.orch.abuse.strikes(net.keys[name].ss58_address, net.clock())


def head_output(net: Net, out: bytes) -> Work:
    """The head takes a new sample, uploads `out` and reports it with its true digests: accepted."""
    work = net.work("head")
    assert work.output_url
    upload(work.output_url, out)
    net.clients["head"].report(report_for(work, None, out))
    return work


def undecodable(net: Net) -> bytes:
    """Bytes of exactly an activation's size that are no safetensors payload: their digest is all they have."""
    return b"\xff" * net.orch.limits.activation_bytes


def sample_of(net: Net, work: Work) -> tuple[int, int, str]:
    info = net.orch.state.sample(work.sample_id or 0)
    assert info is not None
    return info


# -- write once --------------------------------------------------------------------------------------------


def test_a_reported_output_cannot_be_replaced_through_its_url(net: Net) -> None:
    net.join(*MINERS)
    out = net.activation(0.5)
    work = head_output(net, out)
    assert work.output_url
    for other in (net.activation(9.0), undecodable(net)):
        response = httpx.put(work.output_url, content=other)
        assert response.status_code == 409, response.text
    mid = net.work("mid")
    assert mid.input_url and mid.input_sha256 == wire.sha256(out)
    assert download(mid.input_url, mid.input_sha256, 1 << 24) == out  # what was accepted is what is read


def test_a_report_refused_as_its_senders_fault_gives_the_item_back_at_once(net: Net) -> None:
    """Left leased, a refused item's sample would wait out the lease: a tail that omits the loss gives the item back
    at once (and takes a strike), and the next tail request is handed it again."""
    work, data = net.lease_at(2)
    out = net.activation(0.5)
    assert work.output_url
    upload(work.output_url, out)
    refused(lambda: net.clients["tail"].report(report_for(work, data, out)), 400, "loss")
    hop = net.orch.state.hop(work.hop_id or 0)
    assert hop is not None and hop.status != "leased" and strikes(net, "tail") == 1
    again = net.work("tail")
    assert (
        again.sample_id == work.sample_id and again.stage == 2
    )  # handed out again at once, not after lease_s


# -- a consumer's claim, checked ---------------------------------------------------------------------------


def test_a_confirmed_mismatch_strikes_the_producer_and_restarts_the_sample_at_the_head(net: Net) -> None:
    net.join(*MINERS)
    work = head_output(net, net.activation(0.5))
    key = net.orch.state.hop(work.hop_id or 0).output_key  # type: ignore[union-attr]
    assert key is not None
    net.store.put(key, net.activation(9.0))  # a store that did not hold the object (write-once not enforced)
    mid = net.work("mid")
    assert mid.input_url
    with pytest.raises(DigestMismatch):
        download(mid.input_url, mid.input_sha256, 1 << 24)
    assert "restarted" in net.clients["mid"].release(mid.hop_id or 0, mid.epoch, "input_mismatch").detail
    assert (strikes(net, "head"), strikes(net, "mid")) == (1, 0)
    assert sample_of(net, work) == (0, 1, "active")
    again = net.work("head")
    assert again.sample_id == work.sample_id and again.hop_id != work.hop_id  # a new attempt, from the head
    bad = net.events("bad_output")
    assert (
        len(bad) == 1 and bad[0]["hotkey"] == net.keys["head"].ss58_address and bad[0]["hop"] == work.hop_id
    )


def test_an_undecodable_output_strikes_its_producer(net: Net) -> None:
    net.join(*MINERS)
    work = head_output(net, undecodable(net))  # the digest is true: the report cannot tell
    mid = net.work("mid")
    assert mid.input_url
    data = download(mid.input_url, mid.input_sha256, 1 << 24)
    with pytest.raises(ValueError):
        wire.decode(data, dtype=wire.wire_dtype(net.run.settings.wire_dtype), shape=None, max_bytes=len(data))
    net.clients["mid"].release(mid.hop_id or 0, mid.epoch, "input_undecodable")
    assert (strikes(net, "head"), strikes(net, "mid")) == (1, 0)
    assert sample_of(net, work) == (0, 1, "active")


def test_a_lying_consumer_is_struck_and_the_honest_producer_is_not(net: Net) -> None:
    net.join(*MINERS)
    work = head_output(net, net.activation(0.5))
    for claim in ("input_mismatch", "input_undecodable"):
        mid = net.work("mid")
        assert mid.hop_id is not None
        refused(partial(net.clients["mid"].release, mid.hop_id, mid.epoch, claim), 409, "exactly what")
    assert (strikes(net, "head"), strikes(net, "mid")) == (0, 2)
    assert sample_of(net, work) == (0, 0, "active")  # never restarted on a false word
    assert net.events("bad_output") == []
    # The item went back to the queue each time, its input untouched: an honest miner can still do it.
    mid = net.work("mid")
    assert mid.input_url
    data = download(mid.input_url, mid.input_sha256, 1 << 24)
    out = net.activation(1.0)
    assert mid.output_url
    upload(mid.output_url, out)
    assert net.clients["mid"].report(report_for(mid, data, out)).ok


def test_a_consumer_can_only_accuse_the_producer_of_its_own_item(net: Net) -> None:
    net.join(*MINERS)
    head = net.work("head")  # the head's input is the run's data: no miner to accuse
    refused(
        lambda: net.clients["head"].release(head.hop_id or 0, head.epoch, "input_mismatch"), 400, "no input"
    )
    assert strikes(net, "head") == 1
    # Nor can a miner accuse through an item it does not hold.
    work = head_output(net, net.activation(0.5))
    mid = net.work("mid")
    refused(
        lambda: net.clients["tail"].release(mid.hop_id or 0, mid.epoch, "input_mismatch"), 409, "not leased"
    )
    assert strikes(net, "head") == 1 and sample_of(net, work) == (0, 0, "active")


def test_a_sample_poisoned_again_and_again_is_dropped_and_counted(net: Net) -> None:
    scheduler = net.orch.scheduler
    scheduler.policy = replace(scheduler.policy, max_restarts=2)
    net.join(*MINERS)
    first = None
    for _ in range(3):
        work = head_output(net, undecodable(net))
        first = first or work
        assert work.sample_id == first.sample_id
        mid = net.work("mid")
        net.clients["mid"].release(mid.hop_id or 0, mid.epoch, "input_undecodable")
    assert first is not None and sample_of(net, first) == (0, 2, "dropped")
    assert strikes(net, "head") == 3 and strikes(net, "mid") == 0
    status = net.clients["mid"].status()
    assert status.samples_lost == 0 and status.samples_requeued == 2
    assert net.orch.state.counters.get("samples_dropped") == 1
    assert [e["sample"] for e in net.events("drop_sample")] == [first.sample_id]
    assert net.work("head").sample_id != first.sample_id  # the run goes on with the next sample


# -- S3: only what the store confirms is accepted ----------------------------------------------------------


@pytest.fixture
def s3_orch(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path, s3_bucket: S3Bucket
) -> tuple[Orchestrator, S3Store, dict[str, str]]:
    chain = LocalChain(tmp_path / "chain.json")
    for name in MINERS:
        chain.register(keypairs[name].ss58_address, keypairs["cold"].ss58_address)
    settings = run_settings(data_dir, tmp_path / "run", store="s3")
    store = S3Store(**s3_bucket.store_kwargs())
    orch = assemble(settings, chain, keypairs["orchestrator"].ss58_address, store=store).orchestrator
    hotkeys = {name: keypairs[name].ss58_address for name in MINERS}
    for name in MINERS:
        request = RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
        orch.register(hotkeys[name], request)
    return orch, store, hotkeys


def refused_report(orch: Orchestrator, hotkey: str, work: Work, out: bytes, **over: Any) -> str:
    with pytest.raises(SchedulingError) as error:
        orch.report(hotkey, work.hop_id or 0, report_for(work, None, out, **over))
    assert error.value.status == 400 and error.value.fault
    return error.value.detail


def test_s3_refuses_a_forged_sha256_with_or_without_md5(
    s3_orch: tuple[Orchestrator, S3Store, dict[str, str]],
) -> None:
    orch, store, hotkeys = s3_orch
    out = b"\x01" * orch.limits.activation_bytes
    forged = hashlib.sha256(b"what the next stage will be told").hexdigest()
    for beside in ({"output_md5": None}, {}):  # without md5, then beside the true md5
        work = orch.work(hotkeys["head"])  # leased anew each time: a refused report requeues its item
        assert work.output_url
        # The writer even stores its forged digest beside the object (moto keeps unsigned metadata headers).
        sent = httpx.put(
            work.output_url, content=out, headers={"if-none-match": "*", "x-amz-meta-sha256": forged}
        )
        assert sent.status_code == 200, sent.text
        assert "sha256" in refused_report(orch, hotkeys["head"], work, out, output_sha256=forged, **beside)
    work = orch.work(hotkeys["head"])
    assert work.output_url
    upload(work.output_url, out)
    assert orch.report(hotkeys["head"], work.hop_id or 0, report_for(work, None, out)).ok
    hop = orch.state.hop(work.hop_id or 0)
    assert hop is not None and hop.output_sha == wire.sha256(out)
    assert orch.work(hotkeys["mid"]).input_sha256 == wire.sha256(out)


def test_s3_refuses_a_put_after_the_report(
    s3_orch: tuple[Orchestrator, S3Store, dict[str, str]], s3_bucket: S3Bucket
) -> None:
    orch, store, hotkeys = s3_orch
    work = orch.work(hotkeys["head"])
    assert work.output_url
    out = b"\x01" * orch.limits.activation_bytes
    upload(work.output_url, out)
    assert orch.report(hotkeys["head"], work.hop_id or 0, report_for(work, None, out)).ok
    # The URL still lives. S3 checks its signature (moto does not: re-signed here), which binds the condition:
    # a PUT without "If-None-Match: *" is refused; one with it is refused because the key holds an object.
    size = str(len(out))
    assert not signature_holds(work.output_url, "PUT", {"content-length": size}, s3_bucket)
    assert signature_holds(work.output_url, "PUT", {"content-length": size, "if-none-match": "*"}, s3_bucket)
    swapped = httpx.put(work.output_url, content=b"\x02" * len(out), headers={"if-none-match": "*"})
    assert swapped.status_code == 412, swapped.text
    hop = orch.state.hop(work.hop_id or 0)
    assert hop is not None and hop.output_key and store.get(hop.output_key) == out


def test_a_store_that_does_not_answer_is_a_503_and_the_lease_stands(
    s3_orch: tuple[Orchestrator, S3Store, dict[str, str]], s3_bucket: S3Bucket
) -> None:
    """A report the orchestrator cannot check because its store is down is neither a 500 (the miner's client
    would retry it for an hour as a crash) nor the miner's fault: 503, no strike, the lease still the miner's."""
    orch, store, hotkeys = s3_orch
    work = orch.work(hotkeys["head"])
    assert work.output_url
    out = b"\x01" * orch.limits.activation_bytes
    upload(work.output_url, out)
    with socket.socket() as s:  # a port nobody listens on: the store is down
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    orch.store = S3Store(**{**s3_bucket.store_kwargs(), "endpoint_url": dead})
    with pytest.raises(SchedulingError) as error:
        orch.report(hotkeys["head"], work.hop_id or 0, report_for(work, None, out))
    assert error.value.status == 503 and not error.value.fault
    hop = orch.state.hop(work.hop_id or 0)
    assert hop is not None and hop.status == "leased" and hop.miner == hotkeys["head"]
    orch.store = store  # back up: the same report is accepted
    assert orch.report(hotkeys["head"], work.hop_id or 0, report_for(work, None, out)).ok
