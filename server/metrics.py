"""Prometheus metrics (DESIGN §6), fed from the engine's EngineStats. The only prometheus_client import.

With several API server processes (server/launcher.py) the metrics live in prometheus_client's
multiprocess mode: every process writes its values to files in one directory (PROMETHEUS_MULTIPROC_DIR,
set by the launcher before they start) and any of them renders the sum, so /metrics is one view whichever
process answers. Each engine stat has one writer: the core sends its EngineStats to one API server only
(engine/core_proc.py), so counters and histograms count once; the gauges keep the most recent write, so a
new writer (after that API server died) takes over. HTTP counts are written by the process that served.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ..engine.stats import EngineStats

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
_REQUEST_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
_COMPILE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """histogram.observe(v) for each value, as one write per bucket touched and one to the sum: a step
    of 256 streams has 256 inter-token latencies, and in multiprocess mode every write goes to a file."""
    if len(values) < 2:
        for v in values:
            histogram.observe(v)
        return
    bounds = histogram._upper_bounds  # prometheus_client's own: the buckets' upper bounds, +Inf last
    counts = collections.Counter(bisect.bisect_left(bounds, v) for v in values)  # the first bound >= v
    histogram._sum.inc(sum(values))
    for i, n in counts.items():
        histogram._buckets[i].inc(n)


class EngineUp:
    """fenwick_engine_up, read at each scrape from this process's view of the engine."""

    def __init__(self) -> None:
        self.is_running: Callable[[], bool] = lambda: False

    def collect(self) -> Iterator[Metric]:
        doc = "1 while the engine's step loop runs, 0 once it has stopped"
        up = GaugeMetricFamily("fenwick_engine_up", doc)
        up.add_metric([], 1.0 if self.is_running() else 0.0)
        yield up


class Metrics:
    """One registry per app, so several apps in one process never collide; multiprocess_dir: the
    directory that API server processes share (see above)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        r = CollectorRegistry()  # where this process's metrics register
        self.registry = r  # what /metrics renders
        if multiprocess_dir is not None:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, path=multiprocess_dir)
        ProcessCollector(registry=self.registry)
        self.engine_up = EngineUp()
        self.registry.register(self.engine_up)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=r, multiprocess_mode="mostrecent")

        self.running = gauge("fenwick_num_requests_running", "Requests holding a state slot")
        self.waiting = gauge("fenwick_num_requests_waiting", "Requests queued for a state slot")
        self.slots_used = gauge("fenwick_state_slots_used", "State slots in use")
        self.slots_total = gauge("fenwick_state_slots_total", "State slots allocated")
        self.state_memory = gauge("fenwick_state_memory_bytes", "Bytes of the state pool")
        self.prompt_tokens = Counter("fenwick_prompt_tokens_total", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("fenwick_generation_tokens_total", "Tokens generated", registry=r)
        self.request_success = Counter(
            "fenwick_request_success_total",
            "Finished requests by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "fenwick_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "fenwick_inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "fenwick_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "fenwick_request_queue_time_seconds",
            "Arrival to first scheduled step",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.iteration_tokens = Histogram(
            "fenwick_iteration_tokens",
            "Tokens the model ran per engine step",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "fenwick_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "fenwick_prefix_cache_hits_total", "Prompt tokens restored from the prefix cache", registry=r
        )
        self.prefix_cache_bytes = Gauge(
            "fenwick_prefix_cache_bytes", "Bytes of prefix-cache snapshots held", ["tier"], registry=r,
            multiprocess_mode="mostrecent",
        )
        self.http_requests = Counter(
            "fenwick_http_requests_total", "HTTP responses by path and status", ["path", "status"], registry=r
        )
        self.grammar_compile = Histogram(
            "fenwick_grammar_compile_seconds",
            "Grammar compiles for structured outputs (cache misses)",
            buckets=_COMPILE_BUCKETS,
            registry=r,
        )
        self.structured_requests = Counter(
            "fenwick_structured_requests_total", "Constrained requests by kind", ["kind"], registry=r
        )
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(finish_reason=reason)
        self._gauges: tuple[int, ...] = ()  # the gauges' values as last set
        self._cache_bytes: tuple[int, int] | None = None  # the prefix cache's bytes as last set

    def watch_engine(self, is_running: Callable[[], bool]) -> None:
        """fenwick_engine_up reads is_running() at each scrape."""
        self.engine_up.is_running = is_running

    def observe(self, stats: EngineStats) -> None:
        """An engine stats listener: called after every step, from the engine's loop."""
        gauges = (stats.num_running, stats.num_waiting, stats.slots_used, stats.slots_total,
                  stats.state_memory_bytes)
        if gauges != self._gauges:  # most steps change none: skip five file writes (multiprocess mode)
            for gauge, value in zip((self.running, self.waiting, self.slots_used, self.slots_total,
                                     self.state_memory), gauges, strict=True):
                gauge.set(value)
            self._gauges = gauges
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        if stats.iteration_tokens:
            self.iteration_tokens.observe(stats.iteration_tokens)
        observe_all(self.ttft, stats.time_to_first_tokens)
        observe_all(self.itl, stats.inter_token_latencies)
        cache = stats.prefix_cache
        if cache is not None:
            if cache.queries:
                self.prefix_cache_queries.inc(cache.queries)
            if cache.hits:
                self.prefix_cache_hits.inc(cache.hits)
            held = (cache.device_bytes, cache.host_bytes)
            if held != self._cache_bytes:
                self.prefix_cache_bytes.labels(tier="device").set(cache.device_bytes)
                self.prefix_cache_bytes.labels(tier="host").set(cache.host_bytes)
                self._cache_bytes = held
        for done in stats.finished:
            self.request_success.labels(finish_reason=done.finish_reason).inc()
        observe_all(self.e2e, [done.e2e_latency for done in stats.finished])
        observe_all(self.queue_time, [done.queue_time for done in stats.finished])

    def observe_structured(self, kind: str, compile_seconds: float | None) -> None:
        """A constrained request was accepted; compile_seconds when its grammar was not cached."""
        self.structured_requests.labels(kind=kind).inc()
        if compile_seconds is not None:
            self.grammar_compile.observe(compile_seconds)

    def count_http(self, path: str, status: int) -> None:
        self.http_requests.labels(path=path, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
