"""Every tensor a role receives is checked before use: the miner's forward input and backward gradient, the merge's
uploaded slices and merged outputs, and checkpoints pulled from the bucket or read from disk. Each receiving path
gets hostile bytes and must refuse them with a reason, never compute with them."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from iota.chain.local import LocalChain
from iota.checkpoint import CheckpointError, load_checkpoint, pull_checkpoint
from iota.merge import DictStore, FlatRef, Submitter, apply_merged, make_plan, merge_partition
from iota.merge import partition_bounds as bounds_of
from iota.miner.hops import release_reason
from iota.model import wire
from iota.model.flat import encode_f32
from iota.orchestrator.assembly import assemble
from iota.storage import LocalStore, keys
from iota.train.run import Run, batch_fn, build_run
from iota.train.worker import NonFiniteOutput, StageWorker, TrainFlags
from tests.orchestrator import run_settings

WIRE = torch.float32  # the run_settings' wire dtype


@pytest.fixture(scope="module")
def run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return build_run(run_settings(data_dir, tmp_path_factory.mktemp("run")))


def worker(run: Run, stage: int) -> StageWorker:
    s = run.settings
    flags = TrainFlags(s.micro_batch, 1, "sgd", 0.0, 0.0, WIRE)
    return StageWorker(
        run.model,
        run.stages[stage],
        s.seed,
        flags,
        batch_fn(run.data, s.micro_batch),
        torch.device("cpu"),
        False,
        4,
    )


def hostile_payloads(shape: tuple[int, ...]) -> dict[str, tuple[bytes, str]]:
    """Bytes a hostile neighbour could upload instead of an activation of `shape`, with the refusal's words."""
    good = torch.randn(shape)
    nan, inf, huge = good.clone(), good.clone(), good.clone()
    nan[0, 0, 0] = float("nan")
    inf[-1, -1, -1] = float("inf")
    huge[0, -1, 0] = (
        3e38  # finite, but it overflows in the receiver's compute: an honest stage then sends Inf
    )
    valid = wire.encode(good, WIRE)
    header_len = struct.unpack("<Q", valid[:8])[0]
    lying = json.loads(valid[8 : 8 + header_len])
    lying["t"]["data_offsets"][1] *= 2  # claims twice the data that follows (same number of digits here)
    lying_header = json.dumps(lying, separators=(",", ":")).ljust(header_len).encode()  # same length
    return {
        "wrong shape": (wire.encode(torch.randn(shape[1], shape[0], shape[2]), WIRE), "expected shape"),
        "fewer values": (wire.encode(torch.randn(shape[0], shape[1] - 1, shape[2]), WIRE), "expected shape"),
        "wrong dtype": (wire.encode(good, torch.bfloat16), "expected dtype F32"),
        "NaN": (wire.encode(nan, WIRE), "NaN or Inf"),
        "Inf": (wire.encode(inf, WIRE), "NaN or Inf"),
        "finite but near the float maximum": (wire.encode(huge, WIRE), "beyond"),
        "oversized": (wire.encode(torch.randn(shape[0] * 4, *shape[1:]), WIRE), "more than the"),
        "truncated": (valid[:-16], "truncated or padded"),
        "padded": (valid + b"\0" * 8, "more than the"),
        "pickle": (b"\x80\x04\x95" + b"\0" * (len(valid) - 3), "pickle"),
        "torch.save zip": (b"PK\x03\x04" + b"\0" * (len(valid) - 4), "zip archive"),
        "header lies": (
            struct.pack("<Q", len(lying_header)) + lying_header + valid[8 + header_len :],
            "needs",
        ),
        "extra tensor": (safetensors.torch.save({"t": good[:1], "u": torch.zeros(1)}), "unexpected ['u']"),
        "not bytes at all": (b"\xff" * 7, "too short"),
        # Exactly an activation's size (so it passes the size and digest checks), headers nested deep: the first
        # raised RecursionError in json.loads, which killed the next stage's miner.
        "header nested 2,000 deep": (exact_size(b"[" * 2000 + b"]" * 2000, len(valid)), "does not fit"),
        "header nested 500 deep": (exact_size(b"[" * 500 + b"]" * 500, len(valid)), "nested deeper"),
        "NaN in the header": (
            exact_size(b'{"t":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}', len(valid)),
            "NaN",
        ),
    }


