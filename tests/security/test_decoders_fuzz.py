"""Every decoder of peer bytes is total: for any input, random bytes or a valid encoding mutated (headers nested
thousands deep or 120 KB long, shapes of 2**40 values, unknown dtypes, offsets past the end, truncations, NaN in a
header or a body), it returns what was encoded or raises DecodeError, never RecursionError, MemoryError,
OverflowError, KeyError or a library's own error: hostile bytes are refused, and the process that got them lives.

Property-based (hypothesis), derandomized so that every run tries the same cases; each decoder gets random bytes and
structured mutations of its own valid encoding. The explicit regressions at the end are the cases that were seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iota.audit import ReplaySetup
from iota.audit.adversaries import synthetic_batch
from iota.audit.judge import decode_challenged, decode_pseudo_gradient
from iota.audit.records import HopRecord, decode_records, encode_records
from iota.checkpoint.manifest import (
    CheckpointError,
    bucket_manifest,
    load_manifest,
    parse_manifest,
    stage_tensor_lists,
)
from iota.data.plan import DataPlan, ShardInfo, TokenData
from iota.decoding import DecodeError, load_json
from iota.merge import DictStore, FlatRef, Submitter, apply_merged, make_plan, read_slice
from iota.model import wire
from iota.model.config import ModelConfig
from iota.model.flat import decode_f32, encode_f32
from iota.model.stages import plan_stages
from iota.train.schedule import LRSchedule
from iota.train.snapshot import Snapshot, decode_snapshot, encode_snapshot, snapshot_to_f32, take_snapshot
from iota.train.worker import StageWorker, TrainFlags

FUZZ = settings(
    max_examples=40,  # per decoder and input kind: the whole file runs in ~10 s on a loaded 2-core box
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

T = TypeVar("T")

# A stage of a tiny model: what a snapshot, a challenged snapshot and a pseudo-gradient describe.
CONFIG = ModelConfig(vocab_size=64, hidden=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn=32, seq_len=8)
SPEC = plan_stages(CONFIG.n_layers, 2)[1]
FLAGS = TrainFlags(1, 1, "adamw", 0.0, 1.0, torch.float32)
SCHEDULE = LRSchedule(1e-3, warmup_tokens=1, total_tokens=1 << 20)
SETUP = ReplaySetup(CONFIG, SPEC, 0, FLAGS, synthetic_batch(64, 1, 8), SCHEDULE, 0, 1)
WORKER = StageWorker(CONFIG, SPEC, 0, FLAGS, SETUP.batch, torch.device("cpu"), False, 2)

SHAPE = (2, 3, 4)  # an activation
DTYPE = torch.float32
ACTIVATION = wire.encode(torch.arange(24, dtype=DTYPE).reshape(SHAPE) / 7, DTYPE)
LIMIT = wire.encoded_size(SHAPE, DTYPE)


def refused_or(call: Callable[[], T], check: Callable[[T], None]) -> None:
    """The decoder's answer passes `check`, or it is a DecodeError; anything else fails the test."""
    try:
        value = call()
    except DecodeError:
        return
    check(value)


def split(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + length]), payload[8 + length :]


def assemble(header: bytes, body: bytes, size: int | None = None) -> bytes:
    """A safetensors-shaped payload; with `size`, cut or zero-padded to exactly that many bytes (what a sender
    does to pass a receiver's exact-size check and its digest)."""
    payload = struct.pack("<Q", len(header)) + header + body
    return payload if size is None else payload[:size].ljust(size, b"\0")


# -- strategies ----------------------------------------------------------------------------------------------

