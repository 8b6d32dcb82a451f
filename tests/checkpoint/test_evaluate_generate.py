"""Evaluation on the checkpoint's own held-out data, compose() against the stages chained by hand, and generation."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from iota.checkpoint import (
    CheckpointError,
    Pipeline,
    compose,
    eval_command,
    evaluate,
    find_prepared,
    generate,
    load_checkpoint,
    pull_checkpoint,
)
from iota.data import Corpus, Prepared, load_prepared, load_tokenizer, prepare
from iota.model import Llama
from iota.storage.local import LocalStore
from iota.train.run import heldout_loss
from tests.checkpoint.conftest import RUN, put_checkpoint

Pulled = Callable[..., tuple[Path, list[Llama]]]


def test_compose_with_bottleneck_chains_the_stages(pulled: Pulled, prepared: Prepared) -> None:
    checkpoint_dir, models = pulled(bottleneck=8)
    composed = compose(load_checkpoint(checkpoint_dir))
    assert isinstance(composed, Pipeline)
    tokens = prepared.token_data(32, seed=0).batch([3, 4])[0]
    with torch.no_grad():
        by_hand = models[2](models[1](models[0](tokens)))
        ours = composed(tokens)
    assert ours.shape == (2, 32, models[2].config.vocab_size)
    assert torch.equal(ours, by_hand)


def test_compose_without_bottleneck_is_one_model(pulled: Pulled, prepared: Prepared) -> None:
    checkpoint_dir, models = pulled()
    composed = compose(load_checkpoint(checkpoint_dir))
    assert isinstance(composed, Llama) and composed.spec.n_stages == 1
    tokens = prepared.token_data(32, seed=0).batch([5])[0]
    with torch.no_grad():
        torch.testing.assert_close(
            composed(tokens), models[2](models[1](models[0](tokens))), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("bottleneck", [None, 8])
def test_evaluate_equals_heldout_loss(pulled: Pulled, prepared: Prepared, bottleneck: int | None) -> None:
    checkpoint_dir, _ = pulled(bottleneck)
    checkpoint = load_checkpoint(checkpoint_dir)
    data = prepared.token_data(32, seed=0, heldout_fraction=0.02)
    report = evaluate(checkpoint_dir, data, n_samples=12)
    expected = heldout_loss(compose(checkpoint), data, 12)
    assert report["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert 5.0 < report["eval_loss"] < 12.0  # a random model on 512 tokens: about ln(512) = 6.2 or worse
    assert report["n_samples"] == 12 and report["epoch"] == 0 and report["tokens_trained"] == 0
    assert report["preset"] == "test" and report["checkpoint"] == str(checkpoint_dir)


def test_eval_command_finds_the_prepared_data(pulled: Pulled, prepared: Prepared, tmp_path: Path) -> None:
    checkpoint_dir, _ = pulled()
    data_dir = prepared.directory.parent
    assert find_prepared(data_dir, json.loads((checkpoint_dir / "manifest.json").read_text())["data"]) == (
        prepared.directory
    )
    report = eval_command(checkpoint_dir, data_dir, n_samples=8, report_path=tmp_path / "r" / "eval.json")
    assert json.loads((tmp_path / "r" / "eval.json").read_text()) == report
    direct = evaluate(checkpoint_dir, prepared.token_data(32, seed=0, heldout_fraction=0.02), 8)
    assert report["eval_loss"] == direct["eval_loss"]


def test_find_prepared_refuses_other_data(pulled: Pulled, prepared: Prepared, tmp_path: Path) -> None:
    checkpoint_dir, _ = pulled()
    plan = json.loads((checkpoint_dir / "manifest.json").read_text())["data"]
    elsewhere = tmp_path / "elsewhere"
    corpus = Corpus("kjv-other", Corpus.kjv().documents[120:170])
    prepare(corpus, load_tokenizer("bpe", elsewhere / "cache", corpus, 300), elsewhere / "other-bpe300")
    with pytest.raises(
        CheckpointError, match=r"no prepared data under .*elsewhere.*searched: .*other-bpe300"
    ):
        find_prepared(elsewhere, plan)
    # The same shard names with different bytes are not the same data either.
    copy = elsewhere / "copy"
    shutil.copytree(prepared.directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="no prepared data"):
        find_prepared(elsewhere, plan)
    with pytest.raises(CheckpointError, match="does not exist"):
        find_prepared(tmp_path / "nowhere", plan)


def test_evaluate_refuses_data_of_another_tokenizer(pulled: Pulled, tmp_path: Path) -> None:
    checkpoint_dir, _ = pulled()
    corpus = Corpus("kjv-other", Corpus.kjv().documents[120:170])
    other = prepare(corpus, load_tokenizer("bpe", tmp_path / "cache", corpus, 300), tmp_path / "other")
    with pytest.raises(CheckpointError, match="the loss would mean nothing"):
        evaluate(checkpoint_dir, load_prepared(other).token_data(32, seed=0), 4)


def test_generate_is_greedy_at_zero_and_seeded_otherwise(pulled: Pulled) -> None:
    checkpoint_dir, _ = pulled()
    prompt = "In the beginning God"
    greedy = generate(checkpoint_dir, prompt, max_new_tokens=12, temperature=0.0, seed=1)
    assert greedy == generate(checkpoint_dir, prompt, max_new_tokens=12, temperature=0.0, seed=2)

    checkpoint = load_checkpoint(checkpoint_dir)
    tokenizer, model = checkpoint.tokenizer(), compose(checkpoint)
    context = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            next_id = int(model(torch.tensor([context]))[0, -1, : tokenizer.vocab_size].argmax())
            if next_id == tokenizer.eos_id:
                break
            context.append(next_id)
            new.append(next_id)
    assert greedy == tokenizer.decode(tokenizer.encode(prompt) + new)[len(prompt) :]
    assert len(new) > 0 and greedy

    sampled = generate(checkpoint_dir, prompt, max_new_tokens=12, temperature=1.0, seed=7)
    assert sampled == generate(checkpoint_dir, prompt, max_new_tokens=12, temperature=1.0, seed=7)
    assert sampled != generate(checkpoint_dir, prompt, max_new_tokens=12, temperature=1.0, seed=8)


def test_generate_on_a_bottleneck_checkpoint(pulled: Pulled) -> None:
    checkpoint_dir, _ = pulled(bottleneck=8)
    text = generate(checkpoint_dir, "And the LORD", max_new_tokens=8, temperature=0.0, seed=0)
    assert isinstance(text, str) and text
    assert text == generate(checkpoint_dir, "And the LORD", max_new_tokens=8, temperature=0.0, seed=0)


def test_generate_needs_the_tokenizer(store: LocalStore, prepared: Prepared, tmp_path: Path) -> None:
    put_checkpoint(store, prepared, 0)
    bare = pull_checkpoint(store, RUN, 0, tmp_path / "bare")  # no tokenizer_dir: weights only
    with pytest.raises(CheckpointError, match="no tokenizer.json: pull the checkpoint with"):
        generate(bare, "x", max_new_tokens=1, temperature=0.0, seed=0)
