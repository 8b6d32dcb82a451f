"""The progress lines of `iota local` (iota.local.progress), driven by a clock the test moves: a total and an ETA,
a line when something changed or a heartbeat when nothing did, and never the same line twice in a row."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest
from bittensor.keyfiles import Keypair

from iota.local import training_note
from iota.local.progress import Progress, step
from iota.protocol import Status
from iota.protocol.messages import MinerStatus, StageStatus


class Clock:
    """Monotonic seconds that move only when the test says so (read from the heartbeat thread too)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_a_counted_job_shows_its_total_rate_and_eta_and_no_line_twice() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("training", 60_000, "tok", out=out, tty=False, clock=clock, every_s=5.0, quiet_s=10.0)
    # 30 s of start-up with nothing trained, polled twice a second, then 600 tokens a second for 60 s.
    for _ in range(60):
        progress.update(0, "epoch 1/2: 2 of 6 miners registered")
        clock.advance(0.5)
    for second in range(60):
        for _ in range(2):
            progress.update(600 * (second + 1), "epoch 1/2 train")
            clock.advance(0.5)
    progress.close("epoch 2/2 done")

    printed = lines(out)
    assert all(a != b for a, b in zip(printed, printed[1:], strict=False)), printed
    # While nothing moves: the first line, then one every quiet_s (the elapsed time says it is alive).
    waiting = [line for line in printed if line.startswith("training: 0/60,000 tok")]
    assert [re.search(r"\[(\d\d:\d\d)<", line).group(1) for line in waiting] == ["00:00", "00:10", "00:20"]  # type: ignore[union-attr]
    # While it moves: at most one line per every_s, each with the count of the total, the rate since the count
    # began to move (not diluted by the start-up) and the time left at that rate.
    moving = [line for line in printed if "epoch 1/2 train" in line]
    assert 10 <= len(moving) <= 13, moving
    assert (
        moving[0] == "training: 600/60,000 tok (1%) [00:30<?], epoch 1/2 train"
    )  # no rate from one step yet
    assert "training: 30,600/60,000 tok (51%) [01:20<00:49, 600tok/s], epoch 1/2 train" in moving
    assert printed[-1] == "training: 36,000/60,000 tok (60%) [01:30<00:40, 590tok/s], epoch 2/2 done"


def test_a_changed_note_is_printed_and_an_unchanged_one_is_not_repeated_early() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("starting", out=out, tty=False, clock=clock, every_s=5.0, quiet_s=10.0)
    progress.update(0, "migrating the database")
    clock.advance(6)
    progress.update(0, "migrating the database")  # unchanged, before quiet_s: nothing
    progress.update(0, "preparing data")  # changed, after every_s: printed
    clock.advance(1)
    progress.update(0, "uploading shards")  # changed, but 1 s after the last line: waits
    clock.advance(4)
    progress.update(0, "uploading shards")
    assert lines(out) == [
        "starting: 00:00, migrating the database",
        "starting: 00:06, preparing data",
        "starting: 00:11, uploading shards",
    ]


def test_on_a_terminal_the_line_is_rewritten_in_place() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress("training", 1000, "tok", out=out, tty=True, clock=clock)
    for n in range(0, 1000, 100):
        progress.update(n)
        clock.advance(1)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 11 and text.count("\n") == 1 and text.endswith("\n")
    assert "training: 900/1,000 tok (90%)" in text


def test_a_step_beats_while_it_runs_and_says_when_it_is_done() -> None:
    clock, out = Clock(), io.StringIO()
    with step("pulling the checkpoint", out=out, tty=False, clock=clock, quiet_s=10.0):
        clock.advance(25)
        deadline = time.monotonic() + 60
        while len(lines(out)) < 2:  # the heartbeat thread looks at the clock every second
            assert time.monotonic() < deadline, lines(out)
            time.sleep(0.05)
    assert lines(out) == [
        "pulling the checkpoint: 00:00",
        "pulling the checkpoint: 00:25",
        "pulling the checkpoint: 00:25, done",
    ]


def test_a_failed_step_does_not_say_done() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), step("evaluating", out=out, tty=False):
        raise RuntimeError("no checkpoint")
    assert lines(out) == ["evaluating: 00:00"]


HOTKEYS = [Keypair.create_from_uri(f"//miner{i}").ss58_address for i in range(6)]


def status(tokens: int, alive: int, epoch: int = 0, phase: str = "train") -> Status:
    miners = [
        MinerStatus(hotkey=HOTKEYS[i], uid=i, stage=0, alive=True, hops_done=0, last_seen=0.0, device="cpu")
        for i in range(alive)
    ]
    return Status(
        run_id="local",
        epoch=epoch,
        phase=phase,
        paused=False,
        stages=[StageStatus(index=0, miners=miners, queued_forward=0, queued_backward=0, leased=0)],
        tokens_trained=tokens,
        samples_completed=0,
        samples_in_flight=3,
        samples_requeued=1,
        samples_lost=0,
        latest_loss=None if tokens == 0 else 5.25,
        loss_curve=[],
        bytes_transferred=0,
        checkpoint=None,
    )


def test_the_training_note_says_what_the_network_waits_for_and_which_epoch_of_how_many() -> None:
    assert training_note(status(0, 2), epochs=2, miners=6) == (
        "epoch 1/2: 2 of 6 miners registered (each loads its stage and the data first)"
    )
    assert training_note(status(4096, 6, epoch=1), epochs=2, miners=6) == (
        "epoch 2/2 train, loss 5.250, 6/6 miners, 3 samples in flight, 1 requeued"
    )
    # Done: the epoch counter has moved past the last epoch; the note does not say "epoch 3/2".
    assert training_note(status(8192, 6, epoch=2, phase="done"), epochs=2, miners=6).startswith(
        "epoch 2/2 done"
    )


def test_a_counted_step_ends_on_its_last_note_not_on_done() -> None:
    clock, out = Clock(), io.StringIO()
    with step("training", total=1024, unit="tok", out=out, tty=False, clock=clock) as training:
        clock.advance(3)
        training.update(1024, "epoch 1/1 done, loss 6.195")
    assert lines(out)[-1] == "training: 1,024/1,024 tok (100%) [00:03<?], epoch 1/1 done, loss 6.195"
