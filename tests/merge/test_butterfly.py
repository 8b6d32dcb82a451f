"""The butterfly merge: owners agree to the bit, match a float64 reference, and survive injected faults."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch

from iota.merge import (
    DictStore,
    FlatRef,
    HeldCopies,
    MergePlan,
    OuterConfig,
    OwnerRun,
    Submitter,
    apply_merged,
    check_claimed_norms,
    make_plan,
    partition_bounds,
    pseudo_gradient,
    run_owner,
    sha256_hex,
    squared_norm,
)
from iota.model.flat import decode_f32, encode_f32

N_PARAMS = 10_000
N_PARTITIONS = 8


class Stage:
    """One stage's end of epoch: start weights and momentum in the bucket, R replicas' pseudo-gradients uploaded."""

    def __init__(
        self,
        r: int,
        *,
        n_params: int = N_PARAMS,
        n_partitions: int = N_PARTITIONS,
        outer: OuterConfig | None = None,
        with_momentum: bool = True,
        clip: float | None = None,
        trim_fraction: float = 0.0,
        scales: list[float] | None = None,
        claim_factor: dict[str, float] | None = None,
        epoch: int = 3,
        seed: int = 0,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.store = DictStore()
        self.start = torch.randn(n_params, generator=gen)
        self.momentum0 = torch.randn(n_params, generator=gen) * 0.01 if with_momentum else None
        self.store.put("start", encode_f32(self.start))
        if self.momentum0 is not None:
            self.store.put("momentum", encode_f32(self.momentum0))
        self.grads: dict[str, torch.Tensor] = {}
        submitters = []
        for i in range(r):
            hotkey = f"hk{i}"
            end = self.start + torch.randn(n_params, generator=gen) * 0.01 * (scales[i] if scales else 1.0)
            grad = pseudo_gradient(self.start, end)
            self.grads[hotkey] = grad
            self.store.put(f"up/{hotkey}", encode_f32(grad))
            claimed = math.sqrt(squared_norm(grad)) * (claim_factor or {}).get(hotkey, 1.0)
            submitters.append(
                Submitter(
                    hotkey=hotkey, upload_key=f"up/{hotkey}", weight=1.0 + 0.5 * i, claimed_norm=claimed
                )
            )
        n = len(partition_bounds(n_params, n_partitions))
        self.plan: MergePlan = make_plan(
            run="run1",
            epoch=epoch,
            stage=2,
            n_params=n_params,
            n_partitions=n_partitions,
            submitters=submitters,
            prev_weights=[FlatRef(key="start")] * n,
            prev_momentum=[FlatRef(key="momentum")] * n if with_momentum else None,
            outer=outer,
            clip=clip,
            trim_fraction=trim_fraction,
        )

    def run_all(self, threads: Callable[[int], int] = lambda i: 1) -> dict[str, OwnerRun]:
        """Every submitter merges its partitions; owner i runs with threads(i) torch threads, reading uploads
        1-3 at a time and merging 1 or 2 partitions at once."""
        saved = torch.get_num_threads()
        runs = {}
        try:
            for i, hotkey in enumerate(self.plan.hotkeys):
                torch.set_num_threads(threads(i))
                runs[hotkey] = run_owner(
                    self.store.for_caller(hotkey),
                    self.plan,
                    hotkey,
                    fetch_workers=1 + i % 3,
                    workers=1 + i % 2,
                )
        finally:
            torch.set_num_threads(saved)
        return runs

    def merged_keys(self, kind: str = "weights") -> dict[int, str]:
        return {p.index: self.plan.output_key(p.index, p.owners[0], kind) for p in self.plan.partitions}

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        weights = apply_merged(self.store, self.plan, self.merged_keys("weights"))
        momentum = apply_merged(self.store, self.plan, self.merged_keys("momentum"))
        return weights, momentum


def reference(stage: Stage, skip: dict[int, set[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The merge written the straightforward way, in float64 numpy, partition by partition."""
    plan = stage.plan
    lr = (
        plan.outer.lr * min(1.0, (plan.epoch + 1) / plan.outer.warmup_epochs)
        if plan.outer.warmup_epochs
        else plan.outer.lr
    )
    mu = plan.outer.momentum
    theta0 = stage.start.double().numpy()
    m0 = stage.momentum0.double().numpy() if stage.momentum0 is not None else np.zeros(plan.n_params)
    theta, momentum = theta0.copy(), m0.copy()
    for p in plan.partitions:
        s, e = p.start, p.end
        used = [sub for sub in plan.submitters if sub.hotkey not in (skip or {}).get(p.index, set())]
        xs = []
        for sub in used:
            x = stage.grads[sub.hotkey][s:e].double().numpy()
            if plan.clip is not None:
                limit = plan.clip * math.sqrt((e - s) / plan.n_params)
                norm = np.linalg.norm(x)
                if norm > limit:
                    x = x * (limit / norm)
            xs.append(x)
        if not xs:
            continue
        w = np.array([sub.weight for sub in used]) / sum(sub.weight for sub in used)
        k = math.floor(plan.trim_fraction * len(xs))
        if k:
            stacked = np.stack(xs)
            order = np.argsort(stacked, axis=0, kind="stable")
            values = np.take_along_axis(stacked, order, axis=0)[k : len(xs) - k]
            weights = w[order][k : len(xs) - k]
            g = (values * weights).sum(0) / weights.sum(0)
        else:
            g = sum(wi * xi for wi, xi in zip(w, xs, strict=True))
        m = mu * m0[s:e] + g
        update = g + mu * m if plan.outer.nesterov else m
        theta[s:e] = theta0[s:e] - lr * update
        momentum[s:e] = m
    return theta, momentum


