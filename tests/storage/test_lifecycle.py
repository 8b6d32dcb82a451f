"""The lifecycle pass on both stores: what is past its window goes; the kept epochs, the newest checkpoints, a
checkpoint being written, other runs and the run's data stay; a pass cut short never leaves a checkpoint that looks
whole; S3 deletes in batches."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from iota.storage import ObjectStore, keys
from iota.storage.base import StoreError
from iota.storage.lifecycle import Keep, expire

RUN = "r1"
EPOCHS = range(6)


def live_key(epoch: int, sample: int = 1) -> str:
    return keys.activation(RUN, epoch, sample, 0, "forward", 2 * sample)


def garbage_key(epoch: int, sample: int = 1) -> str:
    """The output key of a lease that lapsed: a later lease of the same hop writes elsewhere."""
    return keys.activation(RUN, epoch, sample, 0, "forward", 2 * sample + 1)


def put_checkpoint(store: ObjectStore, epoch: int, complete: bool = True) -> None:
    for stage in (0, 1):
        store.put(keys.checkpoint_stage(RUN, epoch, stage), b"w")
    store.put(keys.checkpoint_momentum(RUN, epoch, 0, 0), b"m")
    if complete:
        store.put(keys.checkpoint_manifest(RUN, epoch), b"{}")


def fill(store: ObjectStore) -> list[str]:
    """Six epochs of a run, checkpoints 0-6 and a seventh being written, score logs; returns what other runs and
    the run's own data hold (never expired)."""
    for epoch in EPOCHS:
        store.put(live_key(epoch), b"a")
        store.put(garbage_key(epoch), b"stale")
        store.put(keys.pseudo_grad(RUN, epoch, 0, "hk"), b"g")
        store.put(keys.merged_slice(RUN, epoch, 0, 0, "hk"), b"s")
        store.put(keys.snapshot(RUN, epoch, 0, "hk", 3), b"p")
        store.put(keys.scores(RUN, epoch + 1), b"{}")
    for epoch in range(7):
        put_checkpoint(store, epoch)
    put_checkpoint(store, 7, complete=False)
    others = [
        keys.activation("r10", 0, 1, 0, "forward", 0),  # another run whose id shares a prefix
        keys.checkpoint_stage("r10", 0, 0),
        keys.run_config(RUN),
        keys.data_shard(RUN, "train-0.bin"),
    ]
    for key in others:
        store.put(key, b"keep")
    return others


def present(store: ObjectStore, parse: Callable[[str], int | None]) -> set[int]:
    """The epochs `parse` finds among the run's keys."""
    return {e for k in store.list(keys.run_prefix(RUN)) if (e := parse(k)) is not None}


def test_expire_keeps_the_window_pinned_epochs_and_newest_checkpoints(store: ObjectStore) -> None:
    others = fill(store)
    live = {live_key(epoch) for epoch in EPOCHS}
    keep = Keep(epochs_from=3, checkpoints=2, pinned=frozenset({1}))

    expired = expire(store, RUN, keep, lambda: live)

    def activation_epoch(key: str) -> int | None:
        parsed = keys.parse_activation(key)
        return parsed.epoch if parsed is not None else None

    assert present(store, activation_epoch) == {1, 3, 4, 5}
    for epoch in EPOCHS:
        assert store.head(garbage_key(epoch)) is None  # no hop names it, in a kept epoch or not
    assert present(store, keys.parse_epoch_object) == {1, 3, 4, 5}
    # The newest two complete (5, 6), those of kept epochs (3, 4, and 1 pinned), and 7 being written.
    assert present(store, keys.parse_checkpoint_epoch) == {1, 3, 4, 5, 6, 7}
    assert store.head(keys.checkpoint_momentum(RUN, 1, 0, 0)) is not None
    assert present(store, lambda k: keys.parse_scores_epoch(k, RUN)) == {5, 6}
    for key in others:
        assert store.head(key) is not None
    assert expired.checkpoints == (0, 2)
    assert (expired.activations, expired.epoch_objects, expired.scores) == (6 + 2, 3 * 2, 4)

    assert expire(store, RUN, keep, lambda: live).total == 0  # a second pass finds nothing more


def test_fewer_complete_checkpoints_than_kept_keeps_them_all(store: ObjectStore) -> None:
    put_checkpoint(store, 0, complete=False)  # abandoned
    put_checkpoint(store, 1)
    store.put(keys.scores(RUN, 1), b"{}")
    assert expire(store, RUN, Keep(epochs_from=5, checkpoints=2), set).checkpoints == ()
    assert present(store, keys.parse_checkpoint_epoch) == {0, 1}
    assert expire(store, RUN, Keep(epochs_from=5, checkpoints=1), set).checkpoints == (0,)
    assert present(store, keys.parse_checkpoint_epoch) == {1}
    assert store.head(keys.scores(RUN, 1)) is not None  # the newest score log always stays
    with pytest.raises(ValueError, match="at least one checkpoint"):
        Keep(epochs_from=0, checkpoints=0)


def test_an_activation_leased_after_the_live_keys_were_read_is_kept(store: ObjectStore) -> None:
    """`live()` is read after the listing: an output uploaded under a lease that `live()` could not see yet was
    not listed, so it is not taken for a lapsed lease's."""
    store.put(garbage_key(4), b"stale")
    late = live_key(4, sample=2)

    def live() -> Collection[str]:
        store.put(late, b"uploaded under a lease issued after live() looked")
        return set()

    expire(store, RUN, Keep(epochs_from=0, checkpoints=1), live)
    assert store.head(late) is not None
    assert store.head(garbage_key(4)) is None


def test_a_pass_cut_short_leaves_no_checkpoint_that_looks_whole(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for epoch in range(4):
        put_checkpoint(store, epoch)
    batches: list[Sequence[str]] = []
    delete_many = store.delete_many

    def second_batch_fails(keys: Sequence[str]) -> None:
        batches.append(keys)
        if len(batches) == 2:
            raise StoreError("connection lost")  # the pass is cut short between its two batches
        delete_many(keys)

    monkeypatch.setattr(store, "delete_many", second_batch_fails)
    with pytest.raises(StoreError):
        expire(store, RUN, Keep(epochs_from=9, checkpoints=1), set)
    monkeypatch.undo()
    for epoch in range(3):
        assert store.head(keys.checkpoint_manifest(RUN, epoch)) is None
        assert store.head(keys.checkpoint_stage(RUN, epoch, 0)) is not None  # incomplete: never loaded
    assert store.head(keys.checkpoint_manifest(RUN, 3)) is not None  # the latest is whole
    expire(store, RUN, Keep(epochs_from=9, checkpoints=1), set)  # the next pass finishes the job
    assert present(store, keys.parse_checkpoint_epoch) == {3}


def test_delete_many_deletes_past_one_request(store: ObjectStore) -> None:
    """More keys than S3 takes in one DeleteObjects (1,000), absent ones among them."""
    names = [keys.activation(RUN, 0, sample, 0, "forward", 0) for sample in range(1003)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: store.put(key, b""), names))
    store.put(keys.run_config(RUN), b"{}")
    store.delete_many([*names, keys.activation(RUN, 9, 9, 0, "forward", 0)])
    assert store.list(keys.run_prefix(RUN)) == [keys.run_config(RUN)]
    store.delete_many([])
