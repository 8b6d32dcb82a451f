"""Every field a peer sends is bounded (iota.protocol.bounds): through the real orchestrator, a signed body with any
one field out of bounds (a giant string, a huge dict or list, an integer past 64 bits, NaN or Infinity, a value of
the wrong type, a digest or hotkey of the wrong form) is a 422 that changes nothing, and no body at all, however
random, gets a 5xx. The bounds leave honest traffic room: a 15b-class run's largest messages validate and fit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bittensor.keyfiles import Keypair
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iota.checkpoint.manifest import stage_tensor_lists
from iota.merge import FlatRef, OuterConfig, Submitter, make_plan
from iota.model.config import preset
from iota.model.stages import plan_stages
from iota.orchestrator.abuse import AbuseConfig, AbusePolicy
from iota.orchestrator.app import MAX_BODY_BYTES
from iota.protocol import (
    AuditHop,
    AuditMerge,
    AuditTask,
    AuditVerdict,
    EpochPlan,
    MergeDone,
    MergeOrder,
    ModelInfo,
    PartitionDone,
    PhaseReport,
    Registration,
    Report,
    RunInfo,
    StageInfo,
    Status,
    WeightSketch,
    Work,
)
from iota.protocol.bounds import MAX_TEXT
from iota.storage.transfer import upload
from tests.security import MINERS, Net, report_for, serve_net

HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # a well-formed ss58 address
SHA = "ab" * 32
MD5 = "cd" * 16
SKETCH = {"norms": [1.5, 2.5], "projection": [0.25] * 8}

# Honest bodies with every field set, so that each can be spoilt: (signer, path, body). The orchestrator may
# refuse them for what they say (an unknown item, the wrong phase); never for their form.
PHASE_RESULTS: list[dict[str, Any]] = [
    {"kind": "upload", "norm": 1.5},
    {
        "kind": "merge",
        "partitions": {"0": {"digest": SHA, "sq_norms": {HOTKEY: 0.5}}},
        "failed": {"1": "previous state unreadable"},
    },
    {"kind": "apply"},
    {"kind": "snapshot_taken", "step": 3},
    {"kind": "snapshot", "step": 3},
]


def honest_bodies(run_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    version = {"protocol_version": 2}
    report = {
        **version,
        "run_id": run_id,
        "epoch": 0,
        "hop_id": 1,
        "inner_step": 2,
        "input_sha256": SHA,
        "output_sha256": SHA,
        "output_md5": MD5,
        "loss": 2.5,
        "tokens": 64,
        "sketch": SKETCH,
    }
    phase = {**version, "run_id": run_id, "epoch": 0, "inner_step": 2}
    phase |= {"input_sha256": SHA, "output_sha256": SHA, "output_md5": MD5}
    verdict = {
        **version,
        "audit_id": "a" * 32,
        "miner": HOTKEY,
        "epoch": 0,
        "stage": 1,
        "passed": False,
        "hops_replayed": 4,
        "depth": 2,
        "reason": "forward of sample 3: relative error 0.5",
        "errors": {"forward": 0.5, "sketch": 0.0},
    }
    return [
        ("head", "/miners/register", {**version, "device": "cpu", "memory_bytes": 1 << 34, "session": "s1"}),
        ("head", "/work", {**version, "forward": True, "hold_s": 0.0}),
        ("head", "/work/1/report", report),
        ("head", "/work/1/release?epoch=0", {**version, "reason": "stopping"}),
        *[("head", "/phase/report", {**phase, "result": result}) for result in PHASE_RESULTS],
        ("validator", "/validators/verdict", verdict),
    ]


# Values no bound admits, by the JSON type of the honest value they replace.
GIANT = "x" * (MAX_TEXT + 1)
BAD_BY_TYPE: dict[type, list[Any]] = {
    bool: ["maybe", 2],
    int: [2**63, -1, 0.5, "1x", [1]],
    float: [math.nan, math.inf, -math.inf, "1x", {"a": 1}],
    str: [GIANT, 7],
    type(None): [GIANT, math.nan],  # an optional field left out
}
# Forms that a length alone would not refuse.
BAD_FORMS = {
    "input_sha256": "AB" * 32,
    "output_sha256": "g" * 64,
    "output_md5": "ab" * 17,
    "digest": SHA[:-1],
    "miner": "not an ss58 address",
    "audit_id": "../../etc",
    "run_id": "a b",
}


def leased_report(net: Net) -> tuple[str, str, dict[str, Any]]:
    """The honest report of a forward the head holds now, its output uploaded: a spoilt copy of it would reach
    the database, where an unbounded integer cannot be stored."""
    work = net.work("head")
    out = net.activation(0.5)
    assert work.output_url
    upload(work.output_url, out)
    report = report_for(work, None, out, loss=2.5, inner_step=2, tokens=64, sketch=WeightSketch(**SKETCH))
    return "head", f"/work/{work.hop_id}/report", json.loads(report.model_dump_json())


def spoilt(body: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) for each field of `body` (and of what it nests) and each value that no bound admits there."""
    if isinstance(body, dict):
        for key, item in body.items():
            yield from spoilt(item, (*path, key))
        if path:
            first = next(iter(body.values()))
            many = min(
                10_000, 500_000 // len(json.dumps(first))
            )  # within the body limit, or it would be a 413
            yield path, {f"k{i}": first for i in range(many)}  # too many entries, or keys of the wrong form
            yield path, {GIANT: first}
            yield path, [first]
    elif isinstance(body, list):
        yield from spoilt(body[0], (*path, 0))
        yield path, [body[0]] * 70_000
        yield path, "1x"
    else:
        yield from ((path, bad) for bad in BAD_BY_TYPE[type(body)])
        if path[-1] in BAD_FORMS:
            yield path, BAD_FORMS[path[-1]]


