"""A miner writes only the key issued to it, with the size expected, while its URL lives; it reads only what its
work item names. End to end on LocalStore (real server, real signatures), and on S3 by re-signing our URLs."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from bittensor.keyfiles import Keypair

from iota.chain.local import LocalChain
from iota.model import wire
from iota.orchestrator.assembly import assemble
from iota.protocol import AuditTask, RegisterRequest
from iota.storage import S3Store, keys
from iota.storage.transfer import download, upload
from tests.orchestrator import run_settings
from tests.security import MINERS, Net, report_for, serve_net
from tests.storage.test_s3 import signature_holds
from tests.support.s3 import S3Bucket


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    with serve_net(data_dir, keypairs, tmp_path) as net:
        yield net


def repoint(url: str, key: str) -> str:
    """The same signed query on another object's path: what a miner tries to reach a key it was not issued."""
    parts = urlsplit(url)
    prefix = parts.path.split("/objects/")[0]
    return urlunsplit(parts._replace(path=f"{prefix}/objects/{quote(key, safe='/')}"))


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def put(url: str, data: bytes, **headers: str) -> httpx.Response:
    return httpx.put(url, content=data, headers=headers)


def object_of(net: Net, key: str) -> bytes | None:
    return net.store.get(key) if net.store.head(key) is not None else None


def other_keys(net: Net) -> dict[str, str]:
    """Objects a hostile miner would love to overwrite or read: weights, data, someone else's activation."""
    run_id = net.run.settings.run_id
    shard = net.run.plan.shards[0].file
    return {
        "checkpoint": keys.checkpoint_stage(run_id, 0, 0),
        "data shard": keys.data_shard(run_id, shard),
        "another sample": keys.activation(run_id, 0, 99, 0, "forward", 7),
    }


# -- writes ------------------------------------------------------------------------------------------------


def test_put_url_writes_only_its_own_key(net: Net) -> None:
    mid, _ = net.lease_at(1)  # the head's output is now the mid's input, in the bucket
    head = net.work("head")  # a second sample: the head holds a PUT URL again
    assert head.output_url and mid.output_url and mid.input_url
    hops = {h.id: h for h in (net.orch.state.hop(head.hop_id or 0), net.orch.state.hop(mid.hop_id or 0))}
    head_key, mid_key = (hops[w.hop_id or 0].output_key for w in (head, mid))  # type: ignore[union-attr]
    input_key = net.orch.state.hop(mid.hop_id or 0).input_key  # type: ignore[union-attr]
    assert head_key and mid_key and input_key and len({head_key, mid_key, input_key}) == 3
    targets = {**other_keys(net), "the other miner's output": mid_key, "the input it was given": input_key}
    before = {name: object_of(net, key) for name, key in targets.items()}
    payload = net.activation(9.0)

    for name, key in targets.items():
        response = put(repoint(head.output_url, key), payload)
        assert response.status_code == 403, (name, response.text)
        assert "signature does not match" in response.json()["detail"]
    # Its GET URL does not write either, not even the object it names.
    response = put(with_query(mid.input_url, method="PUT", size=str(len(payload))), payload)
    assert response.status_code == 403
    assert {name: object_of(net, key) for name, key in targets.items()} == before

    upload(head.output_url, payload)  # the key it was issued takes the upload
    assert object_of(net, head_key) == payload  # type: ignore[arg-type]


def test_put_url_takes_exactly_the_expected_size(net: Net) -> None:
    net.join(*MINERS)
    work = net.work("head")
    assert work.output_url and work.output_size == net.orch.limits.activation_bytes
    key = net.orch.state.hop(work.hop_id or 0).output_key  # type: ignore[union-attr]
    assert key is not None
    good = net.activation(1.0)
    for body in (good + b"\0" * 4096, good[:-1], b""):
        response = put(work.output_url, body)
        assert response.status_code == 403, response.text
        assert "differs from the signed size" in response.json()["detail"]
    # Claiming the right size in the URL's query does not help: the size is signed.
    response = put(with_query(work.output_url, size=str(len(good) + 4096)), good + b"\0" * 4096)
    assert response.status_code == 403 and "signature does not match" in response.json()["detail"]
    # Chunked (no Content-Length) is refused before a byte is read.
    response = httpx.put(work.output_url, content=iter([good, b"\0" * 4096]))
    assert response.status_code == 411
    assert net.store.head(key) is None

    # A body longer than its Content-Length is cut at Content-Length by HTTP itself: the rest is not stored.
    host, port = urlsplit(net.url).hostname, urlsplit(net.url).port
    target = work.output_url.split(str(port), 1)[1]
    with socket.create_connection((host or "127.0.0.1", port or 80), timeout=5) as raw:
        head = f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(good)}\r\n\r\n".encode()
        raw.sendall(head + good + b"EXTRA BYTES THAT ARE NOT PART OF THE OBJECT")
        assert raw.recv(1024).startswith(b"HTTP/1.1 200")
    assert net.store.get(key) == good


