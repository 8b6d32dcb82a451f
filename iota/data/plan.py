"""Deterministic data addressing: the published data plan, and the tokens and targets each sequence id names.

A sequence id names one window of `seq_len` tokens; a sample (what a miner computes in one hop) is a micro-batch
of consecutive sequence ids (iota.train.run.sample_batch). A pass is one permutation of the train windows; the
word epoch is the run's (TRAIN, UPLOAD, MERGE, APPLY), never the data's.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iota.decoding import DecodeError

DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
}  # little-endian on every machine
DEFAULT_HELDOUT_FRACTION = 0.03

_MASK64 = (1 << 64) - 1


class DataIntegrityError(DecodeError):
    """A shard's bytes are not the tokens the manifest or plan records: size, sha256 or token ids."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest stored dtype that holds every id of this vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def seeded_permutation(n: int, seed: int, stream: int) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, stream) alone.

    Sorting by a 64-bit integer hash (splitmix64) rather than drawing from numpy's generators, whose streams
    numpy does not promise to keep across versions: two machines must agree on sequence order forever.
    The hash is a bijection, so keys never tie.
    """
    if n < 0 or seed < 0 or stream < 0:
        raise ValueError(f"n, seed and stream must be >= 0, got {n}, {seed}, {stream}")
    key = _splitmix64(np.array([(_splitmix64_int(seed) ^ stream) & _MASK64], dtype=np.uint64))[0]
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ key)
    return np.argsort(keys, kind="stable")


def _splitmix64_int(x: int) -> int:
    return int(_splitmix64(np.array([x & _MASK64], dtype=np.uint64))[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what the hash wants.
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class ShardInfo:
    """One raw little-endian token file of a prepared data set."""

    file: str  # name inside the prepared directory
    sha256: str
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(file=str(d["file"]), sha256=str(d["sha256"]), tokens=int(d["tokens"]))


@dataclass(frozen=True)
class DataPlan:
    """Everything a miner, validator or baseline needs to turn sequence ids into the same tokens.

    The stream is the prepared shards concatenated (documents joined by EOS). Its last `heldout_fraction` is
    the held-out region; the rest is the train region, cut into non-overlapping windows of `seq_len` inputs
    (+1 target token). Sequence id i is window `seeded_permutation(train_windows, seed, p)[i % train_windows]` in
    pass `p = i // train_windows`: ids past the end start a new pass over the data in a new order.
    """

    corpus_digest: str
    tokenizer_name: str
    tokenizer_digest: str
    vocab_size: int
    eos_id: int
    dtype: str
    shards: tuple[ShardInfo, ...]
    seq_len: int
    seed: int
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    total_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "total_tokens", sum(s.tokens for s in self.shards))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.seq_len < 1 or self.seed < 0:
            raise ValueError(f"seq_len must be >= 1 and seed >= 0, got {self.seq_len}, {self.seed}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.train_windows < 1:
            raise ValueError(
                f"{self.total_tokens} tokens are too few for seq_len {self.seq_len} with "
                f"{self.heldout_fraction:.0%} held out: no whole training window"
            )

    @property
    def heldout_start(self) -> int:
        """Index of the first held-out token: every training window ends before it (targets included)."""
        heldout_tokens = max(math.ceil(self.total_tokens * self.heldout_fraction), self.seq_len + 1)
        return self.total_tokens - heldout_tokens

    @property
    def train_windows(self) -> int:
        return max(self.heldout_start - 1, 0) // self.seq_len

    @property
    def heldout_windows(self) -> int:
        return (self.total_tokens - self.heldout_start - 1) // self.seq_len

    @property
    def train_tokens(self) -> int:
        """Tokens in one pass over the train windows (inputs only)."""
        return self.train_windows * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "total_tokens"}
        d["shards"] = [s.to_dict() for s in self.shards]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPlan:
        fields = {k: v for k, v in d.items() if k != "total_tokens"}
        fields["shards"] = tuple(ShardInfo.from_dict(s) for s in d["shards"])
        return cls(**fields)

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON form: two parties with one digest address the same data."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_shards(directory: Path, shards: Sequence[ShardInfo], dtype: str, verify: bool = True) -> np.ndarray:
    """The shards' tokens concatenated, each file's size (and sha256 when `verify`) checked first."""
    parts = []
    for shard in shards:
        path = Path(directory) / shard.file
        data = path.read_bytes()
        expected_bytes = shard.tokens * DTYPES[dtype].itemsize
        if len(data) != expected_bytes:
            raise DataIntegrityError(f"{path}: {len(data)} bytes, expected {expected_bytes}")
        if verify:
            actual = hashlib.sha256(data).hexdigest()
            if actual != shard.sha256:
                raise DataIntegrityError(
                    f"{path}: sha256 {actual} does not match the recorded {shard.sha256}"
                )
        parts.append(np.frombuffer(data, dtype=DTYPES[dtype]))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


class TokenData:
    """The token stream of a data plan, answering for sequences by id."""

    def __init__(self, plan: DataPlan, tokens: np.ndarray) -> None:
        if tokens.shape != (plan.total_tokens,):
            raise DataIntegrityError(
                f"token stream has shape {tokens.shape}, the plan expects ({plan.total_tokens},)"
            )
        # An id past the vocabulary would index past the embedding (an IndexError, or a device assert on a GPU).
        if tokens.size and int(tokens.max()) >= plan.vocab_size:
            raise DataIntegrityError(
                f"token id {int(tokens.max())} is outside the vocabulary of {plan.vocab_size}"
            )
        self.plan = plan
        self._tokens = tokens
        self._permutations: dict[int, np.ndarray] = {}
        self._unigram_entropy: float | None = None

    @classmethod
    def open(cls, directory: Path, plan: DataPlan, verify: bool = True) -> TokenData:
        """The stream of `plan` from a prepared directory holding its shards (sha256-checked when `verify`)."""
        return cls(plan, load_shards(directory, plan.shards, plan.dtype, verify))

    def train_window(self, sequence_id: int) -> int:
        """Which train window sequence `sequence_id` reads."""
        if sequence_id < 0:
            raise ValueError(f"sequence ids are >= 0, got {sequence_id}")
        data_pass, position = divmod(sequence_id, self.plan.train_windows)
        return int(self._permutation(data_pass)[position])

    def sequence(self, sequence_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), each LongTensor[seq_len]; targets are the tokens shifted left by one."""
        tokens, targets = self.batch([sequence_id])
        return tokens[0], targets[0]

    def batch(self, sequence_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets), each LongTensor[B, seq_len], row b for sequence_ids[b]."""
        windows = np.array([self.train_window(int(i)) for i in sequence_ids], dtype=np.int64)
        return self._windows(windows * self.plan.seq_len)

    def heldout_batches(
        self, n_samples: int | None = None, batch_size: int = 8
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n_samples` held-out windows in stream order (all of them when None), in batches."""
        available = self.plan.heldout_windows
        count = available if n_samples is None else min(n_samples, available)
        starts = self.plan.heldout_start + np.arange(count, dtype=np.int64) * self.plan.seq_len
        return [self._windows(starts[i : i + batch_size]) for i in range(0, count, batch_size)]

    def unigram_entropy(self) -> float:
        """Entropy of the train region's token frequencies, in nats/token: the loss a model reaches by
        learning word frequencies alone, the first bar a language model must get under."""
        if self._unigram_entropy is None:
            train = self._tokens[: self.plan.heldout_start]
            counts = np.bincount(train, minlength=self.plan.vocab_size).astype(np.float64)
            p = counts[counts > 0] / counts.sum()
            self._unigram_entropy = float(-(p * np.log(p)).sum())
        return self._unigram_entropy

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = np.arange(self.plan.seq_len + 1, dtype=np.int64)
        rows = torch.from_numpy(self._tokens[starts[:, None] + offsets].astype(np.int64))  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _permutation(self, data_pass: int) -> np.ndarray:
        perm = self._permutations.get(data_pass)
        if perm is None:
            if len(self._permutations) >= 2:  # callers move through passes in order; keep this and the last
                self._permutations.pop(min(self._permutations))
            perm = seeded_permutation(self.plan.train_windows, self.plan.seed, data_pass)
            self._permutations[data_pass] = perm
        return perm
