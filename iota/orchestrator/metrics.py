"""The orchestrator's figures for Prometheus (GET /metrics) and the dashboard: typed metric families with HELP,
request and hop histograms, in a registry of the app's own (several apps share a process in the tests).

The run's figures (``Metrics.read``) are read through the app's cache of public reads (routes.cache), whoever
asks: GET /metrics and the dashboard are anonymous, and a reading costs a pass over the score log. The page
rendered from a reading is kept with it, so a flood of scrapes costs one reading and one rendering per second.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.exposition import choose_encoder

from iota.audit.scoring import compute_scores
from iota.orchestrator.admission import Admission
from iota.orchestrator.ledgers.keys import Counter
from iota.orchestrator.scheduler import APPLY, BACKWARD, DONE, FORWARD, MERGE, TRAIN, UPLOAD
from iota.orchestrator.service import Orchestrator
from iota.protocol import Status

PHASES = (TRAIN, UPLOAD, MERGE, APPLY, DONE)
REPORT_ROUTE = "/work/{hop_id}/report"  # an accepted report (200) here completes a hop
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# Reported hops awaiting their reading: bounded, so that a run nobody scrapes holds no growing list.
MAX_PENDING_HOPS = 10_000
ID_CHUNK = 500  # hop ids per query (SQLite allows 999 parameters before 3.32)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HOP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class Figures:
    """One reading of the run: /status, the counters /status lacks, the score log's scores and verdicts, the
    current epoch's progress, and the phase and checkpoint events (newest first)."""

    status: Status
    counters: dict[Counter, int]
    scores: dict[str, float]
    verdicts: list[dict[str, Any]]
    epoch_samples_done: int
    samples_per_epoch: int
    epochs: int  # 0: until stopped
    events: list[dict[str, Any]]
    now: float  # the orchestrator's clock at the reading


COUNTERS: tuple[Counter, ...] = ("merges", "audits_passed", "audits_failed", "leases_expired")
TIMELINE_EVENTS = ("phase", "checkpoint")
MAX_TIMELINE_EVENTS = 200


def read_figures(orchestrator: Orchestrator, score_log: dict[str, Any]) -> Figures:
    """A reading of the run (on the orchestrator's call runner, like every call into its state), with the score
    log read for GET /scores (iota.orchestrator.routes.validators)."""
    status = orchestrator.status()
    state, policy = orchestrator.state, orchestrator.scheduler.policy
    return Figures(
        status=status,
        counters={name: state.counters.get(name) for name in COUNTERS},
        scores=compute_scores(score_log),
        verdicts=list(score_log["verdicts"]),
        epoch_samples_done=state.count_samples(status.epoch, "done"),
        samples_per_epoch=policy.samples_per_epoch,
        epochs=policy.epochs,
        events=state.events(MAX_TIMELINE_EVENTS, kinds=TIMELINE_EVENTS),
        now=orchestrator.clock(),
    )