def test_urls_expire(net: Net) -> None:
    mid, _ = net.lease_at(1)
    assert mid.output_url and mid.input_url
    net.clock.offset += net.run.settings.url_ttl_s + 1
    response = put(mid.output_url, net.activation(1.0))
    assert response.status_code == 403 and "expired" in response.json()["detail"]
    response = httpx.get(mid.input_url)
    assert response.status_code == 403 and "expired" in response.json()["detail"]


def test_an_old_lease_url_writes_where_nobody_reads(net: Net) -> None:
    """Within its lifetime, the URL of a lease that expired still writes, but only its own key: the new lease
    has another one, and the report of the new holder is checked against that."""
    old, data = net.lease_at(1)
    assert old.output_url
    net.clock.offset += net.run.settings.lease_s + 1
    net.orch.sweep(net.clock())
    new = net.work("mid")
    assert new.hop_id == old.hop_id and new.output_url and new.output_url != old.output_url
    new_key = net.orch.state.hop(new.hop_id or 0).output_key  # type: ignore[union-attr]
    upload(old.output_url, net.activation(7.0))  # a late writer under the old lease
    assert net.store.head(new_key or "") is None
    out = net.activation(1.0)
    upload(new.output_url, out)
    net.clients["mid"].report(report_for(new, data, out))
    assert net.orch.state.hop(new.hop_id or 0).output_sha == report_for(new, data, out).output_sha256  # type: ignore[union-attr]


# -- reads -------------------------------------------------------------------------------------------------


def test_get_reaches_only_what_the_item_names(net: Net) -> None:
    mid, data = net.lease_at(1)
    assert mid.input_url and mid.output_url
    # The work item carries exactly two URLs: a GET of its input and a PUT of its output.
    urls = [v for v in mid.model_dump().values() if isinstance(v, str) and v.startswith("http")]
    assert sorted(urls) == sorted([mid.input_url, mid.output_url])
    assert parse_qs(urlsplit(mid.input_url).query)["method"] == ["GET"]

    secret_key = keys.activation(net.run.settings.run_id, 0, 0, 2, "backward", 1)
    net.store.put(secret_key, b"an object that no item of this miner names")
    targets = {**other_keys(net), "unnamed activation": secret_key}
    for name, key in targets.items():
        response = httpx.get(repoint(mid.input_url, key))
        assert response.status_code == 403, (name, response.text)
    # Forging a URL fails: a made-up signature, one signed by another secret, the PUT grant used for GET.
    sig = parse_qs(urlsplit(mid.input_url).query)["sig"][0]
    forged = {
        "random signature": with_query(repoint(mid.input_url, secret_key), sig="0" * len(sig)),
        "signature of another secret": with_query(
            repoint(mid.input_url, secret_key),
            sig=type(net.store)(net.store.root, net.store.base_url, b"x" * 32).signature(
                "GET", secret_key, int(parse_qs(urlsplit(mid.input_url).query)["expires"][0]), None
            ),
        ),
        "put grant as get": with_query(mid.output_url, method="GET"),
        "longer expiry": with_query(mid.input_url, expires=str(int(net.clock()) + 10**6)),
    }
    for name, url in forged.items():
        response = httpx.get(url)
        assert response.status_code == 403, (name, response.text)
    assert download(mid.input_url, mid.input_sha256, 1 << 24) == data  # its own input it can read


