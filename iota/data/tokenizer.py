"""Tokenizers behind one protocol: a byte-level BPE trained on the corpus, and splintr's Llama 3 vocabulary."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import splintr
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from iota.data.corpus import Corpus

TOKENIZER_FILE = "tokenizer.json"
BPE_EOS = "<|endoftext|>"  # id 0 of every BPE vocabulary; separates documents, doubles as BOS
LLAMA3_EOS = "<|end_of_text|>"
LLAMA3_BOS = "<|begin_of_text|>"
TOKENIZER_KINDS = ("bpe", "llama3")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the exporter need from a tokenizer."""

    @property
    def kind(self) -> str:
        """ "bpe" or "llama3": what `load_tokenizer` takes to make it again."""
        ...

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can emit (the model pads it to a multiple of 64)."""
        ...

    @property
    def eos_id(self) -> int: ...

    @property
    def digest(self) -> str:
        """sha256 identifying the vocabulary exactly: two tokenizers with one digest give the same ids."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no BOS/EOS added; special tokens spelled out in the text stay plain text."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        ...

    def save(self, out_dir: Path) -> list[Path]:
        """Write the files that re-create this tokenizer (and let `transformers` load it); [] if none needed."""
        ...


class BPETokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, every byte in the base alphabet, so no text is unknown).

    Training is deterministic: the same corpus and vocabulary size give the same tokenizer.json bytes in any
    process and with any number of threads (measured; a test keeps it so).
    """

    kind = "bpe"

    def __init__(self, json_text: str) -> None:
        self._json = json_text
        self._tok = HFTokenizer.from_str(json_text)
        # Text that happens to spell "<|endoftext|>" must not forge a document boundary.
        self._tok.encode_special_tokens = True
        eos = self._tok.token_to_id(BPE_EOS)
        if eos is None:
            raise ValueError(f"this tokenizer.json has no {BPE_EOS} token; it was not made by iota")
        self._eos_id = eos
        self._digest = hashlib.sha256(json_text.encode("utf-8")).hexdigest()
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, corpus: Corpus, vocab_size: int) -> BPETokenizer:
        if vocab_size <= 257:
            raise ValueError(
                f"a byte-level BPE needs vocab_size > 257 (256 bytes + {BPE_EOS}), got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BPE_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus.texts, trainer=trainer, length=len(corpus))
        return cls(tok.to_str())

    @classmethod
    def from_file(cls, path: Path) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    @property
    def name(self) -> str:
        return f"bpe-{self._vocab_size}"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def digest(self) -> str:
        return self._digest

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, out_dir: Path) -> list[Path]:
        """tokenizer.json (the exact bytes the digest covers) and the tokenizer_config.json that lets
        `transformers.AutoTokenizer` load the directory."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BPE_EOS,
            "eos_token": BPE_EOS,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        written = [out_dir / TOKENIZER_FILE, out_dir / "tokenizer_config.json"]
        _write_atomic(written[0], self._json.encode("utf-8"))
        _write_atomic(written[1], (json.dumps(config, indent=2) + "\n").encode("utf-8"))
        return written


class Llama3Tokenizer:
    """The Llama 3 vocabulary bundled in `splintr` (no download).

    splintr appends 54 "agent" special tokens above Llama 3's own 128,256 ids, so `vocab_size` is what it
    reports (128,354, ids with gaps); `base_vocab_size` is the original. Texts never produce the extra ids.
    """

    kind = "llama3"
    name = "llama3"

    def __init__(self) -> None:
        self._tok = splintr.Tokenizer.from_pretrained("llama3")
        eos = self._tok.special_token_id(LLAMA3_EOS)
        bos = self._tok.special_token_id(LLAMA3_BOS)
        if eos is None or bos is None:
            raise ValueError(f"splintr's llama3 vocabulary lacks {LLAMA3_EOS} or {LLAMA3_BOS}")
        self._eos_id: int = eos
        self.bos_id: int = bos
        self._vocab_size: int = self._tok.vocab_size
        self.base_vocab_size: int = splintr.base_vocab_size("llama3")
        self._digest: str | None = None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._tok.special_tokens())

    @property
    def digest(self) -> str:
        """sha256 of every id's bytes and the special-token table (ids splintr leaves unassigned hash as empty)."""
        if self._digest is None:
            h = hashlib.sha256(b"splintr:llama3\n")
            for token_id in range(self._vocab_size):
                try:
                    piece = self._tok.decode_token_bytes(token_id)
                except ValueError:  # an unassigned id inside the range (reserved specials splintr leaves out)
                    piece = b""
                h.update(len(piece).to_bytes(4, "little"))
                h.update(piece)
            h.update(json.dumps(sorted(self.special_tokens.items())).encode("utf-8"))
            self._digest = h.hexdigest()
        return self._digest

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode_ordinary(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_ordinary has no batch form; one call per document is still ~10 MB/s, plenty for a corpus.
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, out_dir: Path) -> list[Path]:
        """Nothing to write: the vocabulary ships inside splintr, and the manifest names it."""
        return []


def load_tokenizer(
    kind: str, cache_dir: Path, corpus: Corpus | None = None, vocab_size: int | None = None
) -> Tokenizer:
    """The tokenizer of this `kind` ("bpe" or "llama3").

    For "bpe" with a corpus, the BPE trained on it with `vocab_size`, cached as
    `cache_dir/bpe-<vocab_size>-<corpus digest[:16]>/tokenizer.json` (trained on first use). For "bpe" without
    a corpus, the one saved as `cache_dir/tokenizer.json` (a prepared data set or an exported model).
    `vocab_size` is ignored for "llama3", whose vocabulary is fixed.
    """
    if kind == "llama3":
        return Llama3Tokenizer()
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
    cache_dir = Path(cache_dir)
    if corpus is None:
        path = cache_dir / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass the corpus to train a BPE tokenizer")
        return BPETokenizer.from_file(path)
    if vocab_size is None:
        raise ValueError("training a BPE tokenizer needs a vocab_size")
    path = cache_dir / f"bpe-{vocab_size}-{corpus.digest[:16]}" / TOKENIZER_FILE
    if path.is_file():
        return BPETokenizer.from_file(path)
    tokenizer = BPETokenizer.train(corpus, vocab_size)
    tokenizer.save(path.parent)
    return tokenizer


def _write_atomic(path: Path, data: bytes) -> None:
    # Two processes preparing the same data may race; each writes whole identical files, never a torn one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