def assert_close_rel(actual: torch.Tensor, expected: np.ndarray, rtol: float = 1e-6) -> None:
    error = np.linalg.norm(actual.double().numpy() - expected) / np.linalg.norm(expected)
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_two_owners_agree_bit_for_bit(r):
    # Partitions of 50k elements so that torch would split elementwise work across threads; owners differ in
    # thread count and fetch concurrency.
    stage = Stage(
        r, n_params=200_000, n_partitions=4, outer=OuterConfig(lr=0.7, momentum=0.9, warmup_epochs=10)
    )
    runs = stage.run_all(threads=lambda i: 1 + i % 2)
    for p in stage.plan.partitions:
        digests = set()
        for owner in p.owners:
            result = runs[owner].results[p.index]
            stored = stage.store.objects[stage.plan.output_key(p.index, owner, "weights")]
            assert sha256_hex(stored) == result.weights_digest
            digests.add((result.weights_digest, result.momentum_digest, result.digest))
        assert len(digests) == 1, f"partition {p.index}: owners {p.owners} disagree"
    if r == 1:
        assert stage.plan.audit
        again = run_owner(stage.store, stage.plan, "hk0")  # a recomputation (audit) reproduces the bits
        assert all(again.results[i].digest == runs["hk0"].results[i].digest for i in again.results)
    else:
        # A tie-breaker's recomputation of a partition matches its owners too.
        third = stage.plan.tiebreaker(0)
        if third is not None:
            recomputed = run_owner(stage.store, stage.plan, third, partitions=[0])
            assert recomputed.results[0].digest == runs[stage.plan.partitions[0].owners[0]].results[0].digest


@pytest.mark.parametrize("r", [1, 2, 3, 4])
@pytest.mark.parametrize("nesterov", [True, False])
def test_merge_matches_reference(r, nesterov):
    stage = Stage(r, outer=OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov, warmup_epochs=5))
    runs = stage.run_all()
    assert all(not run.failed for run in runs.values())
    weights, momentum = stage.merged()
    ref_weights, ref_momentum = reference(stage)
    assert_close_rel(weights, ref_weights)
    assert_close_rel(momentum, ref_momentum)
    assert (
        check_claimed_norms(
            stage.plan,
            {i: runs[p.owners[0]].results[i].slice_sq_norms for i, p in enumerate(stage.plan.partitions)},
        )
        == []
    )


