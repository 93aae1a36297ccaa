"""Prometheus metrics of one server, in its own registry (so that two apps in a process never share one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds; a CPU serves first tokens in tens of milliseconds to seconds, next tokens in milliseconds
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(
        self, engine_stats: Callable[[], dict[str, int]], prefix_cache: Callable[[], dict] | None = None
    ) -> None:
        """`prefix_cache`: the engine's prefix cache's `stats` (None: no cache, no series)."""
        self.registry = CollectorRegistry()
        r = self.registry
        if prefix_cache is not None:
            r.register(_PrefixCacheCollector(prefix_cache))
        self.requests = Counter(
            "deepseek_lm_requests", "HTTP API requests by endpoint and status code", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("deepseek_lm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("deepseek_lm_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "deepseek_lm_request_finish", "generations by finish reason", ["reason"], registry=r
        )
        self.draft_tokens = Counter(
            "deepseek_lm_draft_tokens", "draft tokens verified (speculative decoding)", registry=r
        )
        self.accepted_draft_tokens = Counter(
            "deepseek_lm_accepted_draft_tokens", "draft tokens accepted (speculative decoding)", registry=r
        )
        self.ttft = Histogram(
            "deepseek_lm_time_to_first_token_seconds", "arrival to first generated token",
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_latency = Histogram(
            "deepseek_lm_time_per_output_token_seconds", "time between a request's generated tokens",
            buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        queue = Gauge("deepseek_lm_queue_depth", "requests waiting for a slot", registry=r)
        queue.set_function(lambda: engine_stats()["waiting"])
        running = Gauge("deepseek_lm_running_batch_size", "requests decoding in the batch", registry=r)
        running.set_function(lambda: engine_stats()["running"])
        prefilling = Gauge("deepseek_lm_prefilling_requests", "requests being prefilled", registry=r)
        prefilling.set_function(lambda: engine_stats()["prefilling"])


class _PrefixCacheCollector:
    """The prefix cache's counters, read from the engine when /metrics is scraped."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, key, doc in (
            ("queries", "queries", "prompts looked up in the prefix cache"),
            ("hits", "hits", "prompts that reused cached chunks"),
            ("query_tokens", "query_tokens", "prompt tokens looked up in the prefix cache"),
            ("hit_tokens", "hit_tokens", "prompt tokens whose latents came from the prefix cache"),
            ("ahead_tokens", "ahead_tokens", "tokens of ended chat turns prefilled for the next turn"),
        ):
            yield CounterMetricFamily(f"deepseek_lm_prefix_cache_{name}", doc, value=s[key])
        yield GaugeMetricFamily(
            "deepseek_lm_prefix_cache_bytes", "bytes the prefix cache holds", value=s["bytes"]
        )
        yield GaugeMetricFamily(
            "deepseek_lm_prefix_cache_blocks", "chunks the prefix cache holds", value=s["blocks"]
        )
