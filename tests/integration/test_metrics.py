"""Prometheus metrics on their own port: the families and labels exist and agree with GetStats."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import TINY_INPUT

from rnnserve.client import Client, RnnServeError

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

X = np.ones(TINY_INPUT, np.float32)


def L(**labels: str) -> tuple:
    return tuple(sorted(labels.items()))


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items -> value}, samples of every family."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_match_get_stats(server_factory, tiny_repository):
    # (A large inline budget: a slow moment of a busy host must not make the tiny model look slow.)
    server = server_factory(tiny_repository, metrics_port=0, session_ttl=0.3, inline_budget_us=1_000_000)
    port = server.server.metrics.port
    assert port and port != server.port
    with Client(server.address, timeout=10) as client:
        sessions = [client.session("gru") for _ in range(3)]
        for s in sessions:
            for _ in range(4):
                s.step(X)
        list(sessions[0].stream(np.ones((5, TINY_INPUT), np.float32)))
        with pytest.raises(RnnServeError):
            sessions[1].step(np.ones(TINY_INPUT + 1, np.float32))  # refused: INVALID_ARGUMENT
        stats = {(m.name, m.version): m for m in client.stats().models}
        gru = L(model="gru", version="1")
        m = scrape(port)
        assert m["rnnserve_steps_total"][gru] == stats[("gru", 1)].steps == 17
        assert m["rnnserve_batches_total"][gru] == stats[("gru", 1)].batches
        # Lone sessions' steps: after the first batch (measured on a worker thread), small ones run inline.
        assert 0 < m["rnnserve_inline_batches_total"][gru] == stats[("gru", 1)].inline_batches
        assert m["rnnserve_batch_size_count"][gru] == stats[("gru", 1)].batches
        assert m["rnnserve_batch_size_sum"][gru] == 17
        assert m["rnnserve_batch_size_bucket"][L(model="gru", version="1", le="+Inf")] == stats[("gru", 1)].batches
        assert m["rnnserve_queue_delay_seconds_count"][gru] == 17  # per step
        assert m["rnnserve_step_latency_seconds_count"][gru] == 17
        latency_buckets = [v for k, v in m["rnnserve_step_latency_seconds_bucket"].items() if dict(k)["model"] == "gru"]
        assert latency_buckets == sorted(latency_buckets) and latency_buckets[-1] == 17  # cumulative
        assert m["rnnserve_step_latency_seconds_sum"][gru] >= m["rnnserve_queue_delay_seconds_sum"][gru] > 0
        assert m["rnnserve_compute_seconds_total"][gru] > 0
        assert m["rnnserve_open_sessions"][gru] == 3 == stats[("gru", 1)].open_sessions
        assert m["rnnserve_open_sessions"][L(model="gru_ts", version="1")] == 0
        assert m["rnnserve_sessions"][()] == 3
        assert m["rnnserve_queued_steps"][gru] == 0
        assert m["rnnserve_requests_rejected_total"][L(code="INVALID_ARGUMENT", method="Step")] == 1
        assert "process_resident_memory_bytes" in m
        # Sessions left idle expire: an eviction each, per model and reason.
        deadline = time.monotonic() + 10
        while client.stats().open_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        m = scrape(port)
        assert m["rnnserve_session_evictions_total"][L(model="gru", version="1", reason="expired")] == 3
        assert m["rnnserve_open_sessions"][gru] == 0


def test_store_errors_and_forced_evictions(server_factory, tiny_repository):
    server = server_factory(tiny_repository, metrics_port=0)
    errors = server.server.persistence.errors
    before = errors[("gru", 1, "save")]
    server.server.persistence.store_error("gru", 1, "save")
    with Client(server.address, timeout=30) as client:
        client.session("gru_ts")
        client.unload_model("gru_ts", force=True)
    m = scrape(server.server.metrics.port)
    labels = (("model", "gru"), ("operation", "save"), ("version", "1"))
    assert m["rnnserve_store_errors_total"][labels] == before + 1
    forced = (("model", "gru_ts"), ("reason", "forced"), ("version", "1"))
    assert m["rnnserve_session_evictions_total"][forced] == 1


def test_unauthenticated_calls_are_counted(server_factory, tiny_repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("a-long-enough-token-0001 alice\n")
    server = server_factory(tiny_repository, metrics_port=0, auth_tokens=tokens)
    with Client(server.address, timeout=10) as client, pytest.raises(RnnServeError) as info:
        client.list_models()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    m = scrape(server.server.metrics.port)
    assert m["rnnserve_requests_rejected_total"][(("code", "UNAUTHENTICATED"), ("method", "ListModels"))] == 1


def test_no_metrics_port_by_default(server_factory, tiny_repository):
    assert server_factory(tiny_repository).server.metrics is None