def test_plain_averaging_identity_through_the_merge():
    """lr=1, momentum=0, equal weights: the merged weights are the mean of the replicas' end weights."""
    stage = Stage(3, outer=OuterConfig(lr=1.0, momentum=0.0), with_momentum=False)
    stage.plan = stage.plan.model_copy(
        update={"submitters": [s.model_copy(update={"weight": 2.0}) for s in stage.plan.submitters]}
    )
    stage.run_all()
    weights, _ = stage.merged()
    ends = [stage.start.double() - g.double() for g in stage.grads.values()]
    mean_end = (ends[0] + ends[1] + ends[2]) / 3
    torch.testing.assert_close(weights.double(), mean_end, rtol=0, atol=1e-6)


def _drop(store: DictStore, key: str) -> None:
    del store.objects[key]


def _truncate(store: DictStore, key: str) -> None:
    store.objects[key] = store.objects[key][: len(store.objects[key]) // 2 + 2]  # also leaves a partial float


def _overlong(store: DictStore, key: str) -> None:
    store.objects[key] += encode_f32(torch.zeros(1))


def _nan_everywhere(store: DictStore, key: str) -> None:
    values = decode_f32(store.objects[key])
    values[:: N_PARAMS // N_PARTITIONS // 2] = float("nan")  # some NaN in every partition
    store.objects[key] = encode_f32(values)


def _inf_everywhere(store: DictStore, key: str) -> None:
    values = decode_f32(store.objects[key])
    values[7 :: N_PARAMS // N_PARTITIONS] = float("inf")
    store.objects[key] = encode_f32(values)


FAULTS: dict[str, tuple[Callable[[DictStore, str], None], str]] = {
    "missing_upload": (_drop, "missing"),
    "truncated_upload": (_truncate, "wrong size"),
    "overlong_upload": (_overlong, "wrong size"),
    "nan_upload": (_nan_everywhere, "non-finite"),
    "inf_upload": (_inf_everywhere, "non-finite"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_upload_is_skipped_and_the_rest_merge(fault):
    inject, reason = FAULTS[fault]
    stage = Stage(4)
    inject(stage.store, "up/hk2")
    runs = stage.run_all()
    for run in runs.values():
        assert not run.failed
        for result in run.results.values():
            assert result.used == ["hk0", "hk1", "hk3"]
            assert result.skipped["hk2"].startswith(reason), result.skipped
    weights, momentum = stage.merged()
    every_partition = {p.index: {"hk2"} for p in stage.plan.partitions}
    ref_weights, ref_momentum = reference(stage, skip=every_partition)
    assert_close_rel(weights, ref_weights)
    assert_close_rel(momentum, ref_momentum)
    norms = {i: runs[p.owners[0]].results[i].slice_sq_norms for i, p in enumerate(stage.plan.partitions)}
    assert check_claimed_norms(stage.plan, norms) == ["hk2"]


def test_nan_in_one_partition_skips_that_upload_there_only_and_flags_it():
    stage = Stage(3)
    values = decode_f32(stage.store.objects["up/hk1"])
    p2 = stage.plan.partitions[2]
    values[p2.start + 5] = float("nan")
    stage.store.put("up/hk1", encode_f32(values))
    runs = stage.run_all()
    for run in runs.values():
        for index, result in run.results.items():
            assert ("hk1" in result.skipped) == (index == 2)
    weights, _ = stage.merged()
    assert_close_rel(weights, reference(stage, skip={2: {"hk1"}})[0])
    norms = {i: runs[p.owners[0]].results[i].slice_sq_norms for i, p in enumerate(stage.plan.partitions)}
    assert check_claimed_norms(stage.plan, norms) == ["hk1"]


def test_no_usable_upload_keeps_previous_weights_and_momentum():
    stage = Stage(2)
    for hotkey in stage.plan.hotkeys:
        _drop(stage.store, f"up/{hotkey}")
    runs = stage.run_all()
    assert all(set(r.skipped) == {"hk0", "hk1"} for run in runs.values() for r in run.results.values())
    weights, momentum = stage.merged()
    assert torch.equal(weights, stage.start) and torch.equal(momentum, stage.momentum0)


def test_unreadable_previous_state_is_recorded_not_raised():
    stage = Stage(2)
    _drop(stage.store, "momentum")
    runs = stage.run_all()
    for hotkey, run in runs.items():
        assert not run.results and set(run.failed) == set(stage.plan.partitions_of(hotkey))
        assert all("previous state unreadable" in why for why in run.failed.values())
    assert not any(key.startswith("runs/") for key in stage.store.objects)  # nothing uploaded


def test_trimmed_mean_drops_an_outlier_replica():
    stage = Stage(5, outer=OuterConfig(lr=1.0, momentum=0.0), with_momentum=False, trim_fraction=0.2)
    poisoned = stage.grads["hk4"] * 1000 + 5.0
    stage.grads["hk4"] = poisoned
    stage.store.put("up/hk4", encode_f32(poisoned))
    stage.run_all()
    weights, momentum = stage.merged()
    assert_close_rel(weights, reference(stage)[0])
    # lr=1, momentum=0: the momentum output is the aggregated pseudo-gradient itself.
    honest = torch.stack([stage.grads[h] for h in ("hk0", "hk1", "hk2", "hk3")])
    assert bool((momentum >= honest.min(0).values).all() and (momentum <= honest.max(0).values).all())
    plain = Stage(5, outer=OuterConfig(lr=1.0, momentum=0.0), with_momentum=False)
    plain.store.put("up/hk4", encode_f32(poisoned))
    plain.run_all()
    assert plain.merged()[1].abs().max() > 1.0  # without trimming the outlier dominates


def test_clipping_bounds_each_slice():
    # Replica norms ~1 (hk0), ~10 (hk1), ~0.1 (hk2); C=2 clips hk1 only.
    stage = Stage(3, clip=2.0, scales=[1.0, 10.0, 0.1])
    runs = stage.run_all()
    for run in runs.values():
        for result in run.results.values():
            assert result.clipped == ["hk1"]
            limit_sq = (2.0**2) * stage.plan.partitions[result.index].size / N_PARAMS
            assert result.slice_sq_norms["hk1"] > limit_sq > result.slice_sq_norms["hk0"]
    weights, momentum = stage.merged()
    assert_close_rel(weights, reference(stage)[0])
    assert_close_rel(momentum, reference(stage)[1])
    unclipped = Stage(3, scales=[1.0, 10.0, 0.1])
    unclipped.run_all()
    assert not torch.allclose(unclipped.merged()[0], weights)
    huge_c = Stage(3, clip=1e6, scales=[1.0, 10.0, 0.1])
    huge_c.run_all()
    assert torch.equal(huge_c.merged()[0], unclipped.merged()[0])


def test_claimed_norms_are_checked():
    stage = Stage(4, claim_factor={"hk1": 1.01, "hk2": 1.0005, "hk3": float("nan")})
    runs = stage.run_all()
    norms = {i: runs[p.owners[0]].results[i].slice_sq_norms for i, p in enumerate(stage.plan.partitions)}
    assert check_claimed_norms(stage.plan, norms) == ["hk1", "hk3"]  # hk2 is within 1e-3
    # With partitions unreported the sums are incomplete: only uploads skipped somewhere are flagged.
    partial = {i: norms[i] for i in range(4)}
    assert check_claimed_norms(stage.plan, partial) == []
    partial[1] = {h: v for h, v in partial[1].items() if h != "hk0"}
    assert check_claimed_norms(stage.plan, partial) == ["hk0"]


def test_apply_merged_keeps_old_values_for_unmerged_partitions():
    stage = Stage(2)
    stage.run_all()
    keys = stage.merged_keys()
    del keys[3]  # nobody merged partition 3
    stage.store.put("bad", encode_f32(torch.zeros(7)))
    keys[5] = "bad"  # a merged object of the wrong size
    keys[6] = "absent"  # a merged object that is not there
    full = stage.merged_keys()
    merged_all = apply_merged(stage.store, stage.plan, full)
    for previous in (None, stage.start.clone()):
        applied = apply_merged(stage.store, stage.plan, keys, previous=previous)
        for p in stage.plan.partitions:
            expected = stage.start if p.index in (3, 5, 6) else merged_all
            assert torch.equal(applied[p.start : p.end], expected[p.start : p.end]), p.index
    assert not torch.equal(merged_all, stage.start)


def test_momentum_carries_over_two_epochs_from_per_partition_objects():
    stage = Stage(3, with_momentum=False, epoch=0)
    stage.run_all()
    theta1, m1 = stage.merged()
    ref1, ref_m1 = reference(stage)
    # Epoch 1 reads its previous state from epoch 0's merged slices (objects holding one partition each).
    plan0 = stage.plan
    gen = torch.Generator().manual_seed(7)
    subs = []
    for s in plan0.submitters:
        grad = torch.randn(N_PARAMS, generator=gen) * 0.01
        stage.grads[s.hotkey] = grad
        stage.store.put(f"up1/{s.hotkey}", encode_f32(grad))
        subs.append(
            s.model_copy(
                update={"upload_key": f"up1/{s.hotkey}", "claimed_norm": math.sqrt(squared_norm(grad))}
            )
        )
    stage.plan = make_plan(
        run="run1",
        epoch=1,
        stage=2,
        n_params=N_PARAMS,
        n_partitions=N_PARTITIONS,
        submitters=subs,
        prev_weights=[
            FlatRef(key=plan0.output_key(p.index, p.owners[0], "weights"), first=p.start)
            for p in plan0.partitions
        ],
        prev_momentum=[
            FlatRef(key=plan0.output_key(p.index, p.owners[-1], "momentum"), first=p.start)
            for p in plan0.partitions
        ],
    )
    stage.start, stage.momentum0 = theta1, m1
    stage.run_all()
    theta2, m2 = stage.merged()
    ref2, ref_m2 = reference(stage)
    assert_close_rel(theta1, ref1)
    assert_close_rel(theta2, ref2)
    assert_close_rel(m2, ref_m2)
    assert not torch.equal(theta2, theta1)


def test_an_owner_reading_its_own_upload_from_memory_merges_the_same_bits_and_downloads_less():
    stage = Stage(2, n_partitions=4)
    plain = stage.store.for_caller("plain")
    held = HeldCopies(stage.store.for_caller("held"), {"up/hk0": stage.store.objects["up/hk0"]})
    by_store = run_owner(plain, stage.plan, "hk0", workers=2)
    by_memory = run_owner(held, stage.plan, "hk0", workers=2)
    assert by_memory.results.keys() == by_store.results.keys() and by_store.results
    assert all(by_memory.results[i].digest == by_store.results[i].digest for i in by_store.results)
    # Its own slices came from memory (their size probes still went to the bucket): of the two uploads, only hk1's
    # slices crossed.
    own = sum(stage.plan.partitions[i].size * 4 for i in by_store.results)
    assert stage.store.served["plain"] - stage.store.served["held"] >= own
    with pytest.raises(ValueError, match="not valid"):
        held.get_range("up/hk0", 8, 4)


def test_dict_store_counts_bytes_per_caller_and_ranges_are_end_exclusive():
    store = DictStore()
    alice, bob = store.for_caller("alice"), store.for_caller("bob")
    alice.put("v", encode_f32(torch.arange(10, dtype=torch.float32)))
    assert decode_f32(bob.get_range("v", 8, 16)).tolist() == [2.0, 3.0]  # elements [2, 4): bytes [8, 16)
    assert bob.get_range("v", 36, 100) == struct.pack("<f", 9.0)  # clipped at the end
    bob.get("v")
    assert store.received == {"alice": 40} and store.served == {"bob": 8 + 4 + 40}
    assert store.requests["bob"] == 3
    with pytest.raises(KeyError):
        bob.get("nope")
    assert encode_f32(torch.tensor([1.5], dtype=torch.float32)) == struct.pack("<f", 1.5)
    with pytest.raises(ValueError):
        encode_f32(torch.tensor([1.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        decode_f32(b"abc")
