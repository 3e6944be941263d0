"""Prometheus metrics on their own HTTP port (``--metrics-port``): read at scrape time, not on the hot path.

The data plane already counts what the metrics report: each batcher's BatchStats (updated once per batch),
the sessions' eviction counter, the servicer's rejection counter. A scrape reads those counters and builds
the families then, so serving costs nothing extra per step; the queue-delay and latency histograms are
bucketed once per batch (each batch adds its size to the bucket of its mean). The collector runs on the
HTTP server's thread and only copies plain ints and dicts (each copy is atomic under the GIL).

Store errors are counted by the persistence (server/durability/persistence.py ``Persistence.errors``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from rnnserve.server.scheduling.stats import BATCH_SIZE_BOUNDS, LATENCY_BOUNDS_NS

if TYPE_CHECKING:
    from rnnserve.server.core.sessions import SessionManager
    from rnnserve.server.models.repository import ModelRepository

log = logging.getLogger(__name__)


def _buckets(bounds: list[str], counts: Iterable[int]) -> list[tuple[str, int]]:
    """A histogram's (upper bound, cumulative count) pairs from its per-bucket counts."""
    total, out = 0, []
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out.append((bound, total))
    return out


# The help of the two per-step histograms.
_PER_STEP = "Per step: from its session being ready in the batcher to {} (batch mean)"

# The families reported per model version (labels: model, version), in the order they are exposed:
# key -> (kind, name, help).
_PER_MODEL: dict[str, tuple[str, str, str]] = {
    "steps": ("counter", "rnnserve_steps", "Timesteps computed"),
    "batches": ("counter", "rnnserve_batches", "Model calls (batches) that succeeded"),
    "inline": (
        "counter",
        "rnnserve_inline_batches",
        "Of the batches, those run on the event loop (small batches of a quick model: no thread hop)",
    ),
    "compute": ("counter", "rnnserve_compute_seconds", "Seconds spent in model calls"),
    "batch_size": ("histogram", "rnnserve_batch_size", "Sessions per model call"),
    "queue": ("histogram", "rnnserve_queue_delay_seconds", _PER_STEP.format("its batch starting")),
    "latency": ("histogram", "rnnserve_step_latency_seconds", _PER_STEP.format("its result")),
    "open_sessions": ("gauge", "rnnserve_open_sessions", "Open sessions"),
    "queued": ("gauge", "rnnserve_queued_steps", "Steps queued or computing"),
}


class RnnServeCollector:
    """A prometheus_client collector over one server's models, sessions and counters."""

    def __init__(
        self,
        repository: ModelRepository,
        sessions: SessionManager,
        store_errors: Counter[tuple[str, int, str]],
        rejected: Counter[tuple[str, str]],
    ):
        self.repository = repository
        self.sessions = sessions
        self.store_errors = store_errors
        self.rejected = rejected

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families are built at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        mv = ["model", "version"]
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        f = {key: kinds[kind](name, text, labels=mv) for key, (kind, name, text) in _PER_MODEL.items()}
        size_bounds = [str(b) for b in BATCH_SIZE_BOUNDS] + ["+Inf"]
        time_bounds = [repr(b / 1e9) for b in LATENCY_BOUNDS_NS] + ["+Inf"]
        for model in list(self.repository.models.values()):
            labels = [model.name, str(model.version)]
            f["open_sessions"].add_metric(labels, model.open_sessions)
            batcher = model.batcher
            if batcher is None:
                continue
            s = batcher.stats
            f["queued"].add_metric(labels, batcher.queued_steps)
            f["steps"].add_metric(labels, s.steps)
            f["batches"].add_metric(labels, s.batches)
            f["inline"].add_metric(labels, s.inline)
            f["compute"].add_metric(labels, s.compute_ns / 1e9)
            f["batch_size"].add_metric(labels, _buckets(size_bounds, s.histogram), s.steps)
            f["queue"].add_metric(labels, _buckets(time_bounds, s.queue_buckets), s.queue_ns / 1e9)
            f["latency"].add_metric(labels, _buckets(time_bounds, s.latency_buckets), s.latency_ns / 1e9)
        yield from f.values()

        evictions = CounterMetricFamily(
            "rnnserve_session_evictions",
            "Sessions the server closed itself: reason expired (idle TTL) or forced (forced unload)",
            labels=[*mv, "reason"],
        )
        for (name, version, reason), count in sorted(dict(self.sessions.evictions).items()):
            evictions.add_metric([name, str(version), reason], count)
        yield evictions
        store = CounterMetricFamily(
            "rnnserve_store_errors", "Failed session-store operations", labels=[*mv, "operation"]
        )
        for (name, version, op), count in sorted(dict(self.store_errors).items()):
            store.add_metric([name, str(version), op], count)
        yield store
        rejected = CounterMetricFamily(
            "rnnserve_requests_rejected",
            "Calls and streamed steps refused, by method and status",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(dict(self.rejected).items()):
            rejected.add_metric([method, code], count)
        yield rejected
        sessions = GaugeMetricFamily("rnnserve_sessions", "Open sessions across all models")
        sessions.add_metric([], len(self.sessions))
        yield sessions


class MetricsServer:
    """/metrics over HTTP on its own port and thread, from ``start()`` to ``stop()``."""

    def __init__(self, collector: RnnServeCollector, host: str, port: int):
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)  # RSS, CPU seconds, open fds of the server process
        self.host = host
        self.port = port  # 0 picks a free port; the bound one once started
        self._httpd: Any = None
        self._thread: Any = None

    def start(self) -> None:
        from prometheus_client import start_http_server

        self._httpd, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._httpd = None
