"""Partition layout, owner assignment, tie-breakers and plan validation."""

import itertools
import random

import pydantic
import pytest
import torch

from iota.merge import FlatRef, MergePlan, OuterConfig, Submitter, make_plan, partition_bounds
from iota.model.flat import flatten, unflatten_into


def submitters(r: int) -> list[Submitter]:
    return [
        Submitter(hotkey=f"hk{i}", upload_key=f"up/hk{i}", weight=1.0 + i, claimed_norm=1.0) for i in range(r)
    ]


def plan_for(r: int, n_params: int = 10_000, n_partitions: int = 64, epoch: int = 3, **kw) -> MergePlan:
    n = len(partition_bounds(n_params, n_partitions))
    return make_plan(
        run="run1",
        epoch=epoch,
        stage=1,
        n_params=n_params,
        n_partitions=n_partitions,
        submitters=submitters(r),
        prev_weights=[FlatRef(key="start")] * n,
        **kw,
    )


def test_partition_bounds_equal_sizes_last_shorter():
    assert partition_bounds(10_000, 8) == [(i * 1250, (i + 1) * 1250) for i in range(8)]
    bounds = partition_bounds(10_001, 8)
    sizes = [end - start for start, end in bounds]
    assert sizes[:-1] == [1251] * 7 and sizes[-1] == 10_001 - 7 * 1251
    assert bounds[0][0] == 0 and bounds[-1][1] == 10_001
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    # Too few elements for every partition: fewer partitions, none empty.
    assert partition_bounds(5, 8) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError):
        partition_bounds(0, 4)


@pytest.mark.parametrize("r", [2, 3, 4, 7])
def test_every_partition_has_two_distinct_owners_and_load_is_balanced(r):
    plan = plan_for(r)
    assert all(len(p.owners) == 2 and p.owners[0] != p.owners[1] for p in plan.partitions)
    loads = [len(plan.partitions_of(h)) for h in plan.hotkeys]
    assert sum(loads) == 2 * len(plan.partitions)
    assert max(loads) - min(loads) <= 1, loads
    assert not plan.audit


def test_pairs_vary_across_partitions():
    plan = plan_for(4)
    pairs = {tuple(p.owners) for p in plan.partitions}
    assert len(pairs) >= 4, pairs  # not the same fixed pairing repeated


def test_single_submitter_owns_everything_and_is_marked_for_audit():
    plan = plan_for(1)
    assert plan.audit
    assert all(p.owners == ["hk0"] for p in plan.partitions)
    assert plan.partitions_of("hk0") == list(range(64))
    assert plan.tiebreaker(0) is None


def test_owner_assignment_is_deterministic_and_order_independent():
    a = plan_for(4)
    shuffled = submitters(4)
    random.Random(1).shuffle(shuffled)
    b = make_plan(
        run="run1",
        epoch=3,
        stage=1,
        n_params=10_000,
        n_partitions=64,
        submitters=shuffled,
        prev_weights=[FlatRef(key="start")] * 64,
    )
    assert a == b
    assert [s.hotkey for s in b.submitters] == ["hk0", "hk1", "hk2", "hk3"]
    other_epoch = plan_for(4, epoch=4)
    assert [p.owners for p in other_epoch.partitions] != [p.owners for p in a.partitions]


def test_plan_round_trips_through_json():
    plan = plan_for(3, outer=OuterConfig(lr=0.5, warmup_epochs=4), clip=2.0, trim_fraction=0.25)
    again = MergePlan.model_validate_json(plan.model_dump_json())
    assert again == plan
    assert again.output_key(5, "hk1", "momentum") == plan.output_key(5, "hk1", "momentum")


def test_tiebreaker_is_never_an_owner_and_is_deterministic():
    plan = plan_for(5)
    for p in plan.partitions:
        third = plan.tiebreaker(p.index)
        assert third is not None and third not in p.owners
        assert plan.tiebreaker(p.index) == third
        fourth = plan.tiebreaker(p.index, exclude=[third])
        assert fourth not in (*p.owners, third)
    assert plan_for(2).tiebreaker(0) is None  # both submitters own it: a validator must recompute


def test_output_keys_are_distinct_per_owner_and_kind():
    plan = plan_for(3)
    keys = {
        plan.output_key(p, h, k) for p in range(64) for h in plan.hotkeys for k in ("weights", "momentum")
    }
    assert len(keys) == 64 * 3 * 2


def test_invalid_plans_are_refused():
    with pytest.raises(pydantic.ValidationError):
        Submitter(hotkey="a", upload_key="k", weight=0.0, claimed_norm=1.0)
    dup = [Submitter(hotkey="a", upload_key="k", weight=1.0, claimed_norm=1.0)] * 2
    with pytest.raises(pydantic.ValidationError, match="duplicates"):
        make_plan(
            run="r",
            epoch=0,
            stage=0,
            n_params=10,
            n_partitions=2,
            submitters=dup,
            prev_weights=[FlatRef(key="s")] * 2,
        )
    with pytest.raises(ValueError, match="one prev_weights"):
        make_plan(
            run="r", epoch=0, stage=0, n_params=10, n_partitions=2, submitters=submitters(2), prev_weights=[]
        )
    with pytest.raises(pydantic.ValidationError, match="output_template"):
        plan_for(2, output_template="runs/{run}/{partition}/{kind}")  # no {hotkey}: owners would overwrite
    with pytest.raises(pydantic.ValidationError, match="trim_fraction"):
        plan_for(2, trim_fraction=0.5)


def test_flat_ref_byte_range_is_end_exclusive():
    assert FlatRef(key="full").byte_range(10, 20) == (40, 80)
    assert FlatRef(key="slice", first=1000).byte_range(1000, 1250) == (0, 1000)
    with pytest.raises(ValueError):
        FlatRef(key="slice", first=1000).byte_range(999, 1250)


def test_flatten_unflatten_round_trip_on_a_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    named = dict(model.named_parameters())
    flat = flatten(model.named_parameters())
    assert flat.dtype == torch.float32 and flat.numel() == sum(p.numel() for p in named.values())
    first = sorted(named)[0]
    assert torch.equal(flat[: named[first].numel()], named[first].detach().reshape(-1))
    unflatten_into(model, flat * 2)
    assert torch.equal(flatten(dict(model.named_parameters())), flat * 2)
    state = {"b": torch.zeros(3, dtype=torch.bfloat16), "a": torch.zeros(2, 2)}
    unflatten_into(state, torch.arange(7, dtype=torch.float32))
    assert state["a"].flatten().tolist() == [0, 1, 2, 3] and state["b"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        unflatten_into(state, torch.zeros(8))
