"""Per-variant metrics: Prometheus series for scraping, and a recent-events window for JSON snapshots.

The snapshot (``GET /admin/metrics?since=TS``) is what a rollout sensor reads to judge a canary step: requests,
errors, error rate and p50/p95 latency of each variant since a timestamp. The server's own CPU time is sampled as
requests arrive (at most once a second), so a monitor can turn a window's CPU seconds into an energy estimate.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MAX_EVENTS = 200_000
_CPU_SAMPLE_EVERY_S = 1.0
_MAX_CPU_SAMPLES = 20_000


@dataclass(frozen=True)
class _Event:
    at: float
    latency_ms: float
    error: bool
    tokens_in: int
    tokens_out: int


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in [0, 100]) of already sorted values; ``None`` when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


class Telemetry:
    """Prometheus metrics on their own registry (one per app, so several servers can share a process)."""

    def __init__(self, *, retention_s: float = 3600.0) -> None:
        self.registry = CollectorRegistry()
        self.retention_s = retention_s
        labels = ["variant", "endpoint", "shadow"]
        self.requests = Counter("llmops_requests", "Requests routed to a variant", labels, registry=self.registry)
        self.errors = Counter(
            "llmops_request_errors", "Requests a variant failed (HTTP 5xx)", labels, registry=self.registry
        )
        self.latency = Histogram(
            "llmops_request_latency_seconds",
            "Time from routing to the variant's answer",
            ["variant", "shadow"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "llmops_tokens",
            "Tokens in (prompt/input) and out (generated)",
            ["variant", "direction"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "llmops_batch_size",
            "Texts per batch (one model call)",
            ["variant"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.weight = Gauge("llmops_variant_weight", "Traffic share in percent", ["variant"], registry=self.registry)
        self.ready = Gauge(
            "llmops_variant_ready", "1 when the variant's model is loaded", ["variant"], registry=self.registry
        )
        self.shadow_dropped = Counter(
            "llmops_shadow_dropped", "Shadow copies dropped because too many were in flight", registry=self.registry
        )
        self.log_dropped = Counter(
            "llmops_request_log_dropped", "Request-log records dropped (writer queue full)", registry=self.registry
        )
        self._events: dict[str, collections.deque[_Event]] = {}
        # (unix seconds, process CPU seconds): all threads of this process (routing, batching, model calls).
        self._cpu: collections.deque[tuple[float, float]] = collections.deque(
            [(time.time(), time.process_time())], maxlen=_MAX_CPU_SAMPLES
        )
        self._series: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def observe(
        self,
        variant: str,
        endpoint: str,
        *,
        shadow: bool,
        latency_s: float,
        error: bool,
        tokens_in: int = 0,
        tokens_out: int = 0,
    ) -> None:
        flag = "true" if shadow else "false"
        self._series.add((variant, endpoint, flag))
        self.requests.labels(variant, endpoint, flag).inc()
        if error:
            self.errors.labels(variant, endpoint, flag).inc()
        self.latency.labels(variant, flag).observe(latency_s)
        if tokens_in:
            self.tokens.labels(variant, "in").inc(tokens_in)
        if tokens_out:
            self.tokens.labels(variant, "out").inc(tokens_out)
        now = time.time()
        with self._lock:
            events = self._events.setdefault(variant, collections.deque(maxlen=_MAX_EVENTS))
            events.append(_Event(now, latency_s * 1000.0, error, tokens_in, tokens_out))
            while events and events[0].at < now - self.retention_s:
                events.popleft()
            if now - self._cpu[-1][0] >= _CPU_SAMPLE_EVERY_S:
                self._cpu.append((now, time.process_time()))

    def cpu_seconds(self, *, since: float) -> dict[str, float]:
        """CPU seconds this server process used from ``since`` (or its oldest sample after it) to now."""
        now, cpu_now = time.time(), time.process_time()
        with self._lock:
            start = self._cpu[0]
            for sample in self._cpu:
                if sample[0] > since:
                    break
                start = sample
        return {
            "cpu_seconds": round(max(0.0, cpu_now - start[1]), 4),
            "cpu_window_seconds": round(max(0.0, now - start[0]), 3),
            "cpu_seconds_total": round(cpu_now, 4),
        }

    def forget(self, variant: str) -> None:
        """Drop a removed variant's series, so a new variant of the same name starts from zero."""
        with self._lock:
            self._events.pop(variant, None)
            series = {k for k in self._series if k[0] == variant}
            self._series -= series
        removals: list[tuple[Any, tuple[str, ...]]] = []
        for _, endpoint, flag in series:
            removals += [(self.requests, (variant, endpoint, flag)), (self.errors, (variant, endpoint, flag))]
            removals.append((self.latency, (variant, flag)))
        removals += [(self.tokens, (variant, "in")), (self.tokens, (variant, "out"))]
        removals += [(m, (variant,)) for m in (self.batch_size, self.weight, self.ready)]
        for metric, labels in removals:
            with contextlib.suppress(KeyError):  # that series was never written
                metric.remove(*labels)

    def snapshot(self, variant: str, *, since: float) -> dict[str, Any]:
        """Numbers of one variant's requests that finished at or after ``since`` (unix seconds)."""
        with self._lock:
            events = [e for e in self._events.get(variant, ()) if e.at >= since]
        latencies = sorted(e.latency_ms for e in events)
        errors = sum(e.error for e in events)
        p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
        return {
            "variant": variant,
            "requests": len(events),
            "errors": errors,
            "error_rate": errors / len(events) if events else 0.0,
            "p50_latency_ms": None if p50 is None else round(p50, 3),
            "p95_latency_ms": None if p95 is None else round(p95, 3),
            "window_seconds": round(max(0.0, time.time() - since), 3),
            "tokens_in": sum(e.tokens_in for e in events),
            "tokens_out": sum(e.tokens_out for e in events),
        }
