"""Prepared data: the KJV tokenized into checksummed shards, loaded back, corruption refused."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from iota.data import (
    BPETokenizer,
    Corpus,
    DataIntegrityError,
    Llama3Tokenizer,
    Prepared,
    TokenData,
    load_prepared,
    prepare,
    prepare_command,
    seeded_permutation,
)
from iota.data.prepare import DOCUMENT_ORDER_STREAM


@pytest.fixture(scope="module")
def kjv_bpe512(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    out = prepare_command([], "bpe", 512, tmp_path_factory.mktemp("kjv-bpe512"))
    return load_prepared(out)


def test_kjv_round_trip_through_shards(kjv_bpe512: Prepared) -> None:
    m = kjv_bpe512.manifest
    assert (m.corpus_name, m.documents, m.tokenizer_kind, m.vocab_size, m.dtype) == (
        "kjv",
        1189,
        "bpe",
        512,
        "uint16",
    )
    assert m.corpus_digest == Corpus.kjv().digest
    assert m.total_tokens == sum(s.tokens for s in m.shards) == len(kjv_bpe512.tokens)
    assert 1_000_000 < m.total_tokens < 3_000_000
    tokenizer = kjv_bpe512.tokenizer()  # reads the copied tokenizer.json, checks its digest
    assert m.tokenizer_file == "tokenizer.json" and tokenizer.digest == m.tokenizer_digest
    # The stream is the shuffled documents, each followed by EOS.
    assert int((kjv_bpe512.tokens == tokenizer.eos_id).sum()) == 1189
    order = seeded_permutation(1189, 0, DOCUMENT_ORDER_STREAM)
    first = Corpus.kjv().documents[order[0]].text
    expected = tokenizer.encode(first) + [tokenizer.eos_id]
    assert kjv_bpe512.tokens[: len(expected)].tolist() == expected
    assert tokenizer.decode(kjv_bpe512.tokens[: len(expected)].tolist()) == first


def test_unigram_entropy_of_kjv_bpe512(kjv_bpe512: Prepared) -> None:
    data = kjv_bpe512.token_data(seq_len=128, seed=0)
    entropy = data.unigram_entropy()
    assert 3.0 < entropy < 8.0
    assert entropy < math.log(512)  # a trained vocabulary is far from uniform
    assert TokenData.open(kjv_bpe512.directory, data.plan).unigram_entropy() == entropy


def test_corrupted_or_truncated_shard_is_refused(tmp_path: Path) -> None:
    corpus = Corpus.from_texts([f"verse {i}: and it came to pass." for i in range(200)])
    out = prepare(corpus, Llama3Tokenizer(), tmp_path, shard_tokens=500)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and len(manifest["shards"]) > 2
    assert manifest["tokenizer_file"] is None  # llama3 ships inside splintr
    assert all(s["tokens"] == 500 for s in manifest["shards"][:-1])
    clean = load_prepared(out).tokens.copy()

    shard = out / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match="sha256"):
        load_prepared(out)
    unchecked = load_prepared(out, verify=False).tokens
    assert int((unchecked != clean).sum()) == 1
    with pytest.raises(DataIntegrityError, match="sha256"):
        TokenData.open(out, load_prepared(out, verify=False).plan(seq_len=16, seed=0))

    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(DataIntegrityError, match="bytes"):
        load_prepared(out, verify=False)


def test_prepare_again_replaces_shards_and_is_reproducible(tmp_path: Path) -> None:
    corpus = Corpus.from_texts([f"line {i} of the text" for i in range(300)])
    tokenizer = BPETokenizer.train(corpus, 300)
    prepare(corpus, tokenizer, tmp_path / "a", shard_tokens=400)
    prepare(corpus, tokenizer, tmp_path / "b", shard_tokens=400)
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    assert a.manifest.shards == b.manifest.shards
    prepare(corpus, tokenizer, tmp_path / "a", shard_tokens=10_000)
    again = load_prepared(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").glob("shard_*.bin")) == ["shard_00000.bin"]
    assert np.array_equal(again.tokens, a.tokens)
    in_order = load_prepared(prepare(corpus, tokenizer, tmp_path / "c", document_order_seed=None))
    assert in_order.tokens[: len(tokenizer.encode("line 0 of the text"))].tolist() == tokenizer.encode(
        "line 0 of the text"
    )
    assert not np.array_equal(in_order.tokens, a.tokens)


def test_prepare_command_from_a_jsonl_export(tmp_path: Path) -> None:
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps({"body": f"record {i} says hello"}) + "\n" for i in range(120)))
    out = prepare_command([export], "bpe", 300, tmp_path / "out", text_field="body")
    prepared = load_prepared(out)
    assert prepared.manifest.documents == 120 and prepared.manifest.tokenizer_name == "bpe-300"
    assert (out / "tokenizer.json").is_file() and list((out / "tokenizer-cache").glob("bpe-300-*"))
    with pytest.raises(FileNotFoundError, match="iota data prepare"):
        load_prepared(tmp_path / "nothing-here")
