"""Audits replay the run's activation codec: honest miners under a codec replay exactly, and a miner that sends
its activation (or gradient) in another codec than the run's, the dense tensor in a compressed run or the
reverse, is refused by the stage that receives it and fails its audit, even when the values it sent are right."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest
import torch

from iota.audit import ReplaySetup, check_pseudo_gradient, replay
from iota.audit.adversaries import Honest, WorkerPipeline
from iota.decoding import DecodeError
from iota.model import codecs
from tests.audit import initial_weights, make_setups, run_epoch

COMPRESSED = "lowrank:16+int8"  # the `test` preset's 64 channels in 16 int8 codes and a scale: 6.4x less
SAMPLES = range(4)


def setups_with(codec: str) -> list[ReplaySetup]:
    return [dataclasses.replace(s, flags=dataclasses.replace(s.flags, codec=codec)) for s in make_setups()]


@functools.cache
def epoch(codec: str) -> tuple[list[ReplaySetup], Any]:
    setups = setups_with(codec)
    return setups, run_epoch(setups, initial_weights(setups), SAMPLES)


class SendsOtherCodec(Honest):
    """Computes honestly and decodes its input as the run says, but sends with the codec `sends`."""

    def __init__(self, *args: Any, sends: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.runs_codec = self.codec
        self.codec = codecs.build(sends, self.act_shape, self.flags.wire_dtype, self.seed)

    def _decode(self, data: bytes | None) -> torch.Tensor:
        assert data is not None
        return self.runs_codec.decode(data)


def other(codec: str) -> str:
    return "" if codec else COMPRESSED


def test_honest_miners_under_a_codec_replay_exactly_and_send_what_it_says() -> None:
    setups, run = epoch(COMPRESSED)
    dense_size = codecs.build("", setups[0].codec.shape, torch.bfloat16, 0).size
    for stage, setup in enumerate(setups):
        result = replay(setup, run.records[stage], run.checkpoint[stage], max_steps=100)
        assert result.passed and result.complete, result.failures
        assert all(check.verdict.error == 0.0 for check in result.checks)
        assert check_pseudo_gradient(result, run.workers[stage].pseudo_gradient(), setup.thresholds).passed
        sent = [record.output for record in run.records[stage] if record.output is not None]
        assert sent and all(len(data) == setup.codec.size for data in sent)
    assert setups[0].codec.size < dense_size / 4  # 20 bytes a token for 128 dense, and a ~190-byte header


@pytest.mark.parametrize("codec", [COMPRESSED, ""])
def test_the_next_stage_refuses_another_codec(codec: str) -> None:
    """A body miner that sends in another codec: the tail's decode refuses it (a DecodeError, so a real miner
    releases the hop as undecodable and the orchestrator, decoding it with the run's codec, strikes the producer)."""
    setups = setups_with(codec)
    weights = initial_weights(setups)
    cheat = functools.partial(SendsOtherCodec, sends=other(codec))
    workers = [
        setup.worker(flat, cheat if setup.spec.index == 1 else Honest)
        for setup, flat in zip(setups, weights, strict=True)
    ]
    with pytest.raises(DecodeError) as refused:
        WorkerPipeline(workers, setups[0].lr).run(SAMPLES)
    assert "codec" in str(refused.value)
    assert workers[2].cache == {} and workers[2].micro_batches == 0  # the tail computed nothing on it


@pytest.mark.parametrize("codec", [COMPRESSED, ""])
@pytest.mark.parametrize(
    ("stage", "direction"), [(0, "forward"), (1, "forward"), (1, "backward"), (2, "forward")]
)
def test_an_output_in_another_codec_fails_its_audit(codec: str, stage: int, direction: str) -> None:
    """The honest output's own values, re-sent in the other codec: the replay decodes the claim with the run's
    codec, so the claim fails as undecodable however close its values are."""
    setups, run = epoch(codec)
    setup, records = setups[stage], list(run.records[stage])
    index = next(i for i, record in enumerate(records) if record.direction == direction)
    honest = records[index].output
    assert honest is not None
    sent = codecs.build(other(codec), setup.codec.shape, setup.flags.wire_dtype, setup.seed)
    forged = sent.encode(setup.codec.decode(honest))
    assert replay(setup, records, run.checkpoint[stage], max_steps=100).passed
    records[index] = dataclasses.replace(records[index], output=forged)
    result = replay(setup, records, run.checkpoint[stage], max_steps=100)
    assert not result.passed
    failure = result.failures[0]
    assert failure.index == index and failure.verdict.error == float("inf")
    assert failure.verdict.kind == ("activation" if direction == "forward" and stage < 2 else "gradient")
    assert failure.verdict.reason.startswith("output does not decode")
