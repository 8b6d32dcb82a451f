"""Exports: transformers loads the hf directory and agrees with compose(); bottleneck runs go native instead."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from iota.checkpoint import (
    CheckpointError,
    base_manifest,
    compose,
    export_hf,
    export_native,
    llama3_hf_tokenizer,
    load_checkpoint,
    write_local_checkpoint,
)
from iota.data import Corpus, Llama3Tokenizer, Prepared
from iota.model import Llama, build_stage, plan_stages, preset
from iota.train.schedule import LRSchedule
from tests.checkpoint.conftest import same_tensors

Pulled = Callable[..., tuple[Path, list[Llama]]]


def test_export_hf_matches_compose_and_tokenizer(
    pulled: Pulled, prepared: Prepared, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint_dir, _ = pulled()
    out = export_hf(checkpoint_dir, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"

    with caplog.at_level(logging.WARNING, logger="transformers"):
        theirs = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert not [
        r.getMessage() for r in caplog.records if "rope" in r.getMessage()
    ]  # a config it accepts as is
    assert next(theirs.parameters()).dtype == torch.float32
    ours = compose(load_checkpoint(checkpoint_dir))
    tokens = prepared.token_data(32, seed=0).batch([0, 1, 2])[0]  # real text, (3, 32)
    with torch.no_grad():
        our_logits, their_logits = ours(tokens), theirs(tokens).logits
    assert our_logits.std() > 0.3  # not a comparison of near-zero noise
    torch.testing.assert_close(their_logits, our_logits, rtol=0, atol=1e-5)

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer = load_checkpoint(checkpoint_dir).tokenizer()
    for text in Corpus.kjv().texts[200:205] + ["Hello, world!  Odd   spacing\nand lines."]:
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)
        assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id == config["eos_token_id"]


def test_bottleneck_checkpoint_refuses_hf_and_exports_native(pulled: Pulled, tmp_path: Path) -> None:
    checkpoint_dir, _ = pulled(bottleneck=8)
    with pytest.raises(CheckpointError, match="bottleneck of width 8 .*--format native"):
        export_hf(checkpoint_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before writing anything

    out = export_native(checkpoint_dir, tmp_path / "native")
    original, copied = load_checkpoint(checkpoint_dir), load_checkpoint(out)
    assert copied.manifest == original.manifest
    assert all(same_tensors(a, b) for a, b in zip(original.states, copied.states, strict=True))
    assert copied.tokenizer().digest == original.tokenizer().digest
    readme = (out / "README.md").read_text()
    assert "iota-checkpoint/1" in readme and "stage-2.safetensors" in readme and "bottleneck 8" in readme


def test_llama3_checkpoint_exports_with_its_tokenizer(prepared: Prepared, tmp_path: Path) -> None:
    # Saved directly from models (no bucket); the data plan is only recorded, so the BPE data's plan will do.
    tokenizer = Llama3Tokenizer()
    config = preset("test", tokenizer.vocab_size)
    stages = plan_stages(config.n_layers, 2)
    models = [build_stage(config, spec, seed=5) for spec in stages]
    manifest = base_manifest(
        "llama3-run", 4, config, stages, tokens_trained=123, data_plan=prepared.plan(32, seed=0),
        schedule=LRSchedule(1e-3, 0, 10), data_cursor=9, tokenizer_kind="llama3", tokenizer_digest=tokenizer.digest,
    )  # fmt: skip
    checkpoint_dir = write_local_checkpoint(
        tmp_path / "ckpt", manifest, [m.state_dict() for m in models], tokenizer
    )
    assert not (checkpoint_dir / "tokenizer.json").exists()  # the vocabulary ships inside splintr
    out = export_hf(checkpoint_dir, tmp_path / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "In the beginning God created the heaven and the earth."
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text)  # no BOS: iota trains without one
    theirs = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        expected = models[1](models[0](ids))
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == tokenizer.bos_id


def test_llama3_tokenizer_converts_for_transformers() -> None:
    ours = Llama3Tokenizer()
    theirs = llama3_hf_tokenizer(ours)
    texts = Corpus.kjv().texts[:20] + ["It's 2024: naïve café, 日本語, 12345 and  \t spaces\n\n\nend"]
    for text in texts:
        assert theirs.encode(text, add_special_tokens=False).ids == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text
    assert theirs.token_to_id("<|end_of_text|>") == ours.eos_id
    assert theirs.token_to_id("<|begin_of_text|>") == ours.bos_id
