"""The miner daemon with its I/O overlapped, against a real orchestrator in this process: three `MinerDaemon`s
with real stage workers, signed HTTP, a LocalStore bucket. What the overlap must not change: the losses (gradients
are exact), each report counting once, the run's in-flight limit, and what SIGTERM finishes or hands back."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from iota.cli.logs import configure_logging
from iota.miner.main import MinerDaemon
from iota.protocol import Ack, Report
from iota.train.baseline import train_baseline
from iota.train.run import build_run
from iota.train.worker import StageWorker
from tests.miner.conftest import Net

SEQ_LEN = 32  # the `test` preset's
EXACT: dict[str, Any] = {
    # No bottleneck, fp32 on the wire, plain SGD without clipping, an outer step of 1: the network must follow the
    # one-process baseline, which accumulates the same k samples per step in the same order.
    "bottleneck": 0,
    "wire_dtype": "fp32",
    "optimizer": "sgd",
    "clip": 0.0,
    "outer_lr": 1.0,
    "outer_momentum": 0.0,
    "micro_batch": 2,
    "accumulate": 2,
    "lr": 0.05,
    "warmup_tokens": 100,
}


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


def run_to_the_end(net: Net, depth: int = 1) -> None:
    for _ in range(3):
        net.start(net.miner(depth=depth))
    net.join(timeout_s=120)
    status = net.orch.status()
    assert status.phase == "done" and status.samples_lost == 0 and status.samples_requeued == 0


@pytest.mark.parametrize("depth", [1, 4])
def test_overlapped_miners_follow_the_baseline_with_samples_in_flight(
    make_net: Callable[..., Net], depth: int
) -> None:
    """At depth 4 each miner keeps four requests for work and four uploads going at once (IOTA_PIPELINE_DEPTH):
    still every window's k forwards, and only they, run at the weights of the step before it."""
    samples = 8
    net = make_net(
        **EXACT,
        samples_per_epoch=samples,
        total_tokens=samples * 2 * SEQ_LEN,
        max_in_flight=8,
        max_leases_held=2 * depth + 2,
    )
    started = time.monotonic()
    run_to_the_end(net, depth)

    losses = [loss for (loss,) in net.query("SELECT loss FROM losses ORDER BY sample_id")]
    baseline = train_baseline(build_run(net.settings), samples * 2 * SEQ_LEN, progress=False)
    single = [loss for _, loss in baseline["loss_curve"]]
    assert len(losses) == len(single) == samples
    assert max(abs(a - b) for a, b in zip(losses, single, strict=True)) < 1e-4, (losses, single)
    # The steps mattered, so the agreement is not trivial: untrained, the later samples' losses differ.
    frozen = train_baseline(
        build_run(net.settings.model_copy(update={"lr": 1e-12})), samples * 2 * SEQ_LEN, progress=False
    )
    assert max(abs(a - b) for (_, a), b in zip(frozen["loss_curve"], single, strict=True)) > 1e-3

    # Every hop reported once: five per sample (head, body, tail forward; body, head backward), each counted once
    # on the orchestrator and by the miner that did it.
    hops = net.query("SELECT miner, status, lease_expires, done_at FROM hops WHERE epoch = 0")
    assert len(hops) == 5 * samples and {status for _, status, _, _ in hops} == {"done"}
    per_miner: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for miner, _, lease_expires, done_at in hops:
        per_miner[miner].append((lease_expires - net.settings.lease_s, done_at))
    for miner in net.miners:
        assert miner.state.hops_done == len(per_miner[miner.client.hotkey])
        # compute_s: what `iota miner status` shows as its seconds computing.
        assert 0 < miner.state.compute_s < time.monotonic() - started

    # The overlap happened: some miner was leased its next hop before it had reported the one before.
    overlapped = 0
    for spans in per_miner.values():
        spans.sort()
        overlapped += sum(nxt[0] < prev[1] for prev, nxt in zip(spans, spans[1:], strict=False))
    assert overlapped > 0


def test_a_miner_deeper_than_the_orchestrator_admits_asks_no_more_than_it_admits(
    make_net: Callable[..., Net],
) -> None:
    """IOTA_PIPELINE_DEPTH 4 against an orchestrator at the default lease limit (4: depth 1): the miner lowers its
    depth at registration, says so, and still trains (deeper, its requests would answer one another's)."""
    net = make_net(**EXACT, samples_per_epoch=4, total_tokens=4 * 2 * SEQ_LEN, max_in_flight=8)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    try:
        miners = [net.miner(depth=4) for _ in range(3)]
        for miner in miners:
            net.start(miner)
        net.join(timeout_s=120)
    finally:
        logger.remove(sink)
    assert net.orch.status().phase == "done"
    assert all(m.hops.prefetch.depth == 1 and m.hops.outbox.depth == 1 for m in miners)
    assert sum("orchestrator admits 1 requests at once" in line for line in lines) == 3


