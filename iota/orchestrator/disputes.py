"""A consumer's claim that the input of the item it leased is bad (a release with `input_mismatch` or
`input_undecodable`): checked against the store before anyone is struck, so that releases cannot become a way to
hurt honest producers. Used by the orchestrator's service (iota.orchestrator.service)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from iota.model import codecs, wire
from iota.orchestrator.scheduler import SchedulingError
from iota.orchestrator.state import Hop
from iota.protocol import ReleaseReason
from iota.storage.base import StoreError

if TYPE_CHECKING:
    from iota.orchestrator.service import Orchestrator

T = TypeVar("T")


def bad_input(orch: Orchestrator, hop: Hop, reason: ReleaseReason, now: float) -> str:
    """A consumer says the input of the item it leased is bad. Releases must not become a way to hurt honest
    producers, so:

    - it can accuse only the producer of that item's input: the miner whose accepted report made the input
      key, in the same attempt of the same sample (the consumer's live lease, checked before, is its standing);
    - nobody is struck on its word: the store is asked whether the object at that key is still exactly what
      was accepted (there, of the exact size, with the sha256 the store confirmed at the report). If it is
      not, or it is but does not decode here either (`input_undecodable`), the producer is at fault: it is
      struck and the sample restarts at the head (within the scheduler's restart limit);
    - otherwise the claim is false: the item is requeued (its input is sound) and the refusal is a strike
      against the consumer.
    """
    producer = _producer(orch, hop)
    if producer is None or producer.miner is None or hop.input_key is None:
        raise SchedulingError(400, f"item {hop.id} has no input from another miner to dispute", fault=True)
    input_key = hop.input_key
    info = asking_store(lambda: orch.store.head(input_key))
    size = orch.limits.activation_bytes
    intact = info is not None and info.size == size and info.sha256 == hop.input_sha
    if intact and (reason == "input_mismatch" or _decodes(orch, hop.input_key)):
        orch.scheduler.release(hop, now, f"released by its miner ({reason}, not confirmed)")
        raise SchedulingError(
            409,
            f"the input of item {hop.id} is exactly what was accepted"
            f"{' and decodes' if reason == 'input_undecodable' else ''}: the item was requeued",
            keep=True,
            fault=True,
        )
    why = f"the output of item {producer.id} is bad ({reason}, confirmed against the store)"
    orch.scheduler.restart_sample(hop.sample_id, now, why)  # first: a ban would restart its samples too
    orch.state.log(now, "bad_output", producer.miner, hop=producer.id, sample=hop.sample_id, reason=reason)
    if orch.abuse is not None:
        orch.abuse.strike(producer.miner, why, now)
    return f"item {hop.id} released: its input was bad, and its sample restarted"


def asking_store(call: Callable[[], T]) -> T:
    """A store call on a miner's request: a store that does not answer is a 503 the miner retries (its
    client backs off), not a 500, and not the miner's fault."""
    try:
        return call()
    except StoreError as error:
        raise SchedulingError(503, f"the object store did not answer ({error}); retry") from error


def _producer(orch: Orchestrator, hop: Hop) -> Hop | None:
    """The done hop of the same sample attempt whose output is this hop's input."""
    for candidate in orch.state.hops_of_sample(hop.sample_id, hop.attempt):
        if candidate.status == "done" and candidate.output_key == hop.input_key:
            return candidate
    return None


def _decodes(orch: Orchestrator, key: str) -> bool:
    """Whether the object decodes as the activation (or gradient) a consumer expects, as a consumer reads it."""
    shape = (orch.run.micro_batch, orch.run.model.seq_len, orch.run.model.wire_width)
    dtype = wire.wire_dtype(orch.run.wire_dtype)
    try:
        data = asking_store(lambda: orch.store.get(key))
        codecs.build(orch.run.codec, shape, dtype, orch.run.seed).decode(data)
    except ValueError:  # every decoder's refusal is one (iota.decoding.DecodeError)
        return False
    return True
