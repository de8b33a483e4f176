"""The operator's files (Grafana dashboard, Prometheus alert rules) against the metrics
the service really exports, and the aggregation of metrics across worker processes."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ledger.observability import Metrics
from tests import provision
from tests.conftest import REPOSITORY, serving_process

DASHBOARD = REPOSITORY / "ops" / "grafana" / "ledger-dashboard.json"
ALERTS = REPOSITORY / "ops" / "prometheus" / "alerts.yml"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Words of PromQL that are not metric names (aggregation modifiers, set operators, ...).
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
PROMQL_KEYWORDS |= {"offset", "inf", "nan"}
# Series Prometheus makes itself, about each scrape.
PROMETHEUS_SERIES = {"up"}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label
    matchers, ranges, grouping labels, Grafana variables and function calls are set aside."""
    expression = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    expression = re.sub(r"\{[^}]*\}", " ", expression)
    expression = re.sub(r"\[[^\]]*\]", " ", expression)
    expression = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expression)
    expression = re.sub(r"\$\{?\w+\}?", " ", expression)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expression):
        if expression[match.end() :].lstrip().startswith("(") or match.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def exported_series(exposition: str) -> set[str]:
    """The series names a PromQL expression may select from this exposition: every family
    its `# TYPE` lines declare (with or without samples yet), histograms by their
    `_bucket`, `_sum` and `_count` series."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    return names


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and query variables (a
    `label_values(metric, label)` query selects `metric`)."""
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            expressions.append(re.sub(r"^label_values\(([^,]+),.*\)$", r"\1", query))
    return expressions


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def exposition(server_url: str, api_headers: dict[str, str]) -> str:
    """A real scrape, after an account and a transfer so that every family has samples."""
    uid = secrets.token_hex(4)
    with httpx.Client(base_url=server_url, headers=api_headers, timeout=10) as client:
        client.post("/v1/accounts", json={"id": f"ops-bank-{uid}", "currency": "EUR", "allow_negative_balance": True})
        client.post("/v1/accounts", json={"id": f"ops-{uid}", "currency": "EUR"})
        transfer = {"id": f"ops-t-{uid}", "debit_account_id": f"ops-bank-{uid}", "credit_account_id": f"ops-{uid}"}
        assert client.post("/v1/transfers", json={**transfer, "amount": 5}).status_code == 201
        return client.get("/metrics").text


def test_the_promql_name_extractor_finds_exactly_the_selected_metrics() -> None:
    expression = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route=~"/v1/x.*", le!="1"}[5m])))'
        ' / ignoring(state) b_total offset 5m > 1e3 and on(process) up{job="$job"} unless c[10m:1m]'
    )
    assert metric_names(expression) == {"a_bucket", "b_total", "up", "c"}