def test_prefetch_keeps_the_in_flight_limit(make_net: Callable[..., Net]) -> None:
    """With max_in_flight 1, a head never holds two samples at once, though its window (k = 2) has room for two:
    it asks for forward work only once its last forward is reported, so the orchestrator's count is never stale."""
    samples = 6
    net = make_net(**EXACT, samples_per_epoch=samples, total_tokens=samples * 2 * SEQ_LEN, max_in_flight=1)
    run_to_the_end(net)
    spans = net.query(
        "SELECT f.sample_id, f.lease_expires, b.done_at FROM hops f JOIN hops b ON b.sample_id = f.sample_id "
        "WHERE f.stage = 0 AND f.direction = 'forward' AND b.stage = 0 AND b.direction = 'backward' "
        "ORDER BY f.lease_expires"
    )
    assert len(spans) == samples
    for (_, _, done), (sample, leased, _) in zip(spans, spans[1:], strict=False):
        assert leased - net.settings.lease_s >= done, (
            f"sample {sample} was leased while another was in flight"
        )


@pytest.mark.parametrize("depth", [1, 3])
def test_sigterm_finishes_the_hop_computing_and_releases_the_prefetched_one(
    make_net: Callable[..., Net], depth: int
) -> None:
    """At depth 3 the tail may hold several prefetched items when it stops: each is handed back."""
    net = make_net(
        samples_per_epoch=8, micro_batch=2, accumulate=2, max_in_flight=8, max_leases_held=2 * depth + 2
    )
    entered, gate = threading.Event(), threading.Event()

    class GatedTail(StageWorker):
        """The tail's first forward waits for the test, so its prefetch has time to lease the next sample."""

        def forward(self, sample_id: int, data: bytes | None) -> tuple[bytes, float | None]:
            if self.spec.is_tail and not entered.is_set():
                entered.set()
                gate.wait(60)
            return super().forward(sample_id, data)

    for _ in range(2):
        net.start(net.miner())
    wait_for("the head and body to register", lambda: len(net.orch.state.miners()) == 2)
    tail = net.miner(GatedTail, depth=depth)
    hotkey = tail.client.hotkey

    def leased_to_tail() -> list[tuple[int, int]]:
        return net.query("SELECT id, sample_id FROM hops WHERE miner = ? AND status = 'leased'", (hotkey,))

    def signal_while_two_are_leased() -> None:
        wait_for("the tail's prefetch to lease a second hop", lambda: len(leased_to_tail()) >= 2)
        os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread, where the tail's loop runs
        wait_for("the tail to see the signal", lambda: tail.state.stopping)
        gate.set()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    helper = threading.Thread(target=signal_while_two_are_leased, daemon=True)
    helper.start()
    try:
        tail.run_forever()
    finally:
        gate.set()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    helper.join(10)

    tail_hops = net.query(
        "SELECT id, sample_id, status, miner FROM hops WHERE stage = 2 ORDER BY sample_id, id"
    )
    computing, prefetched = tail_hops[0], tail_hops[1:]
    assert (
        computing[2] == "done" and computing[3] == hotkey
    )  # the hop it was computing was finished and reported
    # Each prefetched one handed back, not left to expire: released, or (still being fetched when the miner
    # stopped) handed back by its leave.
    assert all(hop[2] == "queued" and hop[3] is None for hop in prefetched), prefetched
    events = net.orch.state.events(limit=1000)
    requeued = {e["hop"]: e["why"] for e in events if e["kind"] == "requeue"}
    released = [requeued[hop[0]] for hop in prefetched if hop[0] in requeued]
    assert released and set(released) <= {"released by its miner", "left (stopped by its operator)"}
    gone = [e for e in events if e["kind"] == "miner_gone" and e.get("hotkey") == hotkey]
    assert gone and "left" in gone[0]["why"]
    assert tail.state.hops_done == 1


