"""Prometheus metrics (DESIGN §6), fed from the engine's EngineStats. The only prometheus_client import."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

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


class Metrics:
    """One registry per app, so several apps in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.running = Gauge("fenwick_num_requests_running", "Requests holding a state slot", registry=r)
        self.waiting = Gauge("fenwick_num_requests_waiting", "Requests queued for a state slot", registry=r)
        self.slots_used = Gauge("fenwick_state_slots_used", "State slots in use", registry=r)
        self.slots_total = Gauge("fenwick_state_slots_total", "State slots allocated", registry=r)
        self.state_memory = Gauge("fenwick_state_memory_bytes", "Bytes of the state pool", registry=r)
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
            "fenwick_prefix_cache_bytes", "Bytes of prefix-cache snapshots held", ["tier"], registry=r
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
        self.engine_up = Gauge(
            "fenwick_engine_up", "1 while the engine's step loop runs, 0 once it has stopped", registry=r
        )
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(finish_reason=reason)

    def watch_engine(self, is_running: Callable[[], bool]) -> None:
        """fenwick_engine_up reads is_running() at each scrape."""
        self.engine_up.set_function(lambda: 1.0 if is_running() else 0.0)

    def observe(self, stats: EngineStats) -> None:
        """An engine stats listener: called after every step, from the engine's loop."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.slots_used.set(stats.slots_used)
        self.slots_total.set(stats.slots_total)
        self.state_memory.set(stats.state_memory_bytes)
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        if stats.iteration_tokens:
            self.iteration_tokens.observe(stats.iteration_tokens)
        for t in stats.time_to_first_tokens:
            self.ttft.observe(t)
        for t in stats.inter_token_latencies:
            self.itl.observe(t)
        cache = stats.prefix_cache
        if cache is not None:
            self.prefix_cache_queries.inc(cache.queries)
            self.prefix_cache_hits.inc(cache.hits)
            self.prefix_cache_bytes.labels(tier="device").set(cache.device_bytes)
            self.prefix_cache_bytes.labels(tier="host").set(cache.host_bytes)
        for done in stats.finished:
            self.request_success.labels(finish_reason=done.finish_reason).inc()
            self.e2e.observe(done.e2e_latency)
            self.queue_time.observe(done.queue_time)

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
