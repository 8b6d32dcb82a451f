"""The state ring a miner keeps so that it can answer a snapshot challenge of a past step."""

from __future__ import annotations

import pytest
import torch

from iota.train.snapshot import Snapshot, StateRing


def state(step: int) -> Snapshot:
    return Snapshot(step, torch.full((3,), float(step)), torch.ones(1), {})


def test_the_ring_keeps_the_last_steps_and_a_restarted_step_as_the_newest() -> None:
    ring = StateRing(3)
    for step in range(1, 6):
        ring.keep(0, state(step))
    assert [ring.get(0, step) is not None for step in range(1, 6)] == [False, False, True, True, True]
    assert ring.get(1, 5) is None  # another epoch's step 5
    ring.keep(0, state(3))  # a restarted session reaches step 3 again: its state is now the newest
    ring.keep(1, state(1))
    assert ring.get(0, 3) is not None and ring.get(0, 4) is None and ring.get(1, 1) is not None
    held = ring.get(0, 5)
    assert held is not None and torch.equal(held.weights, torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="at least 1"):
        StateRing(0)
