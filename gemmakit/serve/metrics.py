"""Prometheus metrics (`GET /metrics`), one registry per app so that several servers in a process stay apart.

Counted here: requests by endpoint and status, prompt / completion / cached tokens, time to first token and
inter-token latency histograms; read from the scheduler at scrape time: busy slots, queue length, prefix-cache hits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)


class _SchedulerCollector:
    """Gauges read from `scheduler.stats()` when Prometheus scrapes, so they are never stale."""

    def __init__(self, stats: Callable[[], dict[str, int] | None]) -> None:
        self._stats = stats

    def collect(self):
        stats = self._stats() or {}
        busy = GaugeMetricFamily("gemmakit_busy_slots", "Slots decoding a request right now")
        busy.add_metric([], stats.get("busy_slots", 0))
        queue = GaugeMetricFamily("gemmakit_queue_length", "Requests waiting for a slot")
        queue.add_metric([], stats.get("queue_length", 0))
        hits = CounterMetricFamily("gemmakit_prefix_cache_hits", "Requests whose prompt prefix came from the cache")
        hits.add_metric([], stats.get("prefix_hits", 0))
        cached = CounterMetricFamily("gemmakit_prefix_cached_tokens", "Prompt tokens reused from the prefix cache")
        cached.add_metric([], stats.get("prefix_cached_tokens", 0))
        yield from (busy, queue, hits, cached)


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, int] | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gemmakit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("gemmakit_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.completion_tokens = Counter("gemmakit_completion_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("gemmakit_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.ttft = Histogram("gemmakit_time_to_first_token_seconds", "From submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gemmakit_inter_token_latency_seconds", "Between consecutive tokens of one request",
                             buckets=ITL_BUCKETS, registry=r)
        self.moderated = Counter("gemmakit_moderation_inputs", "Texts scored by /v1/moderations", registry=r)
        self.guard_blocks = Counter("gemmakit_guard_blocks", "Requests the guard blocked, by stage", ["stage"],
                                    registry=r)
        r.register(_SchedulerCollector(stats))

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def usage(self, prompt: int, completion: int, cached: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        self.cached_tokens.inc(cached)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def endpoint_label(path: str, known: Any) -> str:
    """The route's path for a label (unknown paths share one label, so a scanner cannot grow the series)."""
    return path if path in known else "other"
