"""The real orchestrator app on uvicorn, called through the miner's own client with real sr25519 signatures.

Every bad request is answered 4xx with a reason, and changes nothing: the tables and /status are compared before
and after. The happy path runs one sample through three stages with real stage workers and checks its loss.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from bittensor.keyfiles import Keypair
from prometheus_client.parser import text_string_to_metric_families

from iota.auth import sign_headers
from iota.chain.local import LocalChain
from iota.client.orchestrator import OrchestratorClient, Refused
from iota.model import wire
from iota.model.flat import decode_f32
from iota.model.llama import loss_fn
from iota.model.stages import build_stage
from iota.orchestrator.app import STORAGE_PREFIX
from iota.orchestrator.assembly import assemble
from iota.orchestrator.service import Orchestrator
from iota.protocol import Ack, RegisterRequest, Report, RunInfo, Status, Work
from iota.protocol.version import PROTOCOL_VERSION, VERSION_HEADER
from iota.storage import LocalStore
from iota.storage.transfer import download, upload
from iota.train.run import Run, batch_fn
from iota.train.worker import StageWorker, TrainFlags
from tests.orchestrator import run_settings
from tests.support import Clock, running_server

MINERS = ("head", "mid", "tail")  # registered in this order, they take stages 0, 1, 2
TABLES = ("kv", "miners", "samples", "hops", "losses", "events")


@dataclass
class Net:
    url: str
    orch: Orchestrator
    run: Run
    store: LocalStore
    clock: Clock
    clients: dict[str, OrchestratorClient]
    app: Any = None

    def join(self, *names: str) -> None:
        for name in names:
            request = RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
            assert self.clients[name].register(request).stage == MINERS.index(name)

    def work(self, name: str, kind: str = "forward") -> Work:
        work = self.clients[name].work()
        assert work.kind == kind, work.reason
        return work

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused request must leave as it was: the state tables, and /status."""
        db = self.orch.state.db
        tables = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}  # noqa: S608
        status = httpx.get(f"{self.url}/status").json()
        return {"status": status, **tables}

    def hop_status(self, hop_id: int) -> str:
        hop = self.orch.state.hop(hop_id)
        assert hop is not None
        return hop.status


@pytest.fixture(scope="session")
def keys() -> dict[str, Keypair]:
    names = ("orchestrator", "operator", "cold", "idle", "stranger", *MINERS)
    return {n: Keypair.create_from_mnemonic(Keypair.generate_mnemonic()) for n in names}


