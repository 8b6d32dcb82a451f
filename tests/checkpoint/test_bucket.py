"""Bucket checkpoints as the orchestrator writes them: pulled into the local format, verified, refused when damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iota.checkpoint import (
    FORMAT,
    CheckpointError,
    flat_to_state,
    latest_epoch,
    load_checkpoint,
    pull_checkpoint,
    tensor_list,
)
from iota.data import BPETokenizer, Corpus, Prepared
from iota.model.flat import flatten
from iota.storage import keys
from iota.storage.local import LocalStore
from tests.checkpoint.conftest import RUN, put_checkpoint, same_tensors


def test_flat_layout_is_sorted_names_and_round_trips(prepared: Prepared) -> None:
    models = put_checkpoint(LocalStoreLike(), prepared, 0)
    state = dict(models[1].named_parameters())
    flat = flatten(state)
    # The miner's flat_weights: fp32 parameters concatenated in sorted-name order.
    by_hand = torch.cat([p.detach().reshape(-1) for _, p in sorted(models[1].named_parameters())])
    assert torch.equal(flat, by_hand)
    listed = tensor_list(models[1])
    assert [name for name, _ in listed] == sorted(state) and listed == tensor_list(state)
    assert same_tensors(flat_to_state(flat, listed), {k: v.detach() for k, v in state.items()})
    with pytest.raises(CheckpointError, match="does not hold"):
        flat_to_state(flat[:-1], listed)


def test_pull_round_trip(store: LocalStore, prepared: Prepared, tmp_path: Path) -> None:
    models = put_checkpoint(store, prepared, 0)
    put_checkpoint(store, prepared, 1)
    bucket = json.loads(store.get(keys.checkpoint_manifest(RUN, 1)))
    assert set(bucket) == {
        "format", "run_id", "epoch", "model", "stages", "momentum", "tokens_trained", "data", "schedule",
        "data_cursor", "tokenizer", "preset",
    }  # fmt: skip
    assert set(bucket["stages"][0]) == {
        "index",
        "first_layer",
        "last_layer",
        "key",
        "sha256",
        "n_params",
        "tensors",
    }
    assert bucket["stages"][1]["key"] == keys.checkpoint_stage(RUN, 1, 1)
    assert bucket["stages"][1]["n_params"] * 4 == len(store.get(keys.checkpoint_stage(RUN, 1, 1)))
    out = pull_checkpoint(store, RUN, 1, tmp_path / "ckpt", tokenizer_dir=prepared.directory)
    checkpoint = load_checkpoint(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["epoch"] == 1 and manifest["run_id"] == RUN
    assert (
        manifest["tokens_trained"] == 1000 and manifest["data_cursor"] == 7 and manifest["preset"] == "test"
    )
    assert manifest["momentum"] == {"0": {"0": "runs/run-1/epochs/0/merged/0/0/hk-momentum.f32"}}
    assert manifest["tokenizer"] == {"kind": "bpe", "digest": prepared.manifest.tokenizer_digest}
    assert [e["file"] for e in manifest["stages"]] == [f"stage-{s}.safetensors" for s in range(3)]
    assert all("key" not in e for e in manifest["stages"])
    assert (out / "tokenizer.json").read_bytes() == (prepared.directory / "tokenizer.json").read_bytes()
    assert checkpoint.tokenizer().digest == prepared.manifest.tokenizer_digest
    # Epoch 1 was seeded differently from epoch 0: the pull must take the epoch asked for.
    epoch1 = put_checkpoint(LocalStoreLike(), prepared, 1)
    for state, model, other in zip(checkpoint.states, epoch1, models, strict=True):
        assert same_tensors(state, {k: v.detach() for k, v in model.named_parameters()})
        assert not same_tensors(state, {k: v.detach() for k, v in other.named_parameters()})


def test_corrupted_or_truncated_flat_is_refused(
    store: LocalStore, prepared: Prepared, tmp_path: Path
) -> None:
    put_checkpoint(store, prepared, 0)
    key = keys.checkpoint_stage(RUN, 0, 1)
    good = store.get(key)
    flipped = bytearray(good)
    flipped[100] ^= 0x01
    store.put(key, bytes(flipped))
    with pytest.raises(CheckpointError, match=r"stage 1: sha256 of .*stage-1\.f32 .*corrupted"):
        pull_checkpoint(store, RUN, 0, tmp_path / "a")
    assert not (tmp_path / "a" / "manifest.json").exists()
    store.put(key, good[:-4])
    with pytest.raises(CheckpointError, match=r"holds \d+ bytes, expected \d+"):
        pull_checkpoint(store, RUN, 0, tmp_path / "b")
    store.delete(key)
    with pytest.raises(CheckpointError, match="missing from the store"):
        pull_checkpoint(store, RUN, 0, tmp_path / "c")


def test_missing_manifest_and_latest_epoch(store: LocalStore, prepared: Prepared, tmp_path: Path) -> None:
    assert latest_epoch(store, RUN) is None
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 0 .* it has none yet"):
        pull_checkpoint(store, RUN, 0, tmp_path / "x")
    for epoch in (0, 2, 10):
        put_checkpoint(store, prepared, epoch)
    # An unfinished checkpoint (flats up, manifest not yet) does not count.
    store.put(keys.checkpoint_stage(RUN, 11, 0), b"\0" * 8)
    assert latest_epoch(store, RUN) == 10  # numeric, not string order ("10" < "2")
    assert latest_epoch(store, "other-run") is None
    with pytest.raises(CheckpointError, match="no checkpoint for epoch 11 .*latest complete one is epoch 10"):
        pull_checkpoint(store, RUN, 11, tmp_path / "y")


def test_wrong_tokenizer_dir_is_refused(store: LocalStore, prepared: Prepared, tmp_path: Path) -> None:
    put_checkpoint(store, prepared, 0)
    other = tmp_path / "other-tokenizer"
    BPETokenizer.train(Corpus.from_texts(["some other text entirely"] * 20), 300).save(other)
    with pytest.raises(CheckpointError, match="is not the run's"):
        pull_checkpoint(store, RUN, 0, tmp_path / "z", tokenizer_dir=other)


def test_local_checkpoint_tampering_is_detected(
    store: LocalStore, prepared: Prepared, tmp_path: Path
) -> None:
    import safetensors.torch

    put_checkpoint(store, prepared, 0)
    out = pull_checkpoint(store, RUN, 0, tmp_path / "ckpt")
    path = out / "stage-2.safetensors"
    state = safetensors.torch.load_file(str(path))
    state["norm.weight"] = state["norm.weight"] * 2
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(CheckpointError, match="stage 2: sha256 of the weights"):
        load_checkpoint(out)
    del state["norm.weight"]
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight'\]"):
        load_checkpoint(out)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)


class LocalStoreLike(dict):  # type: ignore[type-arg]
    """Just enough of an ObjectStore to compute a checkpoint's models without writing a bucket."""

    def put(self, key: str, data: bytes) -> None:
        self[key] = data