class Metrics:
    """The app's registry (histograms, the process's CPU and memory), the hops reported since the last reading,
    and the page rendered from the latest reading."""

    def __init__(self, orchestrator: Orchestrator, admission: Admission | None = None) -> None:
        self.orchestrator = orchestrator
        self.admission = admission
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Histogram(
            "iota_http_request_duration_seconds",
            "Seconds from a request's arrival to its answer (a held POST /work included), by route template "
            "(unmatched: no such route, or refused before routing), method and status.",
            ["route", "method", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.hops = Histogram(
            "iota_hop_duration_seconds",
            "Seconds from a hop's queueing to its accepted report (queue wait, transfers and compute), by stage "
            "and direction.",
            ["stage", "direction"],
            buckets=HOP_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        # Appended on the event loop, drained on the call runner's thread: deque's ends are thread-safe.
        self._reported: deque[int] = deque(maxlen=MAX_PENDING_HOPS)
        self._pages: dict[str, tuple[Figures, bytes]] = {}

    # -- what the middleware sees --------------------------------------------------------------------------

    def request_done(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        """Count a finished request under its route template: a caller cannot mint series with made-up paths."""
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        self.requests.labels(route, method if method in METHODS else "other", str(status)).observe(seconds)
        if route == REPORT_ROUTE and status == 200:
            self._reported.append(int(scope["path_params"]["hop_id"]))

    # -- readings --------------------------------------------------------------------------------------------

    def read(self, score_log: dict[str, Any]) -> Figures:
        """A reading of the run, the hops reported since the last one observed first (on the call runner)."""
        self._observe_reported_hops()
        return read_figures(self.orchestrator, score_log)

    def _observe_reported_hops(self) -> None:
        pending = [self._reported.popleft() for _ in range(len(self._reported))]
        for start in range(0, len(pending), ID_CHUNK):
            for stage, direction, seconds in self.orchestrator.state.work.durations(
                pending[start : start + ID_CHUNK]
            ):
                self.hops.labels(str(stage), direction).observe(max(seconds, 0.0))

    def page(self, figures: Figures, accept: str) -> tuple[bytes, str]:
        """The exposition of ``figures`` in the format the Accept header asks for (OpenMetrics or Prometheus
        text), and its content type; rendered once per reading and format."""
        encode, content_type = choose_encoder(accept)
        kept = self._pages.get(content_type)
        if kept is not None and kept[0] is figures:
            return kept[1], content_type
        body = encode(_Families([*run_families(figures, self.admission), *self.registry.collect()]))  # type: ignore[arg-type]
        self._pages[content_type] = (figures, body)
        return body, content_type


class _Families:
    """Metric families already built, in the shape the encoders read (``collect()``)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def _labelled(
    family: type[GaugeMetricFamily | CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    rows: Iterable[tuple[list[str], float]],
) -> Metric:
    metric = family(name, doc, labels=labels)
    for values, value in rows:
        metric.add_metric(values, value)
    return metric


def run_families(f: Figures, admission: Admission | None) -> list[Metric]:
    """The run's gauges and counters (counter names without ``_total``: the encoders add it)."""
    s = f.status
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    # fmt: off
    scalars: list[tuple[Callable[..., Metric], str, str, float]] = [
        (gauge, "iota_epoch", "The current epoch (from 0).", s.epoch),
        (gauge, "iota_epochs_planned", "Epochs the run trains for; 0: until stopped.", f.epochs),
        (gauge, "iota_paused", "1 while the operator has paused the run.", int(s.paused)),
        (gauge, "iota_epoch_samples_completed", "Samples completed in the current epoch.", f.epoch_samples_done),
        (gauge, "iota_epoch_samples_planned", "Samples an epoch trains before it ends.", f.samples_per_epoch),
        (counter, "iota_tokens_trained", "Tokens trained (a sample's, once its backward is done).", s.tokens_trained),
        (counter, "iota_samples_completed", "Samples whose forward and backward passed every stage.", s.samples_completed),
        (gauge, "iota_samples_in_flight", "Samples started and not yet completed.", s.samples_in_flight),
        (counter, "iota_samples_requeued", "Samples restarted after a miner dropped or failed them.", s.samples_requeued),
        (gauge, "iota_samples_lost", "Samples neither completed nor in flight: must stay 0.", s.samples_lost),
        (counter, "iota_bytes_transferred", "Activation and gradient bytes through the store, up and down.", s.bytes_transferred),
        (counter, "iota_merges", "Stage merges completed at epoch ends.", f.counters["merges"]),
        (counter, "iota_audits_passed", "Audit verdicts that passed.", f.counters["audits_passed"]),
        (counter, "iota_audits_failed", "Audit verdicts that failed.", f.counters["audits_failed"]),
        (counter, "iota_leases_expired", "Hops whose lease ran out before their report.", f.counters["leases_expired"]),
    ]
    if s.latest_loss is not None:
        scalars.append((gauge, "iota_loss", "The loss of the latest completed sample.", s.latest_loss))
    if admission is not None:
        scalars += [
            (gauge, "iota_requests_in_progress", "Requests being served (held ones not).", admission.in_progress),
            (gauge, "iota_requests_in_progress_limit", "Requests in progress past which new ones get 503.", admission.max_in_progress),
            (counter, "iota_requests_refused_overloaded", "Requests refused with 503 at that limit.", admission.refused),
            (counter, "iota_requests_refused_share", "Requests refused with 429: their caller's share was in progress.", admission.refused_share),
        ]
    # fmt: on
    stages = [(str(st.index), st) for st in s.stages]
    phases = {phase: phase == s.phase for phase in PHASES} | {s.phase: True}
    return [
        InfoMetricFamily("iota_run", "The run this orchestrator serves.", value={"run_id": s.run_id}),
        StateSetMetricFamily("iota_phase", "The current epoch's phase: train, upload, merge, apply; done at the end.", value=phases),
        *(kind(name, doc, value=value) for kind, name, doc, value in scalars),
        _labelled(gauge, "iota_score", "A miner's weight from the score log (they sum to 1).", ["hotkey"],
                  (([hotkey], weight) for hotkey, weight in f.scores.items())),
        _labelled(gauge, "iota_queue_depth", "Hops queued, by stage and direction.", ["stage", "direction"],
                  (row for i, st in stages for row in (([i, FORWARD], st.queued_forward), ([i, BACKWARD], st.queued_backward)))),
        _labelled(gauge, "iota_leased", "Hops leased and not yet reported, by stage.", ["stage"],
                  (([i], st.leased) for i, st in stages)),
        _labelled(gauge, "iota_miners", "Miners registered, by stage.", ["stage"],
                  (([i], len(st.miners)) for i, st in stages)),
        _labelled(gauge, "iota_miners_alive", "Miners alive, by stage.", ["stage"],
                  (([i], sum(m.alive for m in st.miners)) for i, st in stages)),
        _labelled(counter, "iota_hops_done", "Hops completed by the stage's miners.", ["stage"],
                  (([i], sum(m.hops_done for m in st.miners)) for i, st in stages)),
    ]  # fmt: skip


class RequestMetricsMiddleware:
    """ASGI middleware: each HTTP request's duration and status into ``Metrics.request_done``."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before starting a response

        async def watched_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.metrics.request_done(scope, status, time.perf_counter() - started)
