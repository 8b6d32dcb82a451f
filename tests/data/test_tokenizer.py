"""Tokenizers: deterministic BPE training, lossless round trips, the offline Llama 3 vocabulary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iota.data import BPETokenizer, Corpus, Llama3Tokenizer, Tokenizer, load_tokenizer

SAMPLES = [
    "In the beginning God created the heaven and the earth.",
    "  leading spaces, trailing tabs\t\n\nand blank lines\n",
    "unicode: café, naïve, 日本語, emoji 🙂, ¶ §",
    "a literal <|endoftext|> and <|end_of_text|> must stay text",
    "",
]


@pytest.fixture(scope="module")
def kjv() -> Corpus:
    return Corpus.kjv()


@pytest.fixture(scope="module")
def bpe512(kjv: Corpus) -> BPETokenizer:
    return BPETokenizer.train(kjv, 512)


def test_bpe_training_is_deterministic_in_another_process_and_thread_count(
    kjv: Corpus, bpe512: BPETokenizer
) -> None:
    again = BPETokenizer.train(kjv, 512)
    assert again.digest == bpe512.digest
    # A fresh process (new hash seeds) with a single training thread must produce the same bytes.
    code = "from iota.data import BPETokenizer, Corpus; print(BPETokenizer.train(Corpus.kjv(), 512).digest)"
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == bpe512.digest
    assert BPETokenizer.train(kjv, 600).digest != bpe512.digest


def test_bpe_shape_and_round_trip(bpe512: BPETokenizer) -> None:
    assert isinstance(bpe512, Tokenizer)
    assert (bpe512.vocab_size, bpe512.eos_id, bpe512.name, bpe512.kind) == (512, 0, "bpe-512", "bpe")
    for text in SAMPLES:
        ids = bpe512.encode(text)
        assert bpe512.decode(ids) == text
        assert all(0 <= i < bpe512.vocab_size for i in ids)
    # The literal EOS spelling is plain text, never the document separator.
    assert bpe512.eos_id not in bpe512.encode(SAMPLES[3])
    assert bpe512.encode_batch(SAMPLES) == [bpe512.encode(t) for t in SAMPLES]
    # Merges learned from the KJV make its text shorter than its bytes.
    verse = SAMPLES[0]
    assert len(bpe512.encode(verse)) < len(verse.encode()) / 2


def test_load_tokenizer_caches_by_corpus_and_size(tmp_path: Path) -> None:
    corpus = Corpus.from_texts(["the cat sat on the mat\n"] * 50 + ["a dog ran far away\n"] * 50)
    first = load_tokenizer("bpe", tmp_path, corpus, 300)
    cached = list(tmp_path.glob("bpe-300-*/tokenizer.json"))
    assert len(cached) == 1 and cached[0].parent.name == f"bpe-300-{corpus.digest[:16]}"
    mtime = cached[0].stat().st_mtime_ns
    second = load_tokenizer("bpe", tmp_path, corpus, 300)
    assert second.digest == first.digest and cached[0].stat().st_mtime_ns == mtime  # read, not retrained
    assert load_tokenizer("bpe", cached[0].parent).digest == first.digest  # from a saved directory
    with pytest.raises(FileNotFoundError):
        load_tokenizer("bpe", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer("bpe", tmp_path, corpus, None)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("sentencepiece", tmp_path, corpus, 300)


def test_saved_bpe_loads_in_transformers(bpe512: BPETokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    paths = bpe512.save(tmp_path)
    assert {p.name for p in paths} == {"tokenizer.json", "tokenizer_config.json"}
    assert BPETokenizer.from_file(tmp_path / "tokenizer.json").digest == bpe512.digest
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = SAMPLES[0] + "\n" + SAMPLES[2]
    assert hf.encode(text, add_special_tokens=False) == bpe512.encode(text)
    assert hf.eos_token_id == bpe512.eos_id
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"


def test_llama3_vocabulary_from_splintr_offline(tmp_path: Path) -> None:
    tok = load_tokenizer("llama3", tmp_path, None, 4096)  # vocab_size is ignored: the vocabulary is fixed
    assert isinstance(tok, Llama3Tokenizer) and isinstance(tok, Tokenizer)
    assert tok.base_vocab_size == 128256
    agent_tokens = [i for i in tok.special_tokens.values() if i >= tok.base_vocab_size]
    assert len(agent_tokens) == 54
    assert tok.vocab_size == max(tok.special_tokens.values()) + 1 == 128354
    assert tok.eos_id == 128001 and tok.bos_id == 128000
    assert tok.encode("In the beginning God created the heaven and the earth.") == [
        644, 279, 7314, 4359, 3549, 279, 23070, 323, 279, 9578, 13,
    ]  # fmt: skip
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id not in tok.encode(SAMPLES[3])
    assert tok.digest == Llama3Tokenizer().digest and len(tok.digest) == 64
    assert tok.save(tmp_path) == []
