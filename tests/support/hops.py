"""A training hop done on the test's thread by the miner daemon's own code, for tests that drive miners step by step."""

from __future__ import annotations

from iota.miner.main import Miner
from iota.protocol import Work
from iota.storage.transfer import download, upload


def train_hop(miner: Miner, work: Work) -> None:
    """Fetch the input, compute the forward or backward and the inner step it completes (`Miner._compute`, with
    the epoch plan's learning rate and the sketch it commits), upload the output, report. A refused report raises
    (the daemon's outbox would only log it)."""
    assert miner.worker is not None
    data = (
        download(work.input_url, work.input_sha256, miner.worker.max_bytes, miner.http)
        if work.input_url
        else None
    )
    finished = miner._compute(work, data)
    if finished.output is not None:
        assert work.output_url
        upload(work.output_url, finished.output, miner.http)
    miner.client.report(finished.report())