def test_metrics_answers_one_prometheus_content_type_and_parses(server_url: str, exposition: str) -> None:
    answer = httpx.get(f"{server_url}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    # The reference parser strips _total from counter family names.
    assert {"ledger_requests", "ledger_request_duration_seconds", "ledger_pool_connections", "ledger_ready"} <= set(
        families
    )
    assert families["ledger_request_duration_seconds"].type == "histogram"
    declared = re.findall(r"^# TYPE (\S+) ", exposition, re.MULTILINE)
    assert len(declared) == len(set(declared)), "a family is declared twice"


def test_the_dashboard_is_importable_and_has_the_operators_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [item["name"] for item in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"] and all(
            target["datasource"]["uid"] == "${DS_PROMETHEUS}" for target in panel["targets"]
        )
    # No two panels cover the same cell of the grid.
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]

    def shown(*patterns: str) -> bool:
        """Some panel has, among its expressions, a match for every pattern."""
        return any(
            all(any(re.search(pattern, target["expr"]) for target in panel["targets"]) for pattern in patterns)
            for panel in panels
        )

    wanted = {
        "requests/s by route": [r"sum by \(method, route\) \(rate\(ledger_requests_total"],
        "transfers/s": [r'rate\(ledger_transfer_outcomes_total\{[^}]*code="created"'],
        "outcomes by code": [r"sum by \(code\) \(rate\(ledger_transfer_outcomes_total"],
        "latency p50/p90/p99": [
            rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\(ledger_request_duration_seconds_bucket"
            for quantile in ("0.5", "0.9", "0.99")
        ],
        "pool vs size": [r"sum by \(state\) \(ledger_pool_connections", r"ledger_pool_size"],
        "503s by cause": [r"sum by \(code\) \(rate\(ledger_unavailable_total"],
        "mean group size": [r"ledger_group_transfers_sum.*/.*ledger_group_transfers_count"],
        "group queue": [r"ledger_group_queue"],
        "retries by reason": [r"sum by \(reason\) \(rate\(ledger_transaction_retries_total"],
    }
    missing = [name for name, patterns in wanted.items() if not shown(*patterns)]
    assert not missing, missing
    heatmaps = [panel for panel in panels if panel["type"] == "heatmap"]
    assert any(
        target.get("format") == "heatmap" and "ledger_group_transfers_bucket" in target["expr"]
        for panel in heatmaps
        for target in panel["targets"]
    ), "no distribution of group sizes"


def test_the_alert_rules_are_well_formed_and_cover_the_failures() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"].strip() and len(rule["annotations"]["description"]) > 80
    expressions = " ".join(rule["expr"] for rule in rules)
    for pattern in (
        r'up\{job="ledger"\} == 0',
        r'ledger_requests_total\{[^}]*status=~"5\.\."',
        r'ledger_unavailable_total\{[^}]*code="overloaded"',
        r'ledger_unavailable_total\{[^}]*code="lock_timeout"',
        r"histogram_quantile\(0\.99,\s*sum by \([^)]*\) \(rate\(ledger_request_duration_seconds_bucket",
        r'ledger_pool_connections\{[^}]*state="waiting"',
        r"ledger_ready",
        r"deriv\(ledger_group_queue",
    ):
        assert re.search(pattern, expressions), pattern


def test_every_expression_names_only_exported_metrics(exposition: str) -> None:
    exported = exported_series(exposition) | PROMETHEUS_SERIES
    assert {"ledger_request_duration_seconds_bucket", "ledger_pool_size", "ledger_requests_total"} <= exported
    dashboard = json.loads(DASHBOARD.read_text())
    sources = [("dashboard", expression) for expression in dashboard_expressions(dashboard)]
    sources += [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    for source, expression in sources:
        names = metric_names(expression)
        assert names, f"{source}: no metric found in {expression!r}"
        assert names <= exported, f"{source} names metrics the service does not export: {names - exported}"


# Aggregation across worker processes.


class FakePool:
    def __init__(self, in_use: int) -> None:
        self.in_use = in_use

    def checkedout(self) -> int:
        return self.in_use

    def checkedin(self) -> int:
        return 5 - self.in_use

    def overflow(self) -> int:
        return -5 + self.in_use

    def size(self) -> int:
        return 5


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(exposition: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped[name, tuple(sorted(labels.items()))]


@pytest.fixture
def other_pids() -> Iterator[tuple[int, int]]:
    """The pid of a live process and of a dead one."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        yield live.pid, dead.pid
    finally:
        live.kill()
        live.wait()


def test_a_scrape_sums_every_workers_counters_and_shows_live_workers_gauges(
    tmp_path: Path, other_pids: tuple[int, int]
) -> None:
    """Three workers of one service (`ledger serve` pid 4242): the scraped one, a live
    one and a dead one. Counters and histograms add up all three; gauges come from the
    live ones only."""
    live_pid, dead_pid = other_pids
    directory = tmp_path / "4242"
    directory.mkdir()
    workers = []
    for pid, requests, latency, in_use in ((os.getpid(), 3, 0.002, 1), (live_pid, 4, 0.3, 2), (dead_pid, 5, 20.0, 3)):
        worker = Metrics(directory)
        worker.pid = pid
        worker.pool = FakePool(in_use)
        for _ in range(requests):
            worker.observe_request("POST", "/v1/transfers", 201, latency)
            worker.transfer_outcome("created")
        worker.group(requests)
        workers.append(worker)
    for worker in workers[1:]:
        worker.publish()
    scraped = samples(workers[0].render())

    service = {"process": "4242"}
    route = {"method": "POST", "route": "/v1/transfers", **service}
    assert value(scraped, "ledger_requests_total", status="201", **route) == 12
    assert value(scraped, "ledger_transfer_outcomes_total", code="created", **service) == 12
    assert value(scraped, "ledger_request_duration_seconds_bucket", le="0.0025", **route) == 3
    assert value(scraped, "ledger_request_duration_seconds_bucket", le="0.5", **route) == 7
    assert value(scraped, "ledger_request_duration_seconds_bucket", le="+Inf", **route) == 12
    assert value(scraped, "ledger_request_duration_seconds_count", **route) == 12
    assert value(scraped, "ledger_request_duration_seconds_sum", **route) == pytest.approx(3 * 0.002 + 1.2 + 100)
    assert value(scraped, "ledger_group_transfers_bucket", le="4", **service) == 2
    assert value(scraped, "ledger_group_transfers_sum", **service) == 12
    in_use = {
        labels[0][1]: value
        for (name, labels), value in scraped.items()
        if name == "ledger_pool_connections" and ("state", "in_use") in labels
    }
    assert in_use == {str(os.getpid()): 1, str(live_pid): 2}

    # The live worker counts more and publishes: the next scrape, by either worker,
    # counts it; nothing any worker counted goes missing or backwards.
    workers[1].observe_request("POST", "/v1/transfers", 201, 0.3)
    workers[1].publish()
    assert value(samples(workers[0].render()), "ledger_requests_total", status="201", **route) == 13
    assert value(samples(workers[1].render()), "ledger_requests_total", status="201", **route) == 13


def test_one_process_without_a_directory_reports_its_own_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEDGER_WORKER_METRICS_DIR", raising=False)
    metrics = Metrics()
    metrics.observe_request("GET", "/v1/accounts", 200, 0.01)
    metrics.pool = FakePool(1)
    scraped = samples(metrics.render(ready=True))
    own = str(os.getpid())
    assert value(scraped, "ledger_requests_total", method="GET", route="/v1/accounts", status="200", process=own) == 1
    assert value(scraped, "ledger_pool_size", process=own) == 5 and value(scraped, "ledger_ready", process=own) == 1
    assert metrics.directory is None


def request_count(exposition: str, route_pattern: str) -> tuple[float, set[str]]:
    """The GET 404 answers counted on routes matching `route_pattern`, and the `process`
    labels those series carry."""
    total, processes = 0.0, set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "ledger_requests_total" and labels["status"] == "404" and labels["method"] == "GET":
                if re.fullmatch(route_pattern, labels["route"]):
                    total += sample.value
                    processes.add(labels["process"])
    return total, processes


def gauge_processes(exposition: str, name: str) -> set[str]:
    return set(re.findall(rf'^{name}\{{process="(\d+)"', exposition, re.MULTILINE))


def test_with_two_workers_every_scrape_counts_every_request(
    ledger_database: provision.LedgerDatabase, tmp_path: Path, uid: str
) -> None:
    """`ledger serve --workers 2`: requests on fresh connections reach both workers; every
    scrape, whichever worker answers it, counts all of them, and keeps counting them
    after a worker dies and is replaced; gauges list the live workers."""
    environment = {
        **provision.server_environment(ledger_database, tmp_path / "data"),
        "LEDGER_CHECKPOINT_INTERVAL_SECONDS": "0",
    }
    requests = 40
    route = r"/v1/accounts/\{account_id(:str)?\}"
    with serving_process(tmp_path, environment, "--workers", "2") as (base_url, _):
        assert [path.name for path in (tmp_path / "data" / "metrics").iterdir()] != []
        for index in range(requests):
            with httpx.Client(base_url=base_url, headers=provision.API_HEADERS, timeout=10) as client:
                assert client.get(f"/v1/accounts/ops-workers-{uid}-{index}").status_code == 404

        def scrape() -> str:
            with httpx.Client(base_url=base_url, timeout=10) as client:  # a fresh connection: either worker
                return client.get("/metrics").text

        # Another worker's figures are at most a publication interval (1 s) old.
        deadline = time.monotonic() + 10
        while request_count(scrape(), route)[0] != requests:
            assert time.monotonic() < deadline, f"never counted {requests}:\n{scrape()}"
            time.sleep(0.2)

        def check_scrapes(count: int) -> tuple[set[str], set[str]]:
            """Every one of `count` scrapes counts every request; the workers that
            answered, and the workers whose pool gauges they showed."""
            answered, workers = set(), set()
            for _ in range(count):
                exposition = scrape()
                total, processes = request_count(exposition, route)
                assert total == requests, exposition
                assert len(processes) == 1  # summed: one series, labelled with `ledger serve`'s pid
                answered |= gauge_processes(exposition, "ledger_ready")
                pools = gauge_processes(exposition, "ledger_pool_size")
                assert len(pools) == 2, exposition
                workers |= pools
            return answered, workers

        answered, workers = check_scrapes(30)
        assert len(workers) == 2 and answered == workers, (answered, workers)

        # A worker dies without a word (its last publication stays): uvicorn starts another.
        killed = sorted(workers)[0]
        os.kill(int(killed), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (
            killed in gauge_processes(exposition := scrape(), "ledger_pool_size")
            or len(gauge_processes(exposition, "ledger_pool_size")) != 2
        ):
            assert request_count(exposition, route)[0] == requests, exposition
            assert time.monotonic() < deadline, f"worker {killed} was not replaced:\n{exposition}"
            time.sleep(0.2)
        _, workers_after = check_scrapes(10)
        assert killed not in workers_after and len(workers_after) == 2
    assert list((tmp_path / "data" / "metrics").iterdir()) == [], "ledger serve left its metrics directory"