@pytest.mark.parametrize("depth", [1, 3])
def test_challenged_snapshots_are_sent_beside_the_work_and_change_nothing(
    make_net: Callable[..., Net], depth: int
) -> None:
    """Every step challenged, each answer held up 1 s (longer than a step takes here): the miners take the snapshot
    of a past step from the states they keep, between hops, go on computing while it is sent, never report past
    the step they were at before it is answered (the orchestrator would refuse it), and follow the baseline. At depth 3 several searches bring the same challenge
    (and the same phase work at the epoch's end): each is done once."""
    samples = 8
    net = make_net(
        **EXACT,
        samples_per_epoch=samples,
        total_tokens=samples * 2 * SEQ_LEN,
        max_in_flight=8,
        snapshot_rate=1.0,
        max_leases_held=2 * depth + 2,
    )
    net.orch.challenges.delay = (
        1  # served a step later (not the replay depth's 6): most while training goes on
    )
    for _ in range(3):
        miner = net.miner(depth=depth)
        answer = miner.phases.answer

        def slow_answer(*args: Any, answer: Callable[..., None] = answer) -> None:
            time.sleep(1.0)
            answer(*args)

        miner.phases.answer = slow_answer  # type: ignore[method-assign]
        net.start(miner)
    net.join(timeout_s=120)
    status = net.orch.status()
    assert status.phase == "done" and status.samples_lost == 0 and status.samples_requeued == 0

    losses = [loss for (loss,) in net.query("SELECT loss FROM losses ORDER BY sample_id")]
    single = [
        loss
        for _, loss in train_baseline(build_run(net.settings), samples * 2 * SEQ_LEN, progress=False)[
            "loss_curve"
        ]
    ]
    assert max(abs(a - b) for a, b in zip(losses, single, strict=True)) < 1e-4, (losses, single)

    state = net.orch.state
    answered = int(state.get("challenges_answered", 0))
    assert answered >= 3 and int(state.get("challenges_issued", 0)) == answered + int(
        state.get("challenges_missed", 0)
    ) + sum(state.get(f"challenge/{m.client.hotkey}") is not None for m in net.miners)
    events = list(reversed(state.events(1000)))
    taken = {(e["hotkey"], e["step"]): (e["at"], e["until"]) for e in events if e["kind"] == "snapshot_taken"}
    assert len(taken) == sum(e["kind"] == "snapshot_taken" for e in events), "a challenge was answered twice"
    beside = 0
    for event in events:
        if event["kind"] != "snapshot":
            continue
        hotkey, step = event["hotkey"], event["step"]
        started, until = taken[(hotkey, step)]  # every answer was announced when the snapshot was taken
        leased = net.query(
            "SELECT COUNT(*) FROM hops WHERE miner = ? AND lease_expires - ? BETWEEN ? AND ?",
            (hotkey, net.settings.lease_s, started, event["at"]),
        )[0][0]
        beside += leased
        reached = net.query(
            "SELECT COUNT(*) FROM hops WHERE miner = ? AND inner_step > ? AND done_at < ?",
            (hotkey, until, event["at"]),
        )[0][0]
        assert reached == 0, "a report past the step the miner took the snapshot at came before its answer"
    assert beside > 0, "no hop was leased while a snapshot was being sent"


def test_a_refused_step_report_leaves_its_sketch_to_the_next_report(make_net: Callable[..., Net]) -> None:
    """The report that completes a step carries its sketch; when it is refused (here its item is released under
    it, as when its sample restarts), the miner's next report at that step commits the sketch instead: the
    orchestrator refuses (400) a report that reaches a step without one, which stalled the miner for good."""
    samples = 8
    net = make_net(**EXACT, samples_per_epoch=samples, total_tokens=samples * 2 * SEQ_LEN, max_in_flight=8)
    miners = [net.miner() for _ in range(3)]
    refused: list[tuple[str, int]] = []
    for miner in miners:
        report = miner.client.report

        def refuse_first(
            sent: Report, miner: MinerDaemon = miner, report: Callable[[Report], Ack] = report
        ) -> Ack:
            if sent.sketch is not None and not refused:
                refused.append((miner.client.hotkey, sent.inner_step))
                net.orch.release(
                    miner.client.hotkey, sent.hop_id, sent.epoch
                )  # the orchestrator now refuses it
            return report(sent)

        miner.client.report = refuse_first  # type: ignore[method-assign]
        net.start(miner)
    net.join(timeout_s=120)
    status = net.orch.status()
    assert refused and status.phase == "done" and status.samples_lost == 0
    hotkey, step = refused[0]
    assert net.orch.state.get(f"sketch/0/{hotkey}/{step}") is not None  # committed by a later report
    strikes = [why for (why,) in net.query("SELECT why FROM abuse_strikes WHERE hotkey = ?", (hotkey,))]
    # The refusal made here (not leased, or, when the miner leased the item again at once, its output gone with the
    # release), and no report without its sketch.
    assert len(strikes) == 1 and "sketch" not in strikes[0], strikes


@pytest.fixture
def iota_logging() -> Iterator[None]:
    """The `iota` command's log set-up for one test, then loguru's default sink again."""
    configure_logging("DEBUG")
    yield
    logger.remove()
    logger.add(sys.stderr)


def test_the_miners_progress_line_goes_to_stdout(
    make_net: Callable[..., Net], iota_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = 4
    net = make_net(samples_per_epoch=samples, micro_batch=2, accumulate=2, total_tokens=samples * 2 * SEQ_LEN)
    for _ in range(3):
        miner = net.miner()
        miner.progress_s = 0.0  # a line after every item, not every 30 s
        net.start(miner)
    net.join(timeout_s=120)

    out, err = capsys.readouterr()
    line = re.compile(
        r"INFO .* progress: epoch 0 (training|upload|merge|apply|snapshot|starting); hops (\d+) forward, (\d+) backward; "
        r"\d+ tok/s; loss (-|\d+\.\d{3})(; waiting: .+)?$"
    )
    found = [m for m in map(line.search, out.splitlines()) if m]
    assert found, out[-2000:]
    assert "progress:" not in err  # stderr is for warnings and errors: PM2 shows it as such
    # Every sample went forward through the head and back through it: some miner's last line counts them all.
    assert max(int(m.group(2)) for m in found) >= samples
    assert max(int(m.group(3)) for m in found) >= samples
    assert any(m.group(4) != "-" for m in found)  # the tail saw losses
