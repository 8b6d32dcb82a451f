"""Pure scheduling policy over the state store: stage assignment, work routing, leases, requeues, phases.

A *sample* is one micro-batch (its sequences follow from its id through the data plan). It travels forward
through every stage as a chain of *hops*, then backward; the tail does its forward and backward in one hop. A
backward hop is bound to the miner that did the sample's forward at that stage (it holds the graph). Every hop is
leased; an expired lease puts a forward hop back in its stage's queue. When the miner holding a sample's graph is
gone, the sample restarts at the head with a new attempt: `samples_requeued` counts these, and a sample is
completed once, when the head reports its backward.

Nothing cycles forever: a hop leased `max_leases` times without being done restarts its sample, and a sample
restarted `max_restarts` times is dropped from its epoch (`samples_dropped`, a `drop_sample` event), so that a
poisoned input costs a bounded number of hops and every allocated sample is completed, in flight or dropped.

A lease taken and never finished costs its holder (docs/security.md, "Lease hoarding"): a miner holds at most
`max_leases_held` leases at once; each lease that lapses is a strike (charged by the service through
iota.orchestrator.abuse) and halves the miner's next lease terms until it completes hops again; a forward whose
lease lapsed is offered to the stage's other miners first, and a backward whose lease lapsed restarts its sample at
once (no one else holds its graph, and a holder that keeps itself alive with heartbeats must not keep the sample).

Time is passed in (`now`), never read here, so tests drive the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from iota.orchestrator.doorbell import Doorbell
from iota.orchestrator.lapses import Lapses
from iota.orchestrator.state import Hop, MinerRecord, StateStore
from iota.protocol.bounds import MAX_PIPELINE_DEPTH

FORWARD, BACKWARD = "forward", "backward"
LAPSED = "lease expired"  # the reason a lease that ran out is requeued with
TRAIN, UPLOAD, MERGE, APPLY, DONE = "train", "upload", "merge", "apply", "done"


class SchedulingError(Exception):
    """A request the scheduler refuses; `status` is the HTTP status the route answers with."""

    def __init__(
        self, status: int, detail: str, keep: bool = False, fault: bool = False, lease_stands: bool = False
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        # A fault that proves nothing against the item (a report sent before its upload, or for an earlier lease of
        # it): the lease is left to run, so an honest miner's next report of the item is taken.
        self.lease_stands = lease_stands
        # What was done before refusing (a requeue) stands: Scheduler.transaction commits it, then refuses.
        self.keep = keep
        # The caller broke the protocol (not a race an honest miner can lose): a strike (iota.orchestrator.abuse).
        self.fault = fault


@dataclass(frozen=True)
class Policy:
    n_stages: int
    samples_per_epoch: int
    epochs: int  # 0: until stopped
    max_in_flight: int  # forward graphs a miner may hold awaiting their backward
    lease_s: float
    miner_timeout_s: float
    stage_memory_bytes: tuple[int, ...] = ()  # what a miner of each stage needs; () accepts any
    # Far above what churn of honest miners causes, low enough that a hop nobody can finish stops soon.
    max_leases: int = 16  # leases of one hop before its sample restarts instead of requeueing it again
    max_restarts: int = 8  # restarts of one sample before it is dropped from its epoch
    # An honest miner holds at most 2 d + 2 leases at IOTA_PIPELINE_DEPTH d (iota.miner.hops): 4 at depth 1, one
    # prefetched, one computing, two in its outbox.
    max_leases_held: int = 4
    # A miner's lease term halves per lapse it has not repaid, down to lease_s / 2**lease_halvings.
    lease_halvings: int = 3


@dataclass(frozen=True)
class Assignment:
    """A hop leased to a miner, or a reason to wait."""

    hop: Hop | None
    wait_reason: str = ""
    # Waiting only because the stage's queue is empty: a forward hop queued there would be given to this miner.
    takes_forward: bool = False


ActivationKey = Callable[[Hop, int], str]  # (hop, lease number) -> object key of the hop's output


class Scheduler:
    def __init__(self, state: StateStore, policy: Policy, output_key: ActivationKey):
        self.state = state
        self.policy = policy
        self.output_key = output_key
        # Rung whenever work appears, so that requests held for work are answered (iota.orchestrator.doorbell).
        # A miner may hold as many requests as the pipeline depth its lease limit admits (depth 1 at the default 4).
        self.doorbell = Doorbell(per_miner=min(MAX_PIPELINE_DEPTH, max(1, (policy.max_leases_held - 2) // 2)))
        self._refused_for_load_at = float("-inf")
        self.lapses = Lapses(policy.lease_s, policy.lease_halvings)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A state transaction: a refusal rolls it back, unless the refusal keeps what it did (it requeued)."""
        kept: SchedulingError | None = None
        with self.state.transaction():
            try:
                yield
            except SchedulingError as refusal:
                if not refusal.keep:
                    raise
                kept = refusal
        if kept is not None:
            raise kept

    # -- run phase --------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.state.run.epoch

    @property
    def phase(self) -> str:
        return self.state.run.phase or TRAIN

    @property
    def paused(self) -> bool:
        return self.state.run.paused

    # -- registration -----------------------------------------------------------------------------------

    def register(
        self, hotkey: str, uid: int | None, device: str, memory_bytes: int, session: str, now: float
    ) -> int:
        """Assign (or confirm) the miner's stage; a new session voids the work of the previous one."""
        with self.state.transaction():
            known = self.state.miner(hotkey)
            staffed = self.state.staffed_stages(self.policy.n_stages)
            if known is not None and known.banned:
                raise SchedulingError(403, f"hotkey {hotkey} is banned from this run: {known.banned}")
            if known is not None and known.session != session:
                self.miner_gone(hotkey, now, "re-registered with a new session")
            stage = known.stage if known is not None else self._choose_stage(memory_bytes)
            self.state.upsert_miner(
                MinerRecord(hotkey, uid, stage, session, device, memory_bytes, now, now, True, 0, None)
            )
            self.state.log(now, "register", hotkey, stage=stage, device=device, session=session)
        if stage not in staffed:
            self.doorbell.ring_all()  # the stage has its first miner: inflow may start
        return stage

    def _choose_stage(self, memory_bytes: int) -> int:
        need = self.policy.stage_memory_bytes
        fits = [s for s in range(self.policy.n_stages) if not need or memory_bytes >= need[s]]
        if not fits:
            smallest = min(need) / 2**30
            raise SchedulingError(
                400,
                f"not enough memory for any stage: {memory_bytes / 2**30:.1f} GiB, needs {smallest:.1f} GiB",
            )
        load = self.state.stage_load()  # stage -> (live miners, their hops done)
        count = {s: load.get(s, (0, 0))[0] for s in fits}
        # Samples a stage's miners have passed on: the tail does one hop per sample, the others two.
        last = self.policy.n_stages - 1
        samples = {s: load.get(s, (0, 0))[1] / (1 if s == last else 2) for s in fits}
        # Empty stages first, then the stage with the fewest samples per miner (the slowest), then the lowest.
        return min(fits, key=lambda s: (count[s] > 0, samples[s] / max(count[s], 1), count[s], s))

    # -- work -------------------------------------------------------------------------------------------

    def next_work(self, hotkey: str, now: float, forward: bool = True) -> Assignment:
        """Backward work first; forward work only if the miner asks for it (it declines while it finishes the
        backward passes of its current accumulation window, so that every gradient of a window is taken at the
        weights its forward used)."""
        with self.state.transaction():
            miner = self.live_miner(hotkey, now)
            if self.phase != TRAIN:
                return Assignment(None, f"phase is {self.phase}")
            leased = [h for h in self.state.open_hops_of_miner(hotkey) if h.status == "leased"]
            held = len(leased)
            if held >= self.policy.max_leases_held:
                limit = self.policy.max_leases_held
                return Assignment(None, f"holding {held} leased items (limit {limit}): report them first")
            hop = self.state.next_queued(miner.stage, BACKWARD, hotkey)
            if hop is None and not forward:
                return Assignment(None, "no backward work yet for this miner's window")
            if hop is None:
                reason = self._inflow_blocked(miner, sum(h.direction == FORWARD for h in leased))
                if reason:
                    return Assignment(None, reason)
                hop = self.state.next_queued(miner.stage, FORWARD, None)
                if hop is not None and self._offered_to_others(hop, miner, now):
                    return Assignment(None, f"item {hop.id} lapsed with you: offered to other miners first")
                if hop is None and miner.stage == 0:
                    hop = self._new_sample(now)
                if hop is None:
                    return Assignment(None, "no work queued for this stage", takes_forward=True)
            return Assignment(self._lease(hop, hotkey, now))

    def leases_held(self, hotkey: str) -> int:
        return sum(hop.status == "leased" for hop in self.state.open_hops_of_miner(hotkey))

    def _offered_to_others(self, hop: Hop, miner: MinerRecord, now: float) -> bool:
        """The item lapsed in this miner's lease lately and the stage has another live miner to give it to."""
        if not self.lapses.lapsed_with(hop.id, miner.hotkey, now):
            return False
        live, _ = self.state.stage_load().get(miner.stage, (0, 0))
        return live > 1

    def _inflow_blocked(self, miner: MinerRecord, leased_forwards: int) -> str:
        if self.paused:
            return "the run is paused by its operator"
        # Asked on most requests for work: indexed lookups, never a pass over every miner or every hop.
        staffed = self.state.staffed_stages(self.policy.n_stages)
        empty = [s for s in range(self.policy.n_stages) if s not in staffed]
        if empty:
            return f"waiting for miners on stage(s) {', '.join(map(str, empty))}"
        tail = self.policy.n_stages - 1
        if miner.stage < tail:
            # Graphs reported and awaiting their backward, and forwards leased and not reported yet: each will hold
            # a graph, so a miner may ask for its next forward as soon as it starts computing the last one.
            holding = len(self.state.samples_waiting_on(miner.hotkey, tail)) + leased_forwards
            if holding >= self.policy.max_in_flight:
                return (
                    f"holding {holding} forward graphs awaiting backward (limit {self.policy.max_in_flight})"
                )
        return ""

    def _new_sample(self, now: float) -> Hop | None:
        epoch = self.epoch
        allocated = self.state.epochs.allocated(epoch)
        if allocated >= self.policy.samples_per_epoch:
            return None
        self.state.epochs.set_allocated(epoch, allocated + 1)
        sample_id = self.state.counters.bump("cursor") - 1  # the cursor names the next sample
        self.state.new_sample(sample_id, epoch, now)
        hop_id = self.state.add_hop(
            sample_id=sample_id,
            attempt=0,
            epoch=epoch,
            stage=0,
            direction=FORWARD,
            status="queued",
            created_at=now,
        )
        return self.state.hop(hop_id)

    def _lease(self, hop: Hop, hotkey: str, now: float) -> Hop:
        lease_no = hop.lease_no + 1
        needs_output = not (hop.stage == 0 and hop.direction == BACKWARD)
        output_key = self.output_key(hop, lease_no) if needs_output else None
        self.state.set_hop(
            hop.id,
            status="leased",
            miner=hotkey,
            lease_no=lease_no,
            lease_expires=now + self.lapses.term(hotkey),
            output_key=output_key,
        )
        leased = self.state.hop(hop.id)
        assert leased is not None
        return leased

    def live_miner(self, hotkey: str, now: float) -> MinerRecord:
        miner = self.state.miner(hotkey)
        if miner is None:
            raise SchedulingError(
                404, f"hotkey {hotkey} has not registered with this run: POST /miners/register"
            )
        if miner.banned:
            raise SchedulingError(403, f"hotkey {hotkey} is banned from this run: {miner.banned}")
        if not miner.alive:
            raise SchedulingError(409, "this miner was timed out and its work requeued: register again")
        self.state.touch_miner(hotkey, now)
        return miner

    def leased_hop(self, hotkey: str, hop_id: int, epoch: int, now: float) -> Hop:
        """The hop a report or release names, checked to be this caller's live lease in the current epoch."""
        self.live_miner(hotkey, now)
        hop = self.state.hop(hop_id)
        if hop is None:
            raise SchedulingError(404, f"no work item {hop_id}", fault=True)
        if hop.miner != hotkey or hop.status != "leased":
            # Another miner's item is a fault; one's own item that is done or requeued is an honest retry, and so
            # is a late report of an item whose lease lapsed with this miner (the lapse was its strike).
            lapsed = self.lapses.lapsed_with(hop.id, hotkey)
            raise SchedulingError(
                409,
                f"work item {hop_id} is not leased to you (it is {hop.status})",
                fault=hop.miner != hotkey and not lapsed,
            )
        if epoch != hop.epoch or hop.epoch != self.epoch:
            self._requeue(hop, now, "report for a closed epoch")
            raise SchedulingError(
                409, f"epoch {epoch} is closed (current {self.epoch}); the item was requeued", keep=True
            )
        if hop.lease_expires is not None and hop.lease_expires < now:
            # Refused even before a sweep has seen it: the sweep would requeue it, and may already have.
            self._requeue(hop, now, LAPSED)
            raise SchedulingError(
                409,
                f"the lease of work item {hop_id} expired {now - hop.lease_expires:.1f} s ago; it was requeued",
                keep=True,
            )
        return hop

    def complete(
        self,
        hop: Hop,
        output_sha: str | None,
        output_size: int | None,
        loss: float | None,
        tokens: int,
        now: float,
        inner_step: int | None = None,
    ) -> None:
        """Record a verified report and route the sample on; a completed hop repays one of its miner's lapses."""
        self.lapses.repaid(hop.miner or "")
        self.state.set_hop(
            hop.id,
            status="done",
            output_sha=output_sha,
            output_size=output_size,
            done_at=now,
            inner_step=inner_step,
            loss=loss,
        )
        self.state.credit(hop.miner or "")
        last = self.policy.n_stages - 1
        if hop.stage == last and loss is not None:
            self.state.record_loss(hop.sample_id, hop.epoch, tokens, loss)
        if hop.direction == FORWARD and hop.stage < last:
            self.state.hold_graph(hop.miner or "", hop.sample_id, hop.attempt, hop.stage)
            self.state.add_hop(
                sample_id=hop.sample_id,
                attempt=hop.attempt,
                epoch=hop.epoch,
                stage=hop.stage + 1,
                direction=FORWARD,
                status="queued",
                input_key=hop.output_key,
                input_sha=output_sha,
                created_at=now,
            )
            self.doorbell.ring_stage(hop.stage + 1)
        elif hop.stage > 0:
            if hop.direction == BACKWARD:
                self.state.release_graph(hop.sample_id, hop.attempt, hop.stage)
            # The tail's hop and every backward hop send a gradient to the miner holding the previous stage's graph.
            holder = self.state.forward_miner(hop.sample_id, hop.attempt, hop.stage - 1)
            self.state.add_hop(
                sample_id=hop.sample_id,
                attempt=hop.attempt,
                epoch=hop.epoch,
                stage=hop.stage - 1,
                direction=BACKWARD,
                status="queued",
                miner=holder,
                input_key=hop.output_key,
                input_sha=output_sha,
                created_at=now,
            )
            if holder is not None:
                self.doorbell.ring_miner(holder)
        else:
            self.state.release_graphs(hop.sample_id)
            self.state.set_sample(hop.sample_id, status="done", done_at=now)
            self.state.counters.bump("samples_completed")
            self._maybe_end_train(now)

    def release(self, hop: Hop, now: float, why: str = "released by its miner") -> None:
        """A miner hands back a hop it will not finish (it is stopping, or could not)."""
        self._requeue(hop, now, why)

    # -- failures ---------------------------------------------------------------------------------------

    def refused_for_load(self, now: float) -> None:
        """The server turned requests away unread because it is overloaded (iota.orchestrator.app.Admission): for
        the next ``miner_timeout_s`` a miner's silence is no sign that it is gone, since its requests may be the
        ones refused. (Leases still expire, so no work waits on a miner that did die meanwhile.)"""
        self._refused_for_load_at = max(self._refused_for_load_at, now)

    def sweep(self, now: float) -> None:
        """Expire leases and time out silent miners; cheap enough to run on every request."""
        timeout = self.policy.miner_timeout_s
        with self.state.transaction():
            for hop in self.state.expired_leases(now):
                self._requeue(hop, now, LAPSED)
            self.lapses.expire(now)
            if now - self._refused_for_load_at < timeout:
                return
            for hotkey in self.state.stale_miners(now - timeout):
                self.miner_gone(hotkey, now, f"silent for {timeout:.0f} s")

    def _requeue(self, hop: Hop, now: float, why: str) -> None:
        lapsed = why == LAPSED
        if lapsed:
            self.state.counters.bump("leases_expired")
            self.lapses.record(hop.id, hop.miner or "", hop.direction == FORWARD, now)
        if hop.lease_no >= self.policy.max_leases:
            self.restart_sample(hop.sample_id, now, f"item {hop.id} leased {hop.lease_no} times, last {why}")
            return
        holder_alive = False
        if hop.direction == BACKWARD and hop.miner and not lapsed:
            m = self.state.miner(hop.miner)
            holder_alive = m is not None and m.alive
        if hop.direction == FORWARD:
            # Anyone on the stage can redo a forward: its input is still in the bucket.
            self.state.set_hop(hop.id, status="queued", miner=None, lease_expires=None)
            self.doorbell.ring_stage(hop.stage)
        elif holder_alive:
            self.state.set_hop(hop.id, status="queued", lease_expires=None)
            self.doorbell.ring_miner(hop.miner or "")
        else:
            self.restart_sample(hop.sample_id, now, why)
            return
        self.state.log(now, "requeue", hop.miner, hop=hop.id, sample=hop.sample_id, why=why)

    def miner_gone(self, hotkey: str, now: float, why: str) -> None:
        self.state.set_miner_dead(hotkey)
        self.state.log(now, "miner_gone", hotkey, why=why)
        # A request it has held is refused now (it is gone), not left waiting.
        self.doorbell.answer_now(hotkey)
        for sample_id in self.state.samples_waiting_on(hotkey, self.policy.n_stages - 1):
            self.restart_sample(sample_id, now, f"miner {hotkey[:8]} {why}")
        for hop in self.state.open_hops_of_miner(hotkey):
            if hop.status == "leased" or hop.direction == BACKWARD:
                self._requeue(hop, now, why)
        # A snapshot challenge goes with the session it was issued to: the next one starts from the checkpoint and
        # cannot answer for a step of this one (asked, it was refused and struck until throttled).
        gone = self.state.miner(hotkey)
        for challenge in self.state.snapshots.clear(hotkey):
            self.state.counters.bump("challenges_missed")  # unanswered, as one whose epoch closed
            if gone is not None:  # if the miner comes back as a new session, this one's hops earn nothing
                self.state.snapshots.left_unanswered(challenge.epoch, hotkey, gone.session)
            self.state.log(
                now, "challenge_dropped", hotkey, epoch=challenge.epoch, step=challenge.step, why=why
            )

    def restart_sample(self, sample_id: int, now: float, why: str) -> None:
        """Drop a sample's open hops and start it again at the head with a new attempt; once it has been
        restarted ``max_restarts`` times, drop it from the epoch instead."""
        info = self.state.sample(sample_id)
        if info is None or info[2] != "active":
            return
        epoch, attempt, _ = info
        for hop in self.state.hops_of_sample(sample_id, attempt):
            if hop.status in ("queued", "leased"):
                self.state.set_hop(hop.id, status="dropped")
        holders = self.state.release_graphs(sample_id)
        for holder in holders:  # room for another forward graph
            self.doorbell.ring_miner(holder)
        if attempt >= self.policy.max_restarts:
            self.state.set_sample(sample_id, status="dropped", done_at=now)
            self.state.counters.bump("samples_dropped")
            self.state.log(now, "drop_sample", None, sample=sample_id, attempts=attempt + 1, why=why)
            self._maybe_end_train(now)
            return
        self.state.set_sample(sample_id, attempt=attempt + 1)
        self.state.add_hop(
            sample_id=sample_id,
            attempt=attempt + 1,
            epoch=epoch,
            stage=0,
            direction=FORWARD,
            status="queued",
            created_at=now,
        )
        self.state.counters.bump("samples_requeued")
        self.state.log(now, "restart_sample", None, sample=sample_id, attempt=attempt + 1, why=why)
        self.doorbell.ring_stage(0)

    # -- phases -----------------------------------------------------------------------------------------

    def _maybe_end_train(self, now: float) -> None:
        epoch = self.epoch
        if self.phase != TRAIN or self.state.epochs.allocated(epoch) < self.policy.samples_per_epoch:
            return
        if self.state.active_samples(epoch):
            return  # in-flight samples drain first
        self.state.run.set_phase(UPLOAD)
        self.state.log(now, "phase", None, epoch=epoch, phase=UPLOAD)
        self.doorbell.ring_all()

    def close_epoch(self, now: float) -> None:
        """Operator: stop handing out new samples this epoch; in-flight ones drain."""
        with self.state.transaction():
            epoch = self.epoch
            allocated = self.state.epochs.allocated(epoch)
            self.state.epochs.set_allocated(epoch, max(allocated, self.policy.samples_per_epoch))
            self.state.log(now, "close_epoch", None, epoch=epoch, allocated=allocated)
            self._maybe_end_train(now)

    def next_epoch(self, now: float) -> None:
        epoch = self.epoch + 1
        done = self.policy.epochs and epoch >= self.policy.epochs
        self.state.run.set_epoch(epoch)
        self.state.run.set_phase(DONE if done else TRAIN)
        self.state.log(now, "phase", None, epoch=epoch, phase=DONE if done else TRAIN)
        self.doorbell.ring_all()
