"""What a miner's release says of a hop it did not do: bad input bytes accuse their producer, nothing else does."""

from __future__ import annotations

import pytest
import torch

from iota.checkpoint.manifest import CheckpointError
from iota.decoding import DecodeError
from iota.miner.hops import release_reason
from iota.model import wire
from iota.model.wire import WireError
from iota.storage.transfer import DigestMismatch, TransferError
from iota.train.worker import InputRefused, NonFiniteOutput


def decode_error(data: bytes) -> ValueError:
    """What the stage worker's decode raises on these bytes (its _decode wraps the wire's error)."""
    with pytest.raises(ValueError) as error:
        try:
            wire.decode(data, dtype=torch.bfloat16, shape=(2, 3), max_bytes=1 << 16)
        except DecodeError as refused:
            raise InputRefused(str(refused)) from refused
    return error.value


def test_bad_input_bytes_accuse_their_producer() -> None:
    assert release_reason(DigestMismatch("sha256 differs")) == "input_mismatch"
    for hostile in (b"\xff" * 64, b"\x00" * 8, b'{"t": 1}'):
        assert release_reason(decode_error(hostile)) == "input_undecodable"


def test_other_failures_are_the_miners_own() -> None:
    assert release_reason(None) == "stopping"
    for own in (
        TransferError("store down", status=503),
        OSError("disk full"),
        KeyError("t"),
        ValueError("lr"),
        NonFiniteOutput("out"),  # its own compute: it cannot prove its input drove it there
        CheckpointError("a bad checkpoint"),  # a DecodeError, but not of the hop's input
        WireError("its own bytes"),
    ):
        assert release_reason(own) == "failed"
