"""GET /metrics as Prometheus reads it, on the real app over HTTP: prometheus_client's OpenMetrics parser (asked for
with the Accept header) and its text parser both read typed families with HELP and no clashing names; a request is
timed under its route template (never its raw path) and an accepted hop report lands in the hop histogram."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from iota.orchestrator.routes.cache import PUBLIC_READ_TTL_S, Cache
from iota.storage.transfer import download, upload
from tests.ops import REPO, wait_for
from tests.orchestrator import test_routes
from tests.orchestrator.test_routes import MINERS, Net, activation, forward_with_bytes, report_for

# The real orchestrator app on uvicorn with signed miner clients (tests/orchestrator/test_routes.py's fixtures).
net, keys = test_routes.net, test_routes.keys

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
REPORT_ROUTE = "/work/{hop_id}/report"


def scrape(net: Net, accept: str | None = None) -> tuple[str, dict[str, Metric]]:
    """(content type, families by name) of one GET /metrics, parsed by the parser its format needs."""
    headers = {"accept": accept} if accept else {}
    response = httpx.get(f"{net.url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
    families: dict[str, Metric] = {}
    for family in parse(response.text):  # raises on a clashing name, a sample outside its family, a bad line
        assert family.name not in families, f"family {family.name} appears twice"
        families[family.name] = family
    return content_type, families


def value(family: Metric, name: str, **labels: str) -> float:
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels} in {family.samples}"
    return found[0]


def hop_reported(net: Net, accept: str | None = None) -> tuple[str, dict[str, Metric]] | None:
    """The scrape once the first hop's report is in a reading (a reading is served for up to a second)."""
    content_type, families = scrape(net, accept)
    hops = families.get("iota_hop_duration_seconds")
    reported = hops is not None and any(s.name.endswith("_count") and s.value >= 1 for s in hops.samples)
    return (content_type, families) if reported else None


def test_openmetrics_parse_with_typed_families_and_histograms_after_a_hop(net: Net) -> None:
    net.join(*MINERS)
    forward_with_bytes(net, "head", fill=0.5)  # stage 0's forward: uploaded, reported, accepted
    httpx.get(f"{net.url}/no/such/path/{'x' * 40}", timeout=10)  # a made-up path mints no series

    content_type, families = wait_for("the hop's report in /metrics", lambda: hop_reported(net, OPENMETRICS))
    assert content_type.startswith("application/openmetrics-text")
    untyped = [f.name for f in families.values() if f.type in ("unknown", "untyped")]
    assert not untyped, f"families without a type: {untyped}"
    undocumented = [f.name for f in families.values() if not f.documentation.strip()]
    assert not undocumented, f"families without HELP: {undocumented}"

    types = {name: families[name].type for name in families if name.startswith("iota_")}
    assert types["iota_tokens_trained"] == types["iota_samples_completed"] == "counter"
    assert types["iota_queue_depth"] == types["iota_miners_alive"] == "gauge"
    assert types["iota_phase"] == "stateset" and types["iota_run"] == "info"
    assert types["iota_hop_duration_seconds"] == types["iota_http_request_duration_seconds"] == "histogram"

    assert value(families["iota_phase"], "iota_phase", iota_phase="train") == 1
    assert value(families["iota_phase"], "iota_phase", iota_phase="merge") == 0
    assert value(families["iota_run"], "iota_run_info", run_id="run-test") == 1
    assert value(families["iota_miners_alive"], "iota_miners_alive", stage="1") == 1
    # The head's output waits at stage 1: one forward queued there.
    assert value(families["iota_queue_depth"], "iota_queue_depth", stage="1", direction="forward") == 1
    assert value(families["iota_hops_done"], "iota_hops_done_total", stage="0") == 1

    hops = families["iota_hop_duration_seconds"]
    assert value(hops, "iota_hop_duration_seconds_count", stage="0", direction="forward") == 1
    assert value(hops, "iota_hop_duration_seconds_bucket", stage="0", direction="forward", le="+Inf") == 1

    requests = families["iota_http_request_duration_seconds"]
    routes = {s.labels["route"] for s in requests.samples}
    assert {"/miners/register", "/work", REPORT_ROUTE, "unmatched"} <= routes
    assert not any("no/such" in route for route in routes)
    count = "iota_http_request_duration_seconds_count"
    assert value(requests, count, route=REPORT_ROUTE, method="POST", status="200") == 1
    assert value(requests, count, route="/miners/register", method="POST", status="200") == len(MINERS)