def replaced(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(body) if isinstance(body, dict) else list(body)
    copy[head] = replaced(body[head], rest, value)
    return copy


def post(net: Net, signer: str, target: str, body: Any) -> int:
    path, _, query = target.partition("?")
    params = dict(p.split("=") for p in query.split("&")) if query else None
    return net.signed(signer, path, json.dumps(body).encode(), params).status_code


@pytest.fixture
def net(data_dir: Path, keypairs: dict[str, Keypair], tmp_path: Path) -> Iterator[Net]:
    # No limit on requests, no lease or miner timed out while hundreds are sent, no request for work held, and a
    # forward for the head whenever it asks.
    limits: dict[str, Any] = {
        "rate_per_hotkey": 1e6,
        "rate_per_ip": 1e6,
        "lease_s": 1e5,
        "miner_timeout_s": 1e6,
    }
    limits |= {"max_hold_s": 0, "samples_per_epoch": 10**6, "max_in_flight": 10**6}
    with serve_net(data_dir, keypairs, tmp_path, **limits) as net:
        # Hundreds of malformed bodies are hundreds of strikes: the policy that would ban has its own tests.
        net.orch.abuse = AbusePolicy(
            net.orch.state, net.orch.scheduler, AbuseConfig(throttle_at=10**9, ban_at=10**9)
        )
        net.join(*MINERS)
        yield net


def test_a_field_out_of_bounds_is_a_422_that_changes_nothing(net: Net) -> None:
    bodies = honest_bodies(net.orch.run.run_id)
    for signer, target, body in bodies:
        status = post(net, signer, target, body)
        assert status != 422 and status < 500, (target, status)
    leased = leased_report(net)
    bodies.append(leased)
    before = net.snapshot()
    wrong = []
    cases = 0
    for signer, target, body in bodies:
        for path, value in spoilt(body):
            cases += 1
            status = post(net, signer, target, replaced(body, path, value))
            if status != 422:
                wrong.append(f"{target} {'.'.join(map(str, path))} = {str(value)[:40]}: {status}")
    assert not wrong, f"{len(wrong)} of {cases} spoilt bodies were not refused with 422:\n" + "\n".join(
        wrong[:20]
    )
    assert cases > 300
    assert net.snapshot() == before
    assert post(net, *leased) == 200  # its lease held all along: the honest report is taken


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def hostile_bodies(draw: st.DrawFn, bodies: list[tuple[str, str, dict[str, Any]]]) -> tuple[str, str, Any]:
    """A route's honest body with one field (at any depth) replaced by random JSON, or random JSON outright."""
    signer, target, body = bodies[draw(st.integers(0, len(bodies) - 1))]  # the list may change meanwhile
    paths = [()] + sorted({path for path, _ in spoilt(body)}, key=str)
    path = draw(st.sampled_from(paths))
    return signer, target, replaced(body, path, draw(JSON))


def test_no_body_gets_a_5xx(net: Net) -> None:
    bodies = [*honest_bodies(net.orch.run.run_id), leased_report(net)]
    seen: list[int] = []

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=hostile_bodies(bodies))
    # An honest body, always: the spoilt draws alone reached a handler in most runs, not all.
    @example(case=bodies[0])
    def fuzz(case: tuple[str, str, Any]) -> None:
        signer, target, body = case
        status = post(net, signer, target, body)
        seen.append(status)
        assert status < 500, (target, body)
        if target == bodies[-1][1] and status == 200:
            bodies[-1] = leased_report(net)  # taken: the next report goes as deep with a new lease

    fuzz()
    assert 422 in seen and any(status != 422 for status in seen)  # both refused forms and handled ones


