"""The Grafana dashboard (deploy/grafana/dashboards/rnnserve.json) asks Prometheus only for metrics a real server
exports: every metric name in every panel's PromQL (and in the template variables' queries) is one that a server's
/metrics shows after it served some steps and refused one."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY_INPUT

from rnnserve.client import Client, RnnServeError

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "rnnserve.json"

# The sample names Prometheus stores for a family of each type (text exposition format 0.0.4).
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count"),
}
# Words of PromQL that are not metric names (functions and aggregations are followed by "(").
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
KEYWORDS |= {"inf", "nan"}


def exported_names(text: str) -> set[str]:
    """Every metric name Prometheus would store from this /metrics page: the samples shown, and for families with
    no sample yet (no store error so far), the names their type gives their samples."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label names
    (in ``{...}`` or ``by (...)``), strings or range durations."""
    label_values = re.fullmatch(r"\s*label_values\(\s*(?:([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*,)?\s*\w+\s*\)\s*", expr)
    if label_values:  # Grafana's template-variable query, not PromQL
        return {label_values.group(1)} if label_values.group(1) else set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        if match.group() in KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue
        found.add(match.group())
    return found


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and template variable query."""
    found = []
    for panel in dashboard["panels"]:
        found += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
        for inner in panel.get("panels", []):  # a collapsed row holds its panels
            found += [(inner["title"], target["expr"]) for target in inner.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable["query"]
        found.append((f"${variable['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def test_promql_names_are_found() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model", x="y z"}[$__rate_interval])))'
        " / on (model) group_left sum(b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names('label_values(c{model=~"$model"}, version)') == {"c"}
    assert metric_names("label_values(model)") == set()


def test_every_panel_queries_metrics_the_server_exports(server_factory, tiny_repository) -> None:
    server = server_factory(tiny_repository, metrics_port=0)
    with Client(server.address, timeout=10) as client:
        session = client.session("gru")
        for _ in range(3):
            session.step(np.ones(TINY_INPUT, np.float32))
        with pytest.raises(RnnServeError):
            session.step(np.ones(TINY_INPUT + 1, np.float32))  # refused: a rejected-calls sample
        url = f"http://127.0.0.1:{server.server.metrics.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            exported = exported_names(response.read().decode())
    assert {"rnnserve_steps_total", "rnnserve_step_latency_seconds_bucket", "rnnserve_store_errors_total"} <= exported

    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p.get("targets") for p in panels), "a panel without a query"
    used: set[str] = set()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: {expr!r} names no metric"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported by the server ({expr!r})"
        used |= names
    # What an operator looks for first (the list) is on the dashboard.
    wanted = {
        "rnnserve_steps_total",
        "rnnserve_batch_size_bucket",
        "rnnserve_queue_delay_seconds_bucket",
        "rnnserve_step_latency_seconds_bucket",
        "rnnserve_open_sessions",
        "rnnserve_session_evictions_total",
        "rnnserve_store_errors_total",
        "rnnserve_requests_rejected_total",
    }
    assert wanted <= used, sorted(wanted - used)
    # Percentiles come from the histograms' buckets.
    assert any("histogram_quantile(0.99" in expr and "_bucket" in expr for _, expr in queries)
