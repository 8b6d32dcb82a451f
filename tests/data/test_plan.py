"""Sample addressing: deterministic, disjoint windows, shifted targets, a held-out region training never reads."""

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iota.data import (
    Corpus,
    DataPlan,
    ShardInfo,
    TokenData,
    load_prepared,
    load_tokenizer,
    prepare,
    seeded_permutation,
)

SEQ = 16


def _plan(total: int, seq_len: int = SEQ, seed: int = 3, heldout_fraction: float = 0.05) -> DataPlan:
    shard = ShardInfo("shard_00000.bin", "0" * 64, total)
    return DataPlan(
        "c" * 64, "synthetic", "t" * 64, total, 0, "uint32", (shard,), seq_len, seed, heldout_fraction
    )


def _positions(total: int, **kw: float) -> TokenData:
    """A stream whose token at index i is i, so every token names its own position."""
    return TokenData(_plan(total, **kw), np.arange(total, dtype=np.uint32))


def test_permutation_is_pinned_forever() -> None:
    # Sample order must never change with a numpy upgrade: these values are the contract.
    assert seeded_permutation(10, 0, 0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    assert seeded_permutation(10, 0, 1).tolist() == [8, 3, 0, 1, 5, 2, 7, 4, 9, 6]
    big = seeded_permutation(100_000, 7, 3)
    assert np.array_equal(np.sort(big), np.arange(100_000))
    digest = hashlib.sha256(big.astype("<i8").tobytes()).hexdigest()
    assert digest == "1f43597fa92777459d1957e70d601762ea9d53393fccae061e4b81fdff638530"


def test_an_epoch_covers_each_train_window_once_then_reshuffles() -> None:
    data = _positions(10_000)
    n = data.plan.train_windows
    assert n == (data.plan.heldout_start - 1) // SEQ
    first = [data.train_window(i) for i in range(n)]
    second = [data.train_window(i) for i in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n))
    assert first != second  # a new pass, a new order
    tokens, _ = data.batch(range(n))
    assert len(set(tokens.flatten().tolist())) == n * SEQ  # windows never overlap
    other_seed = _positions(10_000, seed=4)
    assert [other_seed.train_window(i) for i in range(n)] != first


def test_targets_are_tokens_shifted_by_one() -> None:
    data = _positions(10_000)
    for sample_id in (0, 1, 57, 10_000):
        tokens, targets = data.sequence(sample_id)
        assert tokens.dtype == targets.dtype == torch.long and tokens.shape == targets.shape == (SEQ,)
        start = data.train_window(sample_id) * SEQ
        assert tokens.tolist() == list(range(start, start + SEQ))
        assert targets.tolist() == list(range(start + 1, start + SEQ + 1))
    tokens, targets = data.batch([5, 2, 5])
    assert tokens.shape == (3, SEQ) and torch.equal(tokens[0], tokens[2])
    assert torch.equal(tokens[1], data.sequence(2)[0]) and torch.equal(targets[1], data.sequence(2)[1])


def test_heldout_is_disjoint_from_everything_training_reads() -> None:
    data = _positions(10_000)
    plan = data.plan
    train_tokens, train_targets = data.batch(range(plan.train_windows * 3))  # three passes
    train_max = max(train_tokens.max().item(), train_targets.max().item())
    batches = data.heldout_batches(batch_size=4)
    held = torch.cat([torch.cat([t, y], dim=1) for t, y in batches])
    assert held.shape[0] == plan.heldout_windows == (10_000 - plan.heldout_start - 1) // SEQ
    assert train_max < plan.heldout_start <= held.min().item()
    assert held.max().item() < 10_000
    assert math.ceil(10_000 * 0.05) == 10_000 - plan.heldout_start
    assert [b[0].shape[0] for b in data.heldout_batches(10, batch_size=4)] == [4, 4, 2]
    assert torch.equal(data.heldout_batches(3)[0][0], batches[0][0][:3])  # always the same first windows


def test_plan_json_round_trip_and_validation() -> None:
    plan = _plan(10_000)
    restored = DataPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan and restored.digest == plan.digest and restored.total_tokens == 10_000
    assert _plan(10_000, seed=4).digest != plan.digest
    with pytest.raises(ValueError, match="too few"):
        _plan(20)
    with pytest.raises(ValueError, match="heldout_fraction"):
        _plan(10_000, heldout_fraction=0.0)
    with pytest.raises(ValueError, match="shape"):
        TokenData(plan, np.arange(9_999, dtype=np.uint32))


def test_unigram_entropy_counts_the_train_region_only() -> None:
    plan = _plan(4_000, seq_len=8)
    tokens = np.arange(4_000, dtype=np.uint32) % 4  # four symbols, equally often
    tokens[plan.heldout_start :] = 7  # a symbol only the held-out region has
    assert TokenData(plan, tokens).unigram_entropy() == pytest.approx(math.log(4), abs=1e-3)


_CHILD = """
import hashlib, json, sys
from iota.data import DataPlan, TokenData
plan = DataPlan.from_dict(json.loads(sys.argv[2]))
tokens, targets = TokenData.open(sys.argv[1], plan).batch(range(40, 90))
print(hashlib.sha256(tokens.numpy().tobytes() + targets.numpy().tobytes()).hexdigest())
"""


def test_same_ids_give_the_same_tokens_in_another_process(tmp_path: Path) -> None:
    corpus = Corpus.from_texts(
        [f"Document {i}: " + "the quick brown fox jumps. " * (i % 7 + 1) for i in range(300)]
    )
    out = prepare(corpus, load_tokenizer("llama3", tmp_path), tmp_path / "data")
    data = load_prepared(out).token_data(seq_len=128, seed=11)
    tokens, targets = data.batch(range(40, 90))  # ids past the first pass included
    assert data.plan.train_windows < 90
    here = hashlib.sha256(tokens.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(out), json.dumps(data.plan.to_dict())],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == here