def test_prometheus_text_format_parses_with_help_and_type_on_every_family(net: Net) -> None:
    net.join(*MINERS)
    forward_with_bytes(net, "head", fill=0.5)
    content_type, families = wait_for("the hop's report in /metrics", lambda: hop_reported(net))
    assert content_type.startswith("text/plain")
    assert all(f.type != "unknown" and f.documentation.strip() for f in families.values())
    assert value(families["iota_samples_lost"], "iota_samples_lost") == 0
    assert value(families["iota_tokens_trained"], "iota_tokens_trained_total") == 0  # no backward yet
    hops = families["iota_hop_duration_seconds"]
    assert value(hops, "iota_hop_duration_seconds_count", stage="0", direction="forward") == 1


def test_a_reading_serves_every_scraper_until_it_is_a_second_old(net: Net) -> None:
    """A flood of anonymous scrapes costs one reading of the state and one rendering, not one each."""
    clock = [0.0]
    cache = net.app.state.public_cache = Cache(clock=lambda: clock[0])  # time stands still until moved
    first = httpx.get(f"{net.url}/metrics", timeout=10).content
    computed = cache.computed
    assert computed >= 1
    assert {httpx.get(f"{net.url}/metrics", timeout=10).content for _ in range(4)} == {first}
    net.join(*MINERS)  # the state moves on; the reading stands
    assert httpx.get(f"{net.url}/metrics", timeout=10).content == first and cache.computed == computed
    clock[0] = PUBLIC_READ_TTL_S
    _, families = scrape(net)
    assert cache.computed > computed
    assert value(families["iota_miners_alive"], "iota_miners_alive", stage="0") == 1


def queries(node: Any) -> list[str]:
    """Every PromQL expression in a Grafana dashboard's JSON, panels and variables alike."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        found += [node["definition"]] if isinstance(node.get("definition"), str) else []
        return found + [q for value in node.values() for q in queries(value)]
    return [q for value in node for q in queries(value)] if isinstance(node, list) else []


def test_grafana_dashboard_queries_only_metrics_the_orchestrator_serves(net: Net) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "iota.json").read_text())
    expressions = queries(dashboard)
    assert len(expressions) >= 20
    named = {name for e in expressions for name in re.findall(r"\b(?:iota|process)_[a-z_]+\b", e)}
    complete_a_sample(net)
    families = wait_for("the sample's loss in /metrics", lambda: loss_reported(net))
    served = {sample.name for family in families.values() for sample in family.samples}
    assert named - served == set(), "the dashboard queries metrics /metrics does not serve"


def loss_reported(net: Net) -> dict[str, Metric] | None:
    """The families of a scrape once a completed sample's loss is in its reading."""
    families = scrape(net)[1]
    return families if "iota_loss" in families else None


def complete_a_sample(net: Net) -> None:
    """One sample's forward through the three stages and its backward to the head, as miners report them."""
    net.join(*MINERS)
    for name in MINERS:
        forward_with_bytes(net, name, fill=0.5, loss=2.0 if name == "tail" else None)
    for name in ("mid", "head"):
        work = net.work(name, "backward")
        data = download(work.input_url or "", work.input_sha256, 1 << 24)
        out = activation(net) if work.output_url else None
        if work.output_url and out is not None:
            upload(work.output_url, out)
        net.clients[name].report(report_for(work, data, out))