def exact_size(header: bytes, size: int) -> bytes:
    """A payload of `size` bytes (zero-padded) whose header is `header`."""
    return (struct.pack("<Q", len(header)) + header).ljust(size, b"\0")


def assert_refused(call: Callable[[], object], words: str) -> None:
    with pytest.raises(wire.WireError) as refusal:
        call()
    assert words in str(refusal.value), str(refusal.value)


# -- the miner ---------------------------------------------------------------------------------------------


def test_forward_input_is_checked_before_the_stage_runs(run: Run) -> None:
    for stage in (1, 2):  # a middle stage keeps a graph, the tail computes a loss
        miner = worker(run, stage)
        before = miner.flat_weights()
        for case, (payload, words) in hostile_payloads(miner.act_shape).items():
            assert_refused(lambda m=miner, p=payload: m.forward(0, p), words)  # type: ignore[misc]
            assert not miner.cache and miner.micro_batches == 0, case
            # A refused input takes no slot of the accumulation window: k of them must not stop this miner from
            # taking forward work until the epoch ends.
            assert miner.window_forwards == 0 and miner.wants_forward(), case
        assert torch.equal(miner.flat_weights(), before)
        out, loss = miner.forward(
            0, wire.encode(torch.randn(miner.act_shape), WIRE)
        )  # and honest input works
        assert len(out) == miner.max_bytes and (loss is not None) == (stage == 2)


def test_backward_gradient_is_checked_before_backpropagation(run: Run) -> None:
    miner = worker(run, 1)
    honest_input = wire.encode(torch.randn(miner.act_shape), WIRE)
    for case, (payload, words) in hostile_payloads(miner.act_shape).items():
        miner.forward(7, honest_input)
        assert_refused(lambda payload=payload: miner.backward(7, payload), words)  # type: ignore[misc]
        assert miner.micro_batches == 0, case  # nothing was accumulated
        params = [p.grad for p in miner.model.parameters()]
        assert all(g is None or not g.any() for g in params), case
    miner.forward(7, honest_input)
    assert miner.backward(7, wire.encode(torch.randn(miner.act_shape), WIRE)) is not None


def test_a_non_finite_output_is_never_sent_and_accuses_nobody(run: Run) -> None:
    """Whatever drives a stage's output to Inf (here its own weights), the output is refused before it is encoded:
    the next stage would otherwise refuse it and the orchestrator, finding the object really undecodable, would
    strike this miner for what its input did."""
    for stage in (1, 2):
        miner = worker(run, stage)
        with torch.no_grad():
            next(miner.model.parameters()).mul_(1e38)
        with pytest.raises(NonFiniteOutput):
            miner.forward(0, wire.encode(torch.randn(miner.act_shape), WIRE))
        assert release_reason(NonFiniteOutput("x")) == "failed"


# -- the merge ---------------------------------------------------------------------------------------------


def test_merge_skips_unusable_uploads_and_refuses_bad_merged_slices() -> None:
    n, parts = 1000, 4
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(n, generator=gen)
    honest = torch.randn(n, generator=gen) * 0.01
    poisoned = honest.clone()
    poisoned[3] = float("nan")
    store = DictStore()
    store.put("start", encode_f32(start))
    uploads = {
        "honest": encode_f32(honest),
        "nan": encode_f32(poisoned),
        "short": encode_f32(honest)[:-4],
        "long": encode_f32(honest) + b"\0\0\0\0",
        "not floats": b"\x80\x04\x95pickle",
    }
    for name, data in uploads.items():
        store.put(f"up/{name}", data)
    submitters = [Submitter(hotkey=h, upload_key=f"up/{h}", weight=1.0, claimed_norm=1.0) for h in uploads]
    refs = [FlatRef(key="start")] * len(bounds_of(n, parts))
    plan = make_plan(
        run="r", epoch=1, stage=0, n_params=n, n_partitions=parts, submitters=submitters, prev_weights=refs
    )
    result = merge_partition(store, plan, 0, start[: plan.partitions[0].end], None)
    assert result.used == ["honest"]
    assert "non-finite" in result.skipped["nan"]
    for name in ("short", "long", "not floats"):
        assert "wrong size" in result.skipped[name], result.skipped
    assert bool(torch.isfinite(result.weights).all())

    # Applying: a merged slice that is non-finite or of the wrong size is refused; last epoch's values stay.
    p0 = plan.partitions[0]
    bad_slice = torch.full((p0.size,), float("inf"))
    store.put("merged/0", encode_f32(bad_slice))
    store.put("merged/1", b"\0" * 12)
    applied = apply_merged(store, plan, {0: "merged/0", 1: "merged/1"}, previous=start)
    assert torch.equal(applied, start)