@pytest.fixture
def net(data_dir: Path, keys: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    """A fresh run on a real server: miners and `idle` on the chain, `stranger` not, `operator` configured."""
    chain = LocalChain(tmp_path / "chain.json")
    for name in (*MINERS, "idle"):
        chain.register(keys[name].ss58_address, keys["cold"].ss58_address)
    settings = run_settings(data_dir, tmp_path / "run", operator_hotkey=keys["operator"].ss58_address)
    # The store's URLs must name the server's port, which running_server picks: set once it is known.
    store = LocalStore(tmp_path / "run" / "store", "http://127.0.0.1:9/storage", secrets.token_bytes(32))
    assembled = assemble(settings, chain, keys["orchestrator"].ss58_address, store=store, local_store=store)
    clock = Clock()
    assembled.orchestrator.clock = clock
    with running_server(assembled.app) as url:
        store.base_url = url + STORAGE_PREFIX
        clients = {
            name: OrchestratorClient(
                url, keys[name], keys["orchestrator"].ss58_address, timeout_s=10, give_up_s=5
            )
            for name in ("operator", "idle", "stranger", *MINERS)
        }
        yield Net(url, assembled.orchestrator, assembled.run, store, clock, clients, assembled.app)
        for client in clients.values():
            client.close()


def activation(net: Net, fill: float = 0.0) -> bytes:
    """Correctly sized bytes for any activation or gradient object of this run."""
    model = net.run.model
    shape = (net.run.settings.micro_batch, model.seq_len, model.wire_width)
    data = wire.encode(torch.full(shape, fill), wire.wire_dtype(net.run.settings.wire_dtype))
    assert len(data) == net.orch.limits.activation_bytes
    return data


def report_for(
    work: Work, data: bytes | None, out: bytes | None, loss: float | None = None, **over: Any
) -> Report:
    """The report a well-behaved miner sends for `work`; `over` replaces fields."""
    fields: dict[str, Any] = {
        "run_id": work.run_id,
        "epoch": work.epoch,
        "hop_id": work.hop_id,
        "inner_step": 0,
        "input_sha256": wire.sha256(data) if data is not None else None,
        "output_sha256": wire.sha256(out) if out is not None else None,
        "output_md5": wire.md5_hex(out) if out is not None else None,
        "loss": loss,
        **over,
    }
    return Report(**fields)


def forward_with_bytes(
    net: Net, name: str, fill: float, loss: float | None = None
) -> tuple[Work, bytes | None]:
    """`name` takes its next forward, uploads `fill`-valued bytes and reports; returns the work and its input."""
    work = net.work(name)
    data = download(work.input_url, work.input_sha256, 1 << 24) if work.input_url else None
    out = activation(net, fill)
    assert work.output_url is not None and work.output_size == len(out)
    upload(work.output_url, out)
    net.clients[name].report(report_for(work, data, out, loss))
    return work, data


def lease_at(net: Net, stage: int) -> tuple[Work, bytes]:
    """Bring a new sample to `stage` and lease its forward there; returns the work and its downloaded input."""
    net.join(*MINERS)
    for name in MINERS[:stage]:
        forward_with_bytes(net, name, fill=0.5)
    work = net.work(MINERS[stage])
    assert work.stage == stage and work.input_url and work.output_url
    return work, download(work.input_url, work.input_sha256, 1 << 24)


def exposed(name: str, labels: dict[str, str]) -> str:
    """A sample as name{label="value",...}, its labels in alphabetical order."""
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")


def refused(call: Any, status: int, fragment: str) -> Any:
    with pytest.raises(Refused) as error:
        call()
    assert error.value.status == status, error.value.detail
    detail = error.value.detail
    text = detail["message"] if isinstance(detail, dict) else str(detail)
    assert fragment in text, text
    return detail


# -- the happy path ----------------------------------------------------------------------------------------


def test_one_sample_through_three_stages_over_http(net: Net) -> None:
    settings, model = net.run.settings, net.run.model
    flags = TrainFlags(settings.micro_batch, 1, "sgd", 0.0, 0.0, wire.wire_dtype(settings.wire_dtype))
    info = net.clients["head"].run_info()
    assert info.run_id == "run-test" and len(info.stages) == 3 and info.micro_batch == 2
    assert info.model.model_dump() == model.to_dict() and info.wire_dtype == "fp32"

    workers = {}
    for name in MINERS:
        registration = net.clients[name].register(
            RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
        )
        stage = registration.stage
        assert stage == MINERS.index(name) and registration.epoch == 0
        assert registration.checkpoint_url and registration.checkpoint_sha256
        shards = {s.file: s.sha256 for s in net.run.plan.shards}
        assert set(registration.data_urls) == set(shards)
        worker = StageWorker(
            model, net.run.stages[stage], settings.seed, flags,
            batch_fn(net.run.data, settings.micro_batch), torch.device("cpu"), False, 4,
        )  # fmt: skip
        flat = decode_f32(download(registration.checkpoint_url, registration.checkpoint_sha256, 1 << 26))
        assert torch.equal(flat, worker.flat_weights())  # checkpoint 0 is the seeded initialisation
        workers[name] = worker
    first_shard = sorted(shards)[0]
    download(registration.data_urls[first_shard], shards[first_shard], 1 << 30)  # served, with its digest

    def hop(name: str, kind: str) -> tuple[Work, float | None]:
        work = net.work(name, kind)
        assert work.hop_id is not None and work.sample_id == 0
        data = (
            download(work.input_url, work.input_sha256, workers[name].max_bytes) if work.input_url else None
        )
        out: bytes | None
        if kind == "forward":
            out, loss = workers[name].forward(work.sample_id, data)
        else:
            assert data is not None
            out, loss = workers[name].backward(work.sample_id, data), None
        if out is not None:
            assert work.output_url and work.output_size == len(out)
            upload(work.output_url, out)
        else:
            assert work.output_url is None
        ack = net.clients[name].report(report_for(work, data, out, loss))
        assert ack.ok and str(work.hop_id) in ack.detail
        return work, loss

    hop("head", "forward")
    hop("mid", "forward")
    _, loss = hop("tail", "forward")
    hop("mid", "backward")
    assert net.clients["head"].status().samples_completed == 0
    hop("head", "backward")

    # The loss is the unsplit model's on sample 0 (sequences 0 and 1 of the data plan).
    tokens, targets = net.run.batch(0)
    with torch.no_grad():
        x = tokens
        for spec in net.run.stages:
            x = build_stage(model, spec, settings.seed)(x)
        expected = float(loss_fn(x, targets))
    assert loss is not None and loss == pytest.approx(expected, abs=1e-5)

    status = net.clients["tail"].status()
    assert (status.epoch, status.phase, status.paused) == (0, "train", False)
    assert status.samples_completed == 1 and status.samples_in_flight == 0 and status.samples_lost == 0
    assert status.tokens_trained == settings.micro_batch * model.seq_len
    assert status.latest_loss == pytest.approx(loss)
    assert status.loss_curve == [(settings.micro_batch * model.seq_len, pytest.approx(loss))]
    assert status.bytes_transferred == 4 * 2 * net.orch.limits.activation_bytes  # 4 objects, up and down
    assert [[m.hops_done for m in s.miners] for s in status.stages] == [[2], [2], [1]]
    assert all(
        s.paused == "" and s.queued_forward == s.queued_backward == s.leased == 0 for s in status.stages
    )

    metrics = httpx.get(f"{net.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    values = {
        exposed(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    assert values["iota_samples_completed_total"] == 1 and values["iota_samples_lost"] == 0
    assert values["iota_tokens_trained_total"] == status.tokens_trained
    assert values["iota_loss"] == pytest.approx(loss)
    assert values['iota_hops_done_total{stage="1"}'] == 2
    assert values['iota_miners_alive{stage="2"}'] == 1
    assert values['iota_hop_duration_seconds_count{direction="forward",stage="2"}'] == 1

    served = RunInfo.model_validate(httpx.get(f"{net.url}/run").json())
    assert served == info
    assert Status.model_validate(httpx.get(f"{net.url}/status").json()).samples_completed == 1


# -- refusals that change nothing --------------------------------------------------------------------------


def test_unregistered_hotkey_is_refused(net: Net) -> None:
    net.join(*MINERS)
    before = net.snapshot()
    detail = refused(net.clients["stranger"].work, 403, "not registered on this subnet")
    assert detail["code"] == "unregistered"
    refused(lambda: net.clients["stranger"].register(
        RegisterRequest(device="cpu", memory_bytes=1 << 34, session="x")
    ), 403, "not registered")  # fmt: skip
    assert net.snapshot() == before


def test_hotkey_that_never_joined_the_run_gets_404(net: Net) -> None:
    net.join(*MINERS)
    before = net.snapshot()
    refused(net.clients["idle"].work, 404, "has not registered with this run")
    refused(lambda: net.clients["idle"].release(1, 0), 404, "has not registered with this run")
    assert net.snapshot() == before


def test_report_for_an_item_leased_to_another_miner(net: Net) -> None:
    work, data = lease_at(net, 1)
    out = activation(net, 1.0)
    upload(work.output_url or "", out)
    before = net.snapshot()
    refused(lambda: net.clients["tail"].report(report_for(work, data, out)), 409, "not leased to you")
    refused(lambda: net.clients["tail"].release(work.hop_id or 0, 0), 409, "not leased to you")
    assert net.snapshot() == before
    net.clients["mid"].report(report_for(work, data, out))  # the holder's report still stands
    assert net.hop_status(work.hop_id or 0) == "done"


BAD_REPORTS = {
    # case: (stage leased, HTTP status, words of the reason)
    "output missing": (1, 400, "was not uploaded"),
    "output of the wrong size": (1, 400, "bytes, expected"),
    "output sha256 mismatch": (1, 400, "does not match the reported sha256"),
    "no output sha256": (1, 400, "missing output_sha256"),
    "wrong run id": (1, 409, "this orchestrator runs 'run-test'"),
    "wrong input digest": (1, 400, "is not the digest of the input you were given"),
    "hop id differs from the URL": (1, 400, "but was sent for item"),
    "tail without a loss": (2, 400, "the tail must report the sample's loss"),
}


# The lease stands after these: a run it was not told of (a 409, no strike); nothing uploaded yet, which proves
# nothing against the item (a report sent before its upload, or for an earlier lease of the item).
LEASE_STANDS = {"wrong run id", "output missing"}


@pytest.mark.parametrize("case", sorted(BAD_REPORTS))
def test_bad_report_is_refused_and_gives_the_item_back(net: Net, case: str) -> None:
    stage, status, reason = BAD_REPORTS[case]
    work, data = lease_at(net, stage)
    assert work.output_url is not None and work.hop_id is not None
    out = activation(net, 1.0)
    loss = 3.0 if stage == 2 else None
    client = net.clients[MINERS[stage]]
    leased = net.orch.state.hop(work.hop_id)
    assert leased is not None and leased.output_key is not None
    good = report_for(work, data, out, loss)
    bad = good
    if case == "output missing":
        pass  # nothing uploaded
    elif case == "output of the wrong size":
        net.store.put(
            leased.output_key, out[:-4]
        )  # what a store that does not enforce the signed size could hold
    else:
        upload(work.output_url, out)
        bad = {
            "output sha256 mismatch": report_for(work, data, activation(net, 2.0), loss),
            "no output sha256": report_for(work, data, out, loss, output_sha256=None),
            "wrong run id": report_for(work, data, out, loss, run_id="another-run"),
            "wrong input digest": report_for(work, data, out, loss, input_sha256="0" * 64),
            "hop id differs from the URL": report_for(work, data, out, loss, hop_id=work.hop_id + 100),
            "tail without a loss": report_for(work, data, out, None),
        }[case]
    before = net.snapshot()
    if case == "hop id differs from the URL":
        call = lambda: client.call("POST", f"/work/{work.hop_id}/report", Ack, bad)  # noqa: E731
    else:
        call = lambda: client.report(bad)  # noqa: E731
    refused(call, status, reason)
    if case in LEASE_STANDS:
        assert net.snapshot() == before  # the miner fixes its report and is credited
    else:
        # A refusal that is the sender's fault (a strike) gives the item back at once: left leased, its sample
        # would wait out the lease on a miner that broke the protocol.
        assert net.hop_status(work.hop_id) == "queued"
        work = net.work(MINERS[stage])  # leased anew, to a new output key
        assert work.output_url is not None and work.hop_id == leased.id
        good = report_for(work, data, out, loss)
    upload(work.output_url, out)
    client.report(good)
    assert net.hop_status(work.hop_id) == "done"


def test_report_after_the_lease_expired(net: Net) -> None:
    work, data = lease_at(net, 1)
    assert work.hop_id is not None and work.output_url is not None
    out = activation(net, 1.0)
    upload(work.output_url, out)
    net.clock.offset += net.orch.scheduler.policy.lease_s + 1  # before any sweep has run
    refused(lambda: net.clients["mid"].report(report_for(work, data, out)), 409, "expired")
    assert net.hop_status(work.hop_id) == "queued"
    status = net.clients["mid"].status()
    assert status.stages[1].queued_forward == 1 and status.stages[2].queued_forward == 0
    assert [m.hops_done for m in status.stages[1].miners] == [0]
    before = net.snapshot()
    refused(lambda: net.clients["mid"].report(report_for(work, data, out)), 409, "not leased to you")
    assert net.snapshot() == before
    again = net.work("mid")
    assert again.hop_id == work.hop_id and again.output_url != work.output_url


def test_report_for_a_closed_epoch_requeues_the_item(net: Net) -> None:
    work, data = lease_at(net, 1)
    assert work.hop_id is not None
    out = activation(net, 1.0)
    upload(work.output_url or "", out)
    refused(lambda: net.clients["mid"].report(report_for(work, data, out, epoch=1)), 409, "is closed")
    assert net.hop_status(work.hop_id) == "queued"
    assert net.work("mid").hop_id == work.hop_id


def test_release_requeues_at_once(net: Net) -> None:
    work, _ = lease_at(net, 1)
    assert work.hop_id is not None
    assert net.clients["mid"].release(work.hop_id, work.epoch).ok
    assert net.hop_status(work.hop_id) == "queued"
    assert net.work("mid").hop_id == work.hop_id


def test_operator_actions(net: Net) -> None:
    net.join(*MINERS)
    before = net.snapshot()
    refused(
        lambda: net.clients["head"].call("POST", "/operator/pause", Ack), 403, "is not this run's operator"
    )
    operator = net.clients["operator"]
    refused(lambda: operator.call("POST", "/operator/explode", Ack), 404, "unknown action 'explode'")
    refused(lambda: operator.call("POST", "/operator/ban", Ack, params={"target": "nobody"}), 404, "no miner")
    assert net.snapshot() == before
    assert operator.call("POST", "/operator/pause", Ack).detail == "pause done"
    assert net.clients["head"].status().paused
    assert "paused by its operator" in net.clients["head"].work().reason


def test_protocol_version_mismatch_is_426(net: Net, keys: dict[str, Keypair]) -> None:
    net.join(*MINERS)
    before = net.snapshot()
    for sent in ("0", str(PROTOCOL_VERSION + 1)):
        headers = sign_headers(
            keys["head"], keys["orchestrator"].ss58_address, "POST", "/work", b"", time.time_ns()
        )
        response = httpx.post(f"{net.url}/work", headers={**headers, VERSION_HEADER: sent})
        assert response.status_code == 426, response.text
        detail = response.json()["detail"]
        assert detail["code"] == "protocol_mismatch" and detail["server_protocol"] == PROTOCOL_VERSION
        assert (
            f"speaks iota protocol {PROTOCOL_VERSION}" in detail["message"] and "upgrade" in detail["message"]
        )
    assert net.snapshot() == before


def test_events_filter_by_kind_and_exclude_kinds(net: Net, keys: dict[str, Keypair]) -> None:
    net.join(*MINERS)
    assert net.clients["operator"].call("POST", "/operator/pause", Ack).ok

    def events(**params: Any) -> list[dict[str, Any]]:
        response = httpx.get(f"{net.url}/events", params=params)
        assert response.status_code == 200, response.text
        return list(response.json())

    everything = events(limit=1000)
    assert {e["kind"] for e in everything} >= {"register", "operator_pause"}
    registered = events(kind="register")
    assert [e["hotkey"] for e in registered] == [keys[name].ss58_address for name in reversed(MINERS)]
    assert events(kind="register", limit=1) == registered[:1]  # the newest
    assert events(kind="register,operator_pause") == [
        e for e in everything if e["kind"] in ("register", "operator_pause")
    ]
    rest = events(exclude="register")
    assert rest == [e for e in everything if e["kind"] != "register"] and rest
    assert events(kind="register", exclude="register") == []
    assert events(kind="no_such_kind") == []
    for bad in ({"kind": "register or 1=1"}, {"exclude": "x" * 513}, {"kind": "a;b"}):
        assert httpx.get(f"{net.url}/events", params=bad).status_code == 422, bad


def test_dashboard_data_names_scores_audits_validators_and_checkpoints(
    net: Net, keys: dict[str, Keypair]
) -> None:
    """What the dashboard shows beyond /status: each miner's score and audits, each validator's verdicts (one that
    lost its standing marked), the latest verdicts, checkpoints and phases, and the epoch's progress."""
    net.join(*MINERS)
    for name in MINERS:
        forward_with_bytes(net, name, fill=0.5, loss=2.0 if name == "tail" else None)
    head, mid = keys["head"].ss58_address, keys["mid"].ss58_address
    now = net.clock()
    with net.orch.state.transaction():
        net.orch.state.add_verdict(now - 2, "val-a", head, 0, 0, True, 1, 1, {})
        net.orch.state.add_verdict(now - 1, "val-a", mid, 0, 1, False, 1, 1, {"audit_id": "x"})
        net.orch.state.add_verdict(now, "val-b", mid, 0, 1, True, 1, 1, {"confirms": "x"})

    data = httpx.get(f"{net.url}/dashboard/data").json()
    assert data["epoch"] == {"epoch": 0, "epochs": 1, "samples_done": 0, "samples_per_epoch": 4}
    assert set(data["miners"]) == {keys[name].ss58_address for name in MINERS}
    # Forward hops count as work; no confirmed failure, so every miner scores and the scores sum to 1.
    assert sum(m["score"] for m in data["miners"].values()) == pytest.approx(1.0)
    assert (data["miners"][head]["audits_passed"], data["miners"][head]["audits_failed"]) == (1, 0)
    assert (data["miners"][mid]["audits_passed"], data["miners"][mid]["audits_failed"]) == (1, 1)
    validators = {v["hotkey"]: v for v in data["validators"]}
    assert (validators["val-a"]["passed"], validators["val-a"]["failed"]) == (1, 1)
    assert validators["val-b"]["last_at"] == pytest.approx(now) and validators["val-b"]["standing"]
    assert [v["validator"] for v in data["verdicts"]] == ["val-b", "val-a", "val-a"]  # newest first
    assert [c["epoch"] for c in data["checkpoints"]] == [0]  # the seeded checkpoint, published at start
    assert data["checkpoint"] == net.clients["head"].status().checkpoint
    assert data["now"] == pytest.approx(net.clock(), abs=30)
