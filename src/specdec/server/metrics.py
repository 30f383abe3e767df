"""The server's Prometheus metrics (`/metrics`, the text format, written by `prometheus_client`).

One registry per worker, so two servers in one process (the tests) count apart. What is counted, and where
it comes from: every finished, cancelled or failed request (`requests`); each completed request's prompt,
cached-prompt and generated tokens, target forwards, accepted drafted tokens and grammar-forced tokens per
method, and its tau (tokens per forward) as a histogram; time to first token (from submission to the first
emitted token), time per output token (the rest of the generation over the tokens after the first) and time
in the queue; the size of every batched step; and, read when scraped, the generations running and queued.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TAU_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class Metrics:
    def __init__(self, running: Callable[[], int], queued: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specdec_requests", "Requests ended, by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter(
            "specdec_prompt_tokens", "Prompt tokens of completed requests", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "specdec_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.generation_tokens = Counter("specdec_generation_tokens", "Tokens generated", registry=r)
        self.forwards = Counter(
            "specdec_target_forwards", "Target forwards (tree verifications)", ["method"], registry=r
        )
        self.accepted = Counter(
            "specdec_accepted_draft_tokens", "Drafted tokens the target accepted", ["method"], registry=r
        )
        self.forced = Counter(
            "specdec_forced_tokens",
            "Accepted tokens a grammar drafted (structured output)",
            ["method"],
            registry=r,
        )
        self.tau = Histogram(
            "specdec_tau",
            "Tokens per target forward, per request",
            ["method"],
            buckets=TAU_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "specdec_time_to_first_token_seconds",
            "Submission to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "specdec_time_per_output_token_seconds",
            "Seconds per token after the first",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "specdec_queue_seconds", "Time waiting to start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch = Histogram(
            "specdec_batch_size", "Rows of each batched step", buckets=BATCH_BUCKETS, registry=r
        )
        Gauge("specdec_running", "Generations running", registry=r).set_function(running)
        Gauge("specdec_queued", "Requests waiting to start", registry=r).set_function(queued)
        self.caches: list = []  # the prefix caches of the served models (`watch`)
        Gauge("specdec_prefix_cache_bytes", "Prefix cache size", registry=r).set_function(
            lambda: sum(c.bytes for c in self.caches)
        )
        Gauge("specdec_prefix_cache_hit_ratio", "Looked-up prompt tokens found", registry=r).set_function(
            lambda: sum(c.hit for c in self.caches) / max(1, sum(c.looked_up for c in self.caches))
        )

    def watch(self, caches: list) -> None:
        """Report these prefix caches (`specdec.runtime.prefix.PrefixCache`) in the gauges."""
        self.caches = list(caches)

    def completed(
        self,
        method: str,
        stats,
        prompt_tokens: int,
        cached: int,
        first_token_seconds: float | None,
        elapsed: float,
    ) -> None:
        """A request finished: `elapsed` since its first token."""
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached)
        self.generation_tokens.inc(stats.new_tokens)
        self.forwards.labels(method).inc(stats.target_forwards)
        self.accepted.labels(method).inc(max(0, stats.new_tokens - stats.target_forwards))
        self.forced.labels(method).inc(stats.forced_tokens)
        if stats.target_forwards:
            self.tau.labels(method).observe(stats.mean_accepted_tokens)
        if stats.new_tokens > 1 and first_token_seconds is not None:
            self.tpot.observe(elapsed / (stats.new_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