# JSON text a hostile header might hold where a value belongs: NaN and friends, numbers beyond any int64 and
# beyond int()'s 4,300 digits, wrong types, and values of the right type but wrong.
HOSTILE_TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e999", "-0", "1.5", "1" * 5000, "null", "true", "[]", "{}", '""',
    str(2**40), str(2**64), str(2**64 + 1), "-1", '"F32"', '"BF16"', '"BOOL"', '"F8_E4M3"', '"U8"', '"I64"',
    "[1099511627776]", "[1048576,1048576]", "[0,4398046511104]", "[96,0]", "[0,96,192]", '["0","96"]',
    "[[[[1]]]]", "[2,3,4]", "[4,3,2]", "[0,96]", "[0,1000]", "[-1,95]", "[1,97]", "[2,3,4,1,1,1,1,1,1,1]",
]  # fmt: skip
json_token = st.one_of(
    st.sampled_from(HOSTILE_TOKENS),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.lists(st.integers(min_value=-3, max_value=2**41), max_size=9).map(json.dumps),
    st.text(max_size=8).map(json.dumps),
)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """JSON nested up to 3,000 deep, in arrays, objects or both."""
    depth = draw(st.integers(min_value=1, max_value=3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"a":', "}]")]))
    return opener * depth + "1" * draw(st.booleans()) + closer * depth


@st.composite
def header_text(draw: st.DrawFn, entry: dict[str, Any]) -> bytes:
    """A header for the tensor `t` with one thing wrong (or nothing): a field, an extra entry, metadata, nesting,
    a duplicate key, padding, or JSON that is not JSON."""
    fields = {name: json.dumps(value) for name, value in entry.items()}
    kind = draw(st.sampled_from(["field", "extra", "metadata", "nested", "duplicate", "padding", "garbage"]))
    if kind == "field":
        fields[draw(st.sampled_from(sorted(fields)))] = draw(json_token)
    body = ",".join(f'"{name}":{value}' for name, value in fields.items())
    text = "{" + f'"t":{{{body}}}'
    if kind == "extra":
        text += f',"{draw(st.text(max_size=6))}":{draw(st.one_of(json_token, nested()))}'
    elif kind == "metadata":
        metadata = draw(st.one_of(json_token, nested(), st.just('{"a":1}')))
        text += f',"__metadata__":{metadata}'
    elif kind == "nested":
        text += f',"deep":{draw(nested())}'
    elif kind == "duplicate":
        text += f',"t":{{{body}}}'
    text += "}"
    if kind == "padding":
        text += " " * draw(st.integers(min_value=0, max_value=130_000))
    raw = text.encode("utf-8", "surrogatepass")
    if kind == "garbage":
        raw = draw(st.binary(max_size=200)) + raw[draw(st.integers(0, len(raw))) :]
    return raw


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with one thing wrong, or nothing: its header rewritten, truncated, extended, bytes overwritten,
    its length field replaced, a NaN or Inf in its body, or random bytes instead."""
    header, body = split(valid)
    kind = draw(
        st.sampled_from(
            ["none", "header", "truncate", "extend", "overwrite", "length", "non-finite", "random"]
        )
    )
    if kind == "header":
        name = draw(st.sampled_from(sorted(header)))
        raw = draw(header_text(header[name])).replace(b'"t":', json.dumps(name).encode() + b":")
        exact = draw(st.booleans())
        return assemble(raw, body, len(valid) if exact else None)
    if kind == "truncate":
        return valid[: draw(st.integers(min_value=0, max_value=len(valid) - 1))]
    if kind == "extend":
        return valid + draw(st.binary(min_size=1, max_size=64))
    if kind == "overwrite":
        data = bytearray(valid)
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            data[draw(st.integers(min_value=0, max_value=len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(min_value=0, max_value=2**64 - 1))) + valid[8:]
    if kind == "non-finite":
        values = np.frombuffer(body[: len(body) // 4 * 4], dtype="<f4").copy()
        if values.size:
            values[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return valid[: len(valid) - len(body)] + values.tobytes() + body[len(body) // 4 * 4 :]
    if kind == "random":
        return draw(st.binary(max_size=2 * len(valid)))
    return valid


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


# -- the shared JSON parser ------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_load_json_refuses_random_bytes_with_a_decode_error(data: bytes) -> None:
    refused_or(lambda: load_json(data, max_bytes=1000, max_depth=3, what="fuzz"), lambda _: None)


@FUZZ
@given(json_values(), st.integers(min_value=0, max_value=6))
def test_load_json_returns_any_json_within_its_depth_and_refuses_the_rest(value: Any, max_depth: int) -> None:
    """The depth is judged on the raw bytes, before parsing: strings holding brackets and quotes must not fool it."""
    text = json.dumps(value)
    if depth_of(value) <= max_depth:
        assert load_json(text.encode(), max_bytes=1 << 20, max_depth=max_depth, what="fuzz") == value
    else:
        with pytest.raises(DecodeError, match="nested deeper"):
            load_json(text.encode(), max_bytes=1 << 20, max_depth=max_depth, what="fuzz")


@FUZZ
@given(nested(), st.sampled_from(HOSTILE_TOKENS))
def test_load_json_refuses_deep_nesting_and_non_json_numbers(deep: str, token: str) -> None:
    refused_or(lambda: load_json(deep.encode(), max_bytes=1 << 20, max_depth=3, what="fuzz"), lambda v: None)
    parsed = None
    try:
        parsed = load_json(f"[{token}]".encode(), max_bytes=1 << 20, max_depth=3, what="fuzz")
    except DecodeError:
        assert (
            token in ("NaN", "Infinity", "-Infinity", "1e999", "1" * 5000) or depth_of(json.loads(token)) > 2
        )
    if parsed is not None:
        assert parsed == [json.loads(token)]


# -- tensors on the wire: activations, gradients, snapshots --------------------------------------------------


def check_activation(tensor: torch.Tensor, data: bytes) -> None:
    """A decoded activation is of the expected shape and dtype, finite, and exactly the body's bytes."""
    assert tensor.shape == SHAPE and tensor.dtype == DTYPE and bool(torch.isfinite(tensor).all())
    body = np.frombuffer(data[len(data) - 4 * math.prod(SHAPE) :], dtype="<f4")
    assert torch.equal(tensor, torch.from_numpy(body.copy()).reshape(SHAPE))


@FUZZ
@given(mutated(ACTIVATION))
def test_activation_decodes_exactly_or_is_refused(data: bytes) -> None:
    refused_or(
        lambda: wire.decode(data, dtype=DTYPE, shape=SHAPE, max_bytes=LIMIT),
        lambda t: check_activation(t, data),
    )
    if data == ACTIVATION:
        assert torch.equal(
            wire.decode(data, dtype=DTYPE, shape=None, max_bytes=LIMIT), torch.arange(24.0).reshape(SHAPE) / 7
        )


@FUZZ
@given(mutated(ACTIVATION))
def test_activation_of_any_shape_is_bounded_by_its_size_not_its_header(data: bytes) -> None:
    """shape=None: the header names the shape, and no claim of it may allocate more than the bytes that came."""

    def check(tensor: torch.Tensor) -> None:
        assert (
            tensor.dtype == DTYPE and tensor.numel() * 4 <= len(data) and bool(torch.isfinite(tensor).all())
        )

    refused_or(lambda: wire.decode(data, dtype=DTYPE, shape=None, max_bytes=4 * LIMIT), check)


SNAPSHOT = take_snapshot(WORKER)
SNAPSHOT_BYTES = encode_snapshot(SNAPSHOT)


def check_snapshot(snapshot: Snapshot) -> None:
    n = SNAPSHOT.weights.numel()
    assert snapshot.weights.shape == (n,) and snapshot.steps.shape == SNAPSHOT.steps.shape
    assert set(snapshot.moments) == set(SNAPSHOT.moments) and all(
        m.shape == (n,) for m in snapshot.moments.values()
    )
    assert isinstance(snapshot.inner_step, int) and snapshot.inner_step >= 0


@FUZZ
@given(mutated(SNAPSHOT_BYTES))
def test_named_snapshot_decodes_to_the_stage_or_is_refused(data: bytes) -> None:
    refused_or(lambda: decode_snapshot(data, WORKER), check_snapshot)
    if data == SNAPSHOT_BYTES:
        assert torch.equal(decode_snapshot(data, WORKER).weights, SNAPSHOT.weights)


# -- flat fp32: checkpoints, pseudo-gradients, challenged snapshots, merge slices -------------------------------

CHALLENGED = encode_f32(snapshot_to_f32(SNAPSHOT))
STEP_VALUES = [float("nan"), float("inf"), -1.0, 0.5, 2.0**24, 2.0**24 - 1, 3.0, -0.0, 1e30]


@st.composite
def mutated_flat(draw: st.DrawFn, valid: bytes) -> bytes:
    """Flat fp32 with one thing wrong, or nothing: cut, extended, its first value (a snapshot's inner step)
    replaced, or random bytes."""
    kind = draw(st.sampled_from(["none", "cut", "extend", "step", "random"]))
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "extend":
        return valid + draw(st.binary(min_size=1, max_size=9))
    if kind == "step":
        return struct.pack("<f", draw(st.sampled_from(STEP_VALUES))) + valid[4:]
    if kind == "random":
        return draw(st.binary(max_size=64))
    return valid


@FUZZ
@given(st.binary(max_size=64), st.one_of(st.none(), st.integers(min_value=0, max_value=16)))
def test_decode_f32_returns_every_value_or_refuses(data: bytes, count: int | None) -> None:
    def check(values: torch.Tensor) -> None:
        assert values.dtype == torch.float32 and values.dim() == 1 and values.numel() * 4 == len(data)
        assert count is None or values.numel() == count
        assert values.numpy().tobytes() == data

    refused_or(lambda: decode_f32(data, count), check)


@FUZZ
@given(mutated_flat(CHALLENGED))
def test_challenged_snapshot_decodes_to_the_stage_or_is_refused(data: bytes) -> None:
    def check(snapshot: Snapshot) -> None:
        check_snapshot(snapshot)
        assert snapshot.inner_step < 2**24 and float(snapshot.inner_step) == struct.unpack("<f", data[:4])[0]

    refused_or(lambda: decode_challenged(SETUP, data), check)


@FUZZ
@given(mutated_flat(encode_f32(SNAPSHOT.weights)))
def test_pseudo_gradient_decodes_to_the_stage_or_is_refused(data: bytes) -> None:
    refused_or(
        lambda: decode_pseudo_gradient(SETUP, data),
        lambda g: assert_equal_bytes(g, data, SNAPSHOT.weights.numel()),
    )


def assert_equal_bytes(values: torch.Tensor, data: bytes, count: int) -> None:
    assert values.shape == (count,) and values.numpy().tobytes() == data


N, PARTS = 40, 4
PREVIOUS = torch.arange(N, dtype=torch.float32)
PLAN = make_plan(
    run="r",
    epoch=1,
    stage=0,
    n_params=N,
    n_partitions=PARTS,
    submitters=[Submitter(hotkey="a", upload_key="up/a", weight=1.0, claimed_norm=1.0)],
    prev_weights=[FlatRef(key="prev")] * PARTS,
)


@FUZZ
@given(mutated_flat(encode_f32(-PREVIOUS[:10])), mutated_flat(encode_f32(PREVIOUS)))
def test_merge_applies_a_merged_slice_exactly_or_keeps_last_epochs_values(
    merged: bytes, previous: bytes
) -> None:
    """A merged slice from an owner is applied when it is exactly a finite slice, else last epoch's values stay;
    the previous weights (read by range) are decoded exactly or refused."""
    store = DictStore()
    store.put("merged", merged)
    store.put("prev", previous)
    first = PLAN.partitions[0]
    usable = len(merged) == 4 * first.size and bool(np.isfinite(np.frombuffer(merged, dtype="<f4")).all())
    applied = apply_merged(store, PLAN, {0: "merged"}, previous=PREVIOUS)
    expected = torch.frombuffer(bytearray(merged), dtype=torch.float32) if usable else PREVIOUS[: first.size]
    assert torch.equal(applied[: first.size], expected) and torch.equal(
        applied[first.size :], PREVIOUS[first.size :]
    )
    refused_or(
        lambda: read_slice(store, FlatRef(key="prev"), 10, 20),
        lambda s: assert_equal_bytes(s, previous[40:80], 10),
    )


# -- audit records -----------------------------------------------------------------------------------------------

RECORDS = [
    HopRecord(1, 1, "forward", 7, 0, ACTIVATION, ACTIVATION[:40], None),
    HopRecord(1, 1, "backward", 7, 1, b"", None, 2.5),
]
RECORDS_BYTES = encode_records(RECORDS)


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    """Records with their JSON fields replaced by any JSON, or their bytes mutated as any payload's."""
    if draw(st.booleans()):
        return draw(mutated(RECORDS_BYTES))
    fields = draw(st.one_of(json_values(), st.lists(st.fixed_dictionaries({
        "epoch": st.integers(-1, 2**64), "stage": st.integers(0, 3), "direction": st.sampled_from(["forward", "backward", "sideways"]),
        "sample_id": st.integers(0, 9), "inner_step": st.one_of(st.integers(0, 9), st.booleans()),
        "loss": st.one_of(st.none(), st.floats(allow_nan=False), st.text(max_size=3)),
    }), max_size=3)))  # fmt: skip
    header, body = split(RECORDS_BYTES)
    header["__metadata__"] = {"records": json.dumps(fields)}
    return assemble(json.dumps(header).encode(), body)


@FUZZ
@given(mutated_records())
def test_records_decode_to_records_that_round_trip_or_are_refused(data: bytes) -> None:
    def check(records: list[HopRecord]) -> None:
        assert all(isinstance(r, HopRecord) and r.direction in ("forward", "backward") for r in records)
        assert decode_records(encode_records(records)) == records

    refused_or(lambda: decode_records(data), check)
    if data == RECORDS_BYTES:
        assert decode_records(data) == RECORDS


# -- checkpoint manifests ----------------------------------------------------------------------------------------

STAGES = plan_stages(CONFIG.n_layers, 2)
MANIFEST = bucket_manifest(
    "run", 3, CONFIG, STAGES, ["k0", "k1"], ["0" * 64, "1" * 64], stage_tensor_lists(CONFIG, STAGES),
    None, 0, {}, {}, 0, "bpe", "d" * 64,
)  # fmt: skip


@st.composite
def mutated_manifest(draw: st.DrawFn) -> bytes:
    """The manifest with one field (top-level, or of a stage) replaced by any JSON, or its bytes mutated."""
    manifest = json.loads(json.dumps(MANIFEST))
    kind = draw(st.sampled_from(["field", "stage field", "bytes"]))
    if kind == "field":
        manifest[draw(st.sampled_from(sorted(manifest)))] = draw(json_values())
    elif kind == "stage field":
        stage = manifest["stages"][draw(st.integers(0, 1))]
        stage[draw(st.sampled_from(sorted(stage)))] = draw(json_values())
    raw = json.dumps(manifest).encode()
    if kind == "bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.one_of(nested(), st.sampled_from(HOSTILE_TOKENS))).encode() + raw[at:]
    return raw


@FUZZ
@given(mutated_manifest())
def test_manifest_parses_to_its_stages_or_is_refused(raw: bytes) -> None:
    def check(manifest: dict[str, Any]) -> None:
        config, stages = parse_manifest(manifest, "fuzz")
        assert sum(s.last_layer - s.first_layer for s in stages) == config.n_layers

    try:
        check(load_manifest(raw, "fuzz"))
    except CheckpointError:
        pass


# -- data shards -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shards")


@st.composite
def token_shard(draw: st.DrawFn) -> tuple[bytes, int]:
    """uint16 token bytes and the count a plan claims for them: mostly the right count, ids of any size."""
    tokens = draw(st.integers(min_value=40, max_value=100))
    ids = draw(st.lists(st.integers(0, 2**16 - 1) | st.integers(0, 63), min_size=tokens, max_size=tokens))
    data = np.array(ids, dtype="<u2").tobytes()
    return data[: len(data) - draw(st.sampled_from([0, 0, 0, 1, 2]))], tokens


@FUZZ
@given(token_shard(), st.sampled_from([64, 300, 65536]))
def test_token_shard_is_the_plans_tokens_or_is_refused(
    shard_dir: Path, drawn: tuple[bytes, int], vocab: int
) -> None:
    """A shard whose sha256 the plan records (so only its size and ids are in question) opens into windows of
    in-vocabulary ids, or is refused."""
    data, tokens = drawn
    (shard_dir / "s0").write_bytes(data)
    shard = ShardInfo(file="s0", sha256=hashlib.sha256(data).hexdigest(), tokens=tokens)
    plan = DataPlan("c", "bpe", "d", vocab, 0, "uint16", (shard,), seq_len=4, seed=0)

    def check(stream: TokenData) -> None:
        ids, _ = stream.batch(range(plan.train_windows))
        assert len(data) == 2 * tokens and int(ids.max()) < vocab

    refused_or(lambda: TokenData.open(shard_dir, plan), check)


# -- the cases that were seen ----------------------------------------------------------------------------------


def test_an_exact_size_activation_with_a_header_nested_2000_deep_is_refused_not_a_recursion_error() -> None:
    """The case seen: the payload is exactly an activation's size (so it passes the size check, and uploaded, its
    digest), its header 2,000 arrays deep: json.loads raised RecursionError and the next stage's miner died."""
    shape = (1, 32, 64)  # 8 KiB of fp32: room for a 4 KB header
    limit = wire.encoded_size(shape, DTYPE)
    deep = b'{"t":' + b"[" * 2000 + b"]" * 2000 + b"}"
    payload = assemble(deep, b"", limit)
    with pytest.raises(wire.WireError, match="does not fit"):  # longer than any header of one tensor may be
        wire.decode(payload, dtype=DTYPE, shape=shape, max_bytes=limit)
    with pytest.raises(wire.WireError, match="nested deeper"):  # and where a long header is allowed
        wire.parse(payload, max_bytes=limit, max_header_bytes=limit)
    shallow_enough = (
        b'{"t":' + b"[" * 500 + b"]" * 500 + b"}"
    )  # within the header limit: the depth refuses it
    with pytest.raises(wire.WireError, match="nested deeper"):
        wire.decode(assemble(shallow_enough, b"", limit), dtype=DTYPE, shape=shape, max_bytes=limit)
    for depth in (2000, 100_000):
        with pytest.raises(DecodeError, match="nested deeper"):
            load_json(b"[" * depth + b"]" * depth, max_bytes=1 << 20, max_depth=64, what="deep")
    with pytest.raises(DecodeError, match="nested deeper"):
        decode_records(assemble(b'{"__metadata__":{"records":"' + b"[" * 2000 + b'"}}', b""))


def test_a_120_kb_header_is_refused_before_parsing_where_no_honest_one_is_that_long() -> None:
    header, body = split(ACTIVATION)
    padded = json.dumps(header).encode().ljust(120_000)
    with pytest.raises(wire.WireError, match=r"header length 120000 does not fit .* \(limit \d+\)"):
        wire.decode(assemble(padded, body), dtype=DTYPE, shape=SHAPE, max_bytes=1 << 20)
    with pytest.raises(wire.WireError, match="header length 120000"):
        decode_snapshot(assemble(padded, body), WORKER)
    # Records may have a long header (their fields travel in it): bounded, and decoded exactly.
    records_header, records_body = split(RECORDS_BYTES)
    assert (
        decode_records(assemble(json.dumps(records_header).encode().ljust(120_000), records_body)) == RECORDS
    )


@pytest.mark.parametrize(
    ("shape", "offsets", "words"),
    [
        ([2**40], [0, 2**42], "describes 4398046511104 data bytes but 96 arrived"),
        ([2**20, 2**20], [0, 96], "needs 4398046511104 bytes"),
        ([2**64, 2**64], [0, 96], "needs"),
        ([1] * 9, [0, 4], "at most 8"),
    ],
)
def test_a_header_claiming_2_40_values_is_refused_before_anything_is_allocated(
    shape: list[int], offsets: list[int], words: str
) -> None:
    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    for expected in (SHAPE, None):
        with pytest.raises(wire.WireError, match=words):
            wire.decode(assemble(header, b"\0" * 96), dtype=DTYPE, shape=expected, max_bytes=1 << 20)


def test_nan_and_huge_numbers_in_a_header_are_refused() -> None:
    for token in ("NaN", "Infinity", "1e999", "1" * 5000):
        header = ('{"t":{"dtype":"F32","shape":[2,3,4],"data_offsets":[0,' + token + "]}}").encode()
        with pytest.raises(wire.WireError, match="not a safetensors payload"):
            wire.decode(assemble(header, b"\0" * 96), dtype=DTYPE, shape=SHAPE, max_bytes=1 << 20)


def test_every_refusal_is_a_value_error_so_callers_that_refuse_on_value_error_refuse_it() -> None:
    """The miner's hop (iota.miner.hops) and the audit's judge (iota.audit.judge) refuse an input on ValueError."""
    assert issubclass(DecodeError, ValueError)
    assert issubclass(wire.WireError, DecodeError) and issubclass(CheckpointError, DecodeError)
