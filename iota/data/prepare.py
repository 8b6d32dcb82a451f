"""Tokenize a corpus once into checksummed raw token shards plus a manifest, and load them back."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iota.data.corpus import Corpus
from iota.data.plan import (
    DEFAULT_HELDOUT_FRACTION,
    DTYPES,
    DataIntegrityError,
    DataPlan,
    ShardInfo,
    TokenData,
    load_shards,
    seeded_permutation,
    token_dtype,
)
from iota.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16: small enough to hash and re-fetch one at a time
DOCUMENT_ORDER_STREAM = (
    1 << 32
)  # seeded_permutation stream for document order, apart from the passes over windows
_ENCODE_CHUNK_DOCUMENTS = 1024  # documents per encode_batch call: parallel enough, bounded memory


@dataclass(frozen=True)
class Manifest:
    """What a prepared directory holds: which corpus, tokenized how, into which shards."""

    corpus_name: str
    corpus_digest: str
    documents: int
    tokenizer_kind: str
    tokenizer_name: str
    tokenizer_digest: str
    vocab_size: int
    eos_id: int
    dtype: str
    shards: tuple[ShardInfo, ...]
    total_tokens: int
    document_order_seed: (
        int | None
    )  # None: documents in corpus order; else shuffled so held-out text is a fair sample
    tokenizer_file: str | None  # the BPE's tokenizer.json, copied so the data set carries its vocabulary
    format: int = MANIFEST_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = [s.to_dict() for s in self.shards]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"manifest format {d.get('format')!r} is not {MANIFEST_FORMAT}; prepare the data again"
            )
        return cls(**{**d, "shards": tuple(ShardInfo.from_dict(s) for s in d["shards"])})


@dataclass(frozen=True)
class Prepared:
    """A loaded prepared directory: its manifest and the whole token stream."""

    directory: Path
    manifest: Manifest
    tokens: np.ndarray

    def plan(self, seq_len: int, seed: int, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> DataPlan:
        m = self.manifest
        return DataPlan(
            corpus_digest=m.corpus_digest,
            tokenizer_name=m.tokenizer_name,
            tokenizer_digest=m.tokenizer_digest,
            vocab_size=m.vocab_size,
            eos_id=m.eos_id,
            dtype=m.dtype,
            shards=m.shards,
            seq_len=seq_len,
            seed=seed,
            heldout_fraction=heldout_fraction,
        )

    def token_data(
        self, seq_len: int, seed: int, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    ) -> TokenData:
        return TokenData(self.plan(seq_len, seed, heldout_fraction), self.tokens)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer these tokens were made with, checked against the manifest's digest."""
        tokenizer = load_tokenizer(self.manifest.tokenizer_kind, self.directory)
        if tokenizer.digest != self.manifest.tokenizer_digest:
            raise DataIntegrityError(
                f"{self.directory}: tokenizer digest {tokenizer.digest} differs from the manifest's "
                f"{self.manifest.tokenizer_digest} (a different splintr version, or an edited tokenizer.json)"
            )
        return tokenizer


def prepare(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out_dir: Path,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    document_order_seed: int | None = 0,
) -> Path:
    """Tokenize `corpus` into `out_dir`: shard_NNNNN.bin files (raw little-endian uint16, or uint32 for
    vocabularies above 65,536), the tokenizer's files, and manifest.json, written last. Each document is
    followed by EOS. Returns `out_dir`.

    Documents are shuffled by `document_order_seed` (None keeps corpus order) so the held-out tail of the
    stream samples the whole corpus rather than its last book.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    texts = corpus.texts
    if document_order_seed is not None:
        order = seeded_permutation(len(texts), document_order_seed, DOCUMENT_ORDER_STREAM)
        texts = [texts[i] for i in order]

    writer = _ShardWriter(out_dir, DTYPES[dtype], shard_tokens)
    eos = np.array([tokenizer.eos_id], dtype=DTYPES[dtype])
    for start in range(0, len(texts), _ENCODE_CHUNK_DOCUMENTS):
        encoded = tokenizer.encode_batch(texts[start : start + _ENCODE_CHUNK_DOCUMENTS])
        for ids in encoded:
            writer.write(np.asarray(ids, dtype=DTYPES[dtype]))
            writer.write(eos)
    shards = writer.close()

    for stale in out_dir.glob("shard_*.bin"):  # left by an earlier, longer preparation
        if stale.name not in {s.file for s in shards}:
            stale.unlink()
    saved = tokenizer.save(out_dir)
    manifest = Manifest(
        corpus_name=corpus.name,
        corpus_digest=corpus.digest,
        documents=len(corpus),
        tokenizer_kind=tokenizer.kind,
        tokenizer_name=tokenizer.name,
        tokenizer_digest=tokenizer.digest,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        dtype=dtype,
        shards=tuple(shards),
        total_tokens=sum(s.tokens for s in shards),
        document_order_seed=document_order_seed,
        tokenizer_file=TOKENIZER_FILE if any(p.name == TOKENIZER_FILE for p in saved) else None,
    )
    tmp = out_dir / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST_FILE)
    return out_dir


def load_prepared(directory: Path, verify: bool = True) -> Prepared:
    """The manifest and tokens of a prepared directory; with `verify`, every shard's sha256 is checked."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `iota data prepare` first")
    manifest = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    tokens = load_shards(directory, manifest.shards, manifest.dtype, verify)
    return Prepared(directory, manifest, tokens)


def prepare_command(
    corpus_paths: Sequence[Path],
    tokenizer_kind: str,
    vocab_size: int | None,
    out_dir: Path,
    text_field: str = "text",
    split_paragraphs: bool = False,
    document_order_seed: int | None = 0,
) -> Path:
    """`iota data prepare`: the files named (none: the King James Bible) tokenized into `out_dir`.

    A BPE is trained on the same corpus (cached under `out_dir/tokenizer-cache`); `vocab_size` is ignored
    for llama3.
    """
    if corpus_paths:
        corpus = Corpus.from_paths(corpus_paths, text_field=text_field, split_paragraphs=split_paragraphs)
    else:
        corpus = Corpus.kjv()
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_kind, out_dir / "tokenizer-cache", corpus, vocab_size)
    return prepare(corpus, tokenizer, out_dir, document_order_seed=document_order_seed)


class _ShardWriter:
    """Cuts a stream of token arrays into files of `shard_tokens` tokens, hashing each as it is written."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self._out_dir = out_dir
        self._dtype = dtype
        self._shard_tokens = shard_tokens
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.shards: list[ShardInfo] = []

    def write(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        while self._pending_tokens >= self._shard_tokens:
            joined = np.concatenate(self._pending)
            self._flush(joined[: self._shard_tokens])
            rest = joined[self._shard_tokens :]
            self._pending, self._pending_tokens = [rest], len(rest)

    def close(self) -> list[ShardInfo]:
        if self._pending_tokens:
            self._flush(np.concatenate(self._pending))
        self._pending, self._pending_tokens = [], 0
        return self.shards

    def _flush(self, tokens: np.ndarray) -> None:
        data = tokens.astype(self._dtype, copy=False).tobytes()
        name = f"shard_{len(self.shards):05d}.bin"
        (self._out_dir / name).write_bytes(data)
        self.shards.append(ShardInfo(name, hashlib.sha256(data).hexdigest(), len(tokens)))
