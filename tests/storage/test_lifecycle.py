"""Expiry helpers, on both stores: only what is past its window goes, and never a checkpoint being written."""

from __future__ import annotations

from iota.storage import ObjectStore, keys
from iota.storage.lifecycle import delete_activations_older_than, keep_last_checkpoints


def test_delete_activations_older_than(store: ObjectStore) -> None:
    for epoch in range(4):
        for sample in (1, 2):
            store.put(keys.activation("r1", epoch, sample, 0, "forward", 0), b"a")
            store.put(keys.activation("r1", epoch, sample, 1, "backward", 0), b"g")
    others = [
        keys.activation("r10", 0, 1, 0, "forward", 0),  # another run whose id shares a prefix
        keys.pseudo_grad("r1", 0, 0, "hk"),
        keys.checkpoint_stage("r1", 0, 0),
        "runs/r1/activations/0/notes.txt",  # not an activation key: left alone
    ]
    for key in others:
        store.put(key, b"keep")

    assert delete_activations_older_than(store, "r1", epoch_cutoff=2) == 8

    left = store.list(keys.activations_prefix("r1"))
    assert sorted({keys.parse_activation(k).epoch for k in left if keys.parse_activation(k)}) == [2, 3]  # type: ignore[union-attr]
    assert len(left) == 9  # 8 activations of epochs 2-3, plus notes.txt
    for key in others:
        assert store.head(key) is not None
    assert delete_activations_older_than(store, "r1", epoch_cutoff=2) == 0


def put_checkpoint(store: ObjectStore, epoch: int, stages: int = 2, complete: bool = True) -> None:
    for stage in range(stages):
        store.put(keys.checkpoint_stage("r1", epoch, stage), b"w")
    if complete:
        store.put(keys.checkpoint_manifest("r1", epoch), b"{}")


def epochs_present(store: ObjectStore) -> list[int]:
    found = {keys.parse_checkpoint_epoch(k) for k in store.list(keys.checkpoints_prefix("r1"))}
    return sorted(e for e in found if e is not None)


def test_keep_last_checkpoints(store: ObjectStore) -> None:
    put_checkpoint(store, 0, complete=False)  # an abandoned partial checkpoint, older than any kept one
    for epoch in (1, 2, 3, 4):
        put_checkpoint(store, epoch)
    put_checkpoint(store, 5, complete=False)  # being written right now
    store.put(keys.checkpoint_stage("r2", 1, 0), b"other run")

    assert keep_last_checkpoints(store, "r1", k=2) == [0, 1, 2]

    assert epochs_present(store) == [3, 4, 5]
    assert store.head(keys.checkpoint_manifest("r1", 3)) is not None
    assert store.head(keys.checkpoint_stage("r1", 5, 1)) is not None
    assert store.head(keys.checkpoint_stage("r2", 1, 0)) is not None
    assert keep_last_checkpoints(store, "r1", k=2) == []


def test_keep_last_checkpoints_with_too_few_to_prune(store: ObjectStore) -> None:
    put_checkpoint(store, 0, complete=False)
    put_checkpoint(store, 1)
    assert keep_last_checkpoints(store, "r1", k=1) == [0]
    assert keep_last_checkpoints(store, "r1", k=3) == []
    assert epochs_present(store) == [1]