# -- honest traffic fits -----------------------------------------------------------------------------------------

S3_URL = "https://bucket.s3.us-east-1.amazonaws.com/" + "k" * 200 + "?" + "X-Amz-Signature=" + "f" * 1400


def test_a_large_runs_largest_messages_validate_and_fit() -> None:
    """A 15b-class run (5 stages, a 128k vocabulary), a stage of 256 replicas merged in 1024 partitions, 10,000
    data shards, an epoch of 2,000 hops per miner, a loss curve of 1.25M samples: each message validates, and
    what a miner or validator sends fits the orchestrator's body limit with room."""
    model = preset("15b", 128_256)
    stages = plan_stages(model.n_layers, 5)
    tensors = stage_tensor_lists(model, stages)
    shards = [{"file": f"shard-{i:06d}.bin", "sha256": SHA, "tokens": 10**8} for i in range(10_000)]
    run = RunInfo(
        run_id="run-15b",
        orchestrator_hotkey=HOTKEY,
        model=ModelInfo.model_validate(model.to_dict()),
        stages=[
            StageInfo(index=s.index, first_layer=s.first_layer, last_layer=s.last_layer, n_params=10**10)
            for s in stages
        ],
        data={"seq_len": model.seq_len, "shards": shards},
        schedule={"peak_lr": 3e-4, "warmup_tokens": 10**9, "total_tokens": 10**12},
        micro_batch=8,
        accumulate=4,
        optimizer="adamw",
        weight_decay=0.1,
        clip=1.0,
        wire_dtype="bf16",
        seed=2**62,
    )
    assert RunInfo.model_validate_json(run.model_dump_json()) == run
    urls = {shard["file"]: S3_URL for shard in shards}
    Registration(
        hotkey=HOTKEY, stage=4, epoch=10**6, checkpoint_url=S3_URL, checkpoint_sha256=SHA, data_urls=urls,
        heartbeat_s=7.5, state_id="f" * 32,
    )  # fmt: skip

    widest = max(len(t) for t in tensors)
    report = Report(
        run_id="run-15b", epoch=10**6, hop_id=2**62, inner_step=10**9, input_sha256=SHA, output_sha256=SHA,
        output_md5=MD5, loss=2.5, tokens=2**40, sketch=WeightSketch(norms=[1.0] * widest, projection=[0.5] * 8),
    )  # fmt: skip
    assert len(report.model_dump_json()) < MAX_BODY_BYTES / 100

    hotkeys = sorted(f"5{i:047d}".replace("0", "A") for i in range(256))
    plan = make_plan(
        run="run-15b",
        epoch=10**6,
        stage=2,
        n_params=3 * 10**9,
        n_partitions=1024,
        submitters=[
            Submitter(hotkey=h, upload_key=f"runs/x/{h}", weight=100.0, claimed_norm=3.0) for h in hotkeys
        ],
        prev_weights=[FlatRef(key="runs/x/weights")] * 1024,
        outer=OuterConfig(lr=0.7, momentum=0.9),
    )
    mine = plan.partitions_of(hotkeys[0])
    gets = {s.upload_key: S3_URL for s in plan.submitters} | {
        f"runs/x/momentum/{i}": S3_URL for i in range(1024)
    }
    puts = {f"runs/x/merged/{i}/{kind}": S3_URL for i in mine for kind in ("weights", "momentum")}
    plan_json = plan.model_dump(mode="json")
    MergeOrder(plan=plan_json, get=gets, put=puts)
    done = MergeDone(
        partitions={i: PartitionDone(digest=SHA, sq_norms={h: 0.25 for h in hotkeys}) for i in mine},
        failed={},
    )
    body = PhaseReport(run_id="run-15b", epoch=10**6, inner_step=10**9, result=done, output_sha256=SHA)
    assert len(body.model_dump_json()) < MAX_BODY_BYTES / 2

    hop = AuditHop(
        direction="forward", sample_id=2**40, inner_step=10**9, input_url=S3_URL, input_sha256=SHA,
        output_url=S3_URL, output_sha256=SHA, loss=2.5,
    )  # fmt: skip
    AuditTask(
        audit_id="a" * 32, run_id="run-15b", miner=HOTKEY, stage=2, epoch=10**6, bf16=True, checkpoint_url=S3_URL,
        checkpoint_sha256=SHA, plan=EpochPlan(epoch=10**6, tokens_at_start=10**12, replicas=256),
        hops=[hop] * 2000, data_urls=urls,
        merge=AuditMerge(plan=plan_json, digests=dict.fromkeys(mine, SHA), urls=gets | puts,
                         upload_shas={s.upload_key: SHA for s in plan.submitters}),
    )  # fmt: skip
    reason = "; ".join(
        [f"forward of sample {i}: relative error 0.5 over 1e-3 at element 1234567" for i in range(3)]
        + [f"merge: partition {i} differs from the owner's digest {SHA}" for i in range(64)]
    )
    verdict = AuditVerdict(
        audit_id="a" * 32, miner=HOTKEY, epoch=10**6, stage=2, passed=False, hops_replayed=2000, depth=500,
        reason=reason, errors={k: 0.5 for k in ("forward", "backward", "sketch", "pseudo_gradient", "merge")},
    )  # fmt: skip
    assert len(verdict.model_dump_json()) < MAX_BODY_BYTES / 100
    Status.model_validate(
        {
            "run_id": "run-15b", "epoch": 10**6, "phase": "train", "paused": False, "stages": [],
            "tokens_trained": 2 * 10**13, "samples_completed": 1_250_000, "samples_in_flight": 4096,
            "samples_requeued": 10**6, "samples_lost": 0, "latest_loss": 2.5,
            "loss_curve": [(i * 16_384, 2.5) for i in range(1_250_000)], "bytes_transferred": 2**52,
            "checkpoint": "runs/run-15b/checkpoints/1000000/manifest.json",
        }
    )  # fmt: skip
    Work(
        kind="backward", run_id="run-15b", epoch=10**6, stage=2, plan=EpochPlan(epoch=1, tokens_at_start=0, replicas=1),
        hop_id=2**62, sample_id=2**40, input_url=S3_URL, input_sha256=SHA, input_shape=[8, 2048, 5120],
        output_url=S3_URL, output_size=2**30, lease_expires=2e9, holding=list(range(4096)),
    )  # fmt: skip