def test_a_validator_reads_only_what_its_audit_names(net: Net) -> None:
    net.join(*MINERS)
    net.forward("head", fill=0.5)  # one committed hop: the only work there is to audit
    response = net.signed("validator", "/validators/audit")
    assert response.status_code == 200, response.text
    task = AuditTask.model_validate_json(response.content)
    assert task.miner == net.keys["head"].ss58_address
    (hop,) = net.orch.state.done_hops(task.miner, 0, 100)
    run_id = net.run.settings.run_id
    named = {hop[4], hop[6], keys.checkpoint_stage(run_id, 0, 0)} - {None}
    named |= {keys.data_shard(run_id, s.file) for s in net.run.plan.shards}
    urls = [task.checkpoint_url, *task.data_urls.values()]
    urls += [u for h in task.hops for u in (h.input_url, h.output_url) if u]
    for url in urls:  # read grants only, each for an object the audit names
        query = parse_qs(urlsplit(url).query)
        assert query["method"] == ["GET"] and "size" not in query
        assert urlsplit(url).path.split("/objects/", 1)[1] in named
        assert httpx.get(url).status_code == 200
        assert put(with_query(url, method="PUT", size="4"), b"evil").status_code == 403
    for name, key in other_keys(net).items():
        if key not in named:
            assert httpx.get(repoint(task.checkpoint_url, key)).status_code == 403, name


# -- S3: what our presigned URLs sign ---------------------------------------------------------------------


def test_s3_urls_sign_the_item_key_its_size_and_lifetime(
    data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    chain = LocalChain(tmp_path / "chain.json")
    for name in MINERS:
        chain.register(keypairs[name].ss58_address, keypairs["cold"].ss58_address)
    settings = run_settings(data_dir, tmp_path / "run", store="s3", url_ttl_s=120)
    store = S3Store(**s3_bucket.store_kwargs())
    orch = assemble(settings, chain, keypairs["orchestrator"].ss58_address, store=store).orchestrator
    hotkeys = {name: keypairs[name].ss58_address for name in MINERS}
    for name in MINERS:
        orch.register(
            hotkeys[name], RegisterRequest(device="cpu", memory_bytes=1 << 34, session=uuid.uuid4().hex)
        )

    head = orch.work(hotkeys["head"])
    hop = orch.state.hop(head.hop_id or 0)
    assert hop is not None and hop.output_key and head.output_url
    size = str(orch.limits.activation_bytes)
    query = {k: v[0] for k, v in parse_qs(urlsplit(head.output_url).query).items()}
    assert urlsplit(head.output_url).path == f"/{s3_bucket.bucket}/{hop.output_key}"
    assert query["X-Amz-Expires"] == "120"
    # Written once: S3 takes the PUT only with "If-None-Match: *", and then refuses it where an object is.
    assert set(query["X-Amz-SignedHeaders"].split(";")) == {"content-length", "host", "if-none-match"}
    once = {"content-length": size, "if-none-match": "*"}
    assert signature_holds(head.output_url, "PUT", once, s3_bucket)
    assert not signature_holds(head.output_url, "PUT", {"content-length": size}, s3_bucket)  # an overwrite
    assert not signature_holds(
        head.output_url, "PUT", {**once, "content-length": str(int(size) + 1)}, s3_bucket
    )
    assert not signature_holds(head.output_url, "GET", {}, s3_bucket)
    for key in (
        keys.checkpoint_stage(settings.run_id, 0, 0),
        keys.activation(settings.run_id, 0, 9, 0, "forward", 9),
    ):
        moved = urlunsplit(urlsplit(head.output_url)._replace(path=f"/{s3_bucket.bucket}/{key}"))
        assert not signature_holds(moved, "PUT", once, s3_bucket)
    longer = _s3_query(head.output_url, **{"X-Amz-Expires": "604800"})
    assert not signature_holds(longer, "PUT", once, s3_bucket)

    # The next stage's item: a GET of exactly the head's output, and a PUT of its own.
    out = b"\0" * orch.limits.activation_bytes
    store.put(hop.output_key, out)
    orch.report(hotkeys["head"], hop.id, report_for(head, None, out))
    mid = orch.work(hotkeys["mid"])
    assert mid.input_url and urlsplit(mid.input_url).path == f"/{s3_bucket.bucket}/{hop.output_key}"
    assert mid.input_sha256 == wire.sha256(out)
    assert signature_holds(mid.input_url, "GET", {}, s3_bucket)
    assert not signature_holds(mid.input_url, "PUT", {"content-length": size}, s3_bucket)
    elsewhere = urlunsplit(
        urlsplit(mid.input_url)._replace(path=f"/{s3_bucket.bucket}/runs/{settings.run_id}/x")
    )
    assert not signature_holds(elsewhere, "GET", {}, s3_bucket)


def _s3_query(url: str, **changes: Any) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))