# -- checkpoints -------------------------------------------------------------------------------------------


@pytest.fixture
def published(data_dir: Path, tmp_path: Path, keypairs: dict) -> tuple[LocalStore, Run]:
    """Checkpoint 0, published in a LocalStore by a real orchestrator."""
    chain = LocalChain(tmp_path / "chain.json")
    store = LocalStore(tmp_path / "store", "http://127.0.0.1:9/storage", b"s" * 32)
    settings = run_settings(data_dir, tmp_path / "run")
    assembled = assemble(
        settings, chain, keypairs["orchestrator"].ss58_address, store=store, local_store=store
    )
    return store, assembled.run


def test_checkpoint_pull_refuses_tampered_flats(published: tuple[LocalStore, Run], tmp_path: Path) -> None:
    store, run = published
    run_id, tokenizer_dir = run.settings.run_id, run.prepared.directory
    key = keys.checkpoint_stage(run_id, 0, 1)
    honest = store.get(key)
    tampered = {
        "truncated": (honest[:-4], "holds"),
        "extended": (honest + b"\0" * 4, "holds"),
        "replaced": (encode_f32(torch.full((len(honest) // 4,), float("nan"))), "corrupted or overwritten"),
    }
    for case, (data, words) in tampered.items():
        store.put(key, data)
        with pytest.raises(CheckpointError, match=words):
            pull_checkpoint(store, run_id, 0, tmp_path / case, tokenizer_dir)
        assert not (tmp_path / case / "manifest.json").exists(), case
    store.put(key, honest)
    assert load_checkpoint(pull_checkpoint(store, run_id, 0, tmp_path / "good", tokenizer_dir)).epoch == 0


def test_checkpoint_load_refuses_tampered_files(published: tuple[LocalStore, Run], tmp_path: Path) -> None:
    store, run = published
    directory = pull_checkpoint(store, run.settings.run_id, 0, tmp_path / "ckpt", run.prepared.directory)
    path = directory / "stage-1.safetensors"
    honest = safetensors.torch.load_file(str(path))
    name = sorted(honest)[0]
    cases = {
        "fp16 weights": ({**honest, name: honest[name].half()}, "are not float32"),
        "wrong shape": ({**honest, name: torch.zeros(3, 3)}, "tensors differ"),
        "extra tensor": ({**honest, "backdoor": torch.zeros(1)}, "unexpected ['backdoor']"),
        "changed values": ({**honest, name: honest[name] + 1}, "sha256 of the weights"),
    }
    for state, words in cases.values():
        safetensors.torch.save_file(state, str(path))
        with pytest.raises(CheckpointError, match=words.replace("[", r"\[").replace("]", r"\]")):
            load_checkpoint(directory)
    path.write_bytes(b"\x80\x04\x95" + np.zeros(64, dtype=np.uint8).tobytes())  # a pickle is not read
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(directory)


def test_checkpoint_load_refuses_non_finite_weights_with_a_matching_manifest(
    published: tuple[LocalStore, Run], tmp_path: Path
) -> None:
    store, run = published
    directory = pull_checkpoint(store, run.settings.run_id, 0, tmp_path / "ckpt", run.prepared.directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    path = directory / "stage-1.safetensors"
    state = safetensors.torch.load_file(str(path))
    name = sorted(state)[0]
    state[name][0] = float("nan")
    from iota.model.flat import sha256 as flat_sha256

    entry = next(e for e in manifest["stages"] if e["file"] == path.name)
    entry["sha256"] = flat_sha256(state)  # a consistent checkpoint that someone made from NaN weights
    safetensors.torch.save_file(state, str(path))
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="finite|NaN"):
        load_checkpoint(directory)


def test_a_refused_gradient_leaves_the_forward_graph_for_the_honest_one(run: Run) -> None:
    """A hostile next-stage miner's bad gradient should not cost this miner the sample's cached forward."""
    miner = worker(run, 1)
    miner.forward(3, wire.encode(torch.randn(miner.act_shape), WIRE))
    with pytest.raises(wire.WireError):
        miner.backward(3, b"\x80\x04\x95 not a tensor")
    assert miner.backward(3, wire.encode(torch.randn(miner.act_shape), WIRE)) is not None
