"""bench/emulate.py: a stage worker that sleeps a GPU stage's measured time keeps the real worker's bookkeeping and
sends and checks the real wire size of the emulated stage (64x bottleneck of the 1b preset: 2048 x 32 bf16)."""

import pytest
import torch

from bench.emulate import EmulatedWorker, run_overrides, stage_seconds
from iota.model import wire
from iota.model.config import preset
from iota.model.stages import plan_stages
from iota.train.worker import InputRefused, TrainFlags


def workers(k: int) -> list[EmulatedWorker]:
    overrides = run_overrides("1b")
    config = preset("tiny", vocab_size=512, seq_len=overrides["seq_len"], bottleneck=overrides["bottleneck"])
    flags = TrainFlags(overrides["micro_batch"], k, "adamw", 0.0, 1.0, torch.bfloat16)
    EmulatedWorker.seconds = {s: 0.003 for s in range(3)}

    def no_data(sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("an emulated stage reads no tokens")

    return [
        EmulatedWorker(config, spec, 0, flags, no_data, torch.device("cpu"), False, 8)
        for spec in plan_stages(config.n_layers, 3)
    ]


def test_the_measured_times_are_the_1b_stages_and_the_wire_is_theirs() -> None:
    seconds = stage_seconds("1b")
    assert sorted(seconds) == [0, 1, 2] and all(0.01 < s < 0.2 for s in seconds.values())
    with pytest.raises(ValueError, match="no bf16 figures"):
        stage_seconds("test")
    head, body, tail = workers(k=2)
    expected = wire.encoded_size((1, 2048, 2048 // 64), torch.bfloat16)
    assert head.max_bytes == body.max_bytes == len(head.payload) == expected


def test_a_window_of_emulated_hops_counts_like_the_real_worker() -> None:
    head, body, tail = workers(k=2)
    for sample in (0, 1):
        activation, _ = head.forward(sample, None)
        activation, _ = body.forward(sample, activation)
        gradient, loss = tail.forward(sample, activation)
        assert loss is not None and len(gradient) == head.max_bytes
        assert head.wants_forward() == (sample == 0)
        gradient = body.backward(sample, gradient)
        assert gradient is not None and head.backward(sample, gradient) is None
    assert all(w.step_due() for w in (head, body, tail))
    for w in (head, body, tail):
        w.step(0.1)
        assert w.inner_step == 1 and w.wants_forward() and not w.cache
    with pytest.raises(InputRefused):
        body.forward(2, b"\0" * 100)  # not the codec's size: refused like a real stage's input
    with pytest.raises(KeyError):
        body.backward(3, head.payload)
