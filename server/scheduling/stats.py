"""A model's batching statistics: the native stats (GetStats, /metrics) and Triton's per-request counts.

Updated once per batch, on the event loop, by the batch's completion (server/scheduling/execution.py); every
counter only grows. server/metrics.py buckets with the bounds below, server/transport/kserve/models.py reports
Triton's statistics from the same counters.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# Upper bounds of the batch-size histogram's buckets (sizes 1, 2-3, 4-7, ...; the last one open), and of the
# per-step queue-delay and latency buckets (50 us .. 10 s) that server/metrics.py exports.
BATCH_SIZE_BOUNDS = [2 ** (i + 1) - 1 for i in range(11)]
LATENCY_BOUNDS_NS = [
    int(s * 1e9) for s in (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
]


@dataclass
class BatchStats:
    """One model's batching counters, updated once per batch on the event loop. Every counter only grows.

    Besides the native stats (GetStats, /metrics), these hold Triton's statistics (server/transport/kserve/models.py):
    a step is one request, and its compute time is its batch's, split in three: ``input`` (from the batch being
    taken to the model call: the hop to a worker thread, gathering states and stacking inputs), ``infer`` (the
    model call) and ``output`` (checking and scattering states, the durable write, the hop back)."""

    steps: int = 0  # computed by successful batches
    batches: int = 0
    max_batch: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * 12)
    compute_ns: int = 0  # per batch
    queue_ns: int = 0  # per step
    # Per step, bucketed once per batch at the batch's mean (each batch adds its size to one bucket).
    queue_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))
    latency_ns: int = 0
    inline: int = 0  # of ``batches``: those run on the event loop (server/scheduling/dispatch.py)
    # Triton's per-request counts: steps answered, and their queue and compute time (each its batch's).
    success: int = 0
    success_queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    # Steps the batcher took that did not apply: their batch failed, or the durable store refused them.
    fail: int = 0
    fail_ns: int = 0
    # Exact batch size -> [executions, input ns, infer ns, output ns] (per execution).
    sizes: dict[int, list[int]] = field(default_factory=dict)
    last_ns: int = 0  # perf_counter_ns at the end of the last successful batch; 0: none yet

    def record(
        self, size: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, end_ns: int, refused: int = 0
    ) -> None:
        """A batch of ``size`` steps computed; ``queue_ns``: their waits summed; ``refused``: of them, rows the
        durable store refused (they did not apply)."""
        compute_ns = input_ns + infer_ns + output_ns
        self.steps += size
        self.batches += 1
        self.max_batch = max(self.max_batch, size)
        self.histogram[min(size.bit_length() - 1, len(self.histogram) - 1)] += 1
        self.compute_ns += compute_ns
        self.queue_ns += queue_ns
        mean_queue = queue_ns // size
        self.queue_buckets[bisect.bisect_left(LATENCY_BOUNDS_NS, mean_queue)] += size
        self.latency_buckets[bisect.bisect_left(LATENCY_BOUNDS_NS, mean_queue + compute_ns)] += size
        self.latency_ns += queue_ns + compute_ns * size
        per_size = self.sizes.get(size)
        if per_size is None:
            per_size = self.sizes[size] = [0, 0, 0, 0]
        per_size[0] += 1
        per_size[1] += input_ns
        per_size[2] += infer_ns
        per_size[3] += output_ns
        self.last_ns = end_ns
        ok = size - refused
        if refused:
            ok_queue_ns = queue_ns * ok // size
            self.failed(refused, queue_ns - ok_queue_ns + compute_ns * refused)
            queue_ns = ok_queue_ns
        self.success += ok
        self.success_queue_ns += queue_ns
        self.input_ns += input_ns * ok
        self.infer_ns += infer_ns * ok
        self.output_ns += output_ns * ok

    def failed(self, steps: int, ns: int) -> None:
        """``steps`` taken by the batcher did not apply; ``ns``: their time in the server, summed."""
        self.fail += steps
        self.fail_ns += ns

    def last_inference_ms(self) -> int:
        """When the last successful batch ended, in ms since the epoch (0: none yet)."""
        if not self.last_ns:
            return 0
        return (time.time_ns() - (time.perf_counter_ns() - self.last_ns)) // 1_000_000
