"""Prometheus metrics, one registry per app (no import-time global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.prefix_cache import PrefixCache, PrefixCacheStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hybrid_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("hybrid_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "Request arrival to first generated token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("hybrid_inter_token_latency_seconds", "Time between consecutive decode steps",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("hybrid_e2e_request_latency_seconds", "Request arrival to last token",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("hybrid_queue_time_seconds", "Time spent waiting for the worker",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("hybrid_requests_waiting", "Requests queued for the worker", registry=r)
        self.running = Gauge("hybrid_requests_running", "Requests being generated", registry=r)
        self.cancelled = Counter("hybrid_requests_cancelled", "Requests cancelled by client disconnect", registry=r)
        # the hybrid loop, per stage (stage: cot, condense, answer; role: large, small)
        self.loop_requests = Counter("hybrid_loop_requests", "Requests served by the hybrid loop", ["model"],
                                     registry=r)
        self.stage_seconds = Histogram("hybrid_loop_stage_seconds",
                                       "Wall time each hybrid stage of a request spanned (interleaved work included)",
                                       ["model", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_tokens = Counter("hybrid_loop_tokens", "Hybrid-loop tokens by model role and kind "
                                    "(prompt = prefilled, cached = reused KV, completion = generated)",
                                    ["model", "role", "kind"], registry=r)
        self.reasoning_tokens = Counter("hybrid_loop_reasoning_tokens", "Raw chain-of-thought vs condensed tokens",
                                        ["model", "kind"], registry=r)
        self.peak_context = Histogram("hybrid_loop_peak_context_tokens", "Longest large-model context per request",
                                      ["model"], buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r)

        self.profile = Gauge("hybrid_power_profile", "1 for the active power profile", ["profile"], registry=r)
        self.threads = Gauge("hybrid_torch_threads", "torch threads of the generation worker (last job)",
                             registry=r)
        self.compile_seconds = Gauge("hybrid_decode_compile_seconds", "start-up time spent compiling a model's "
                                     "decode step (--compile)", ["model"], registry=r)
        self.power_source = Gauge("hybrid_power_source", "1 for the detected power source", ["source"], registry=r)
        self._prefix = _PrefixCacheCollector()
        r.register(self._prefix)

    def watch_prefix_cache(self, cache: PrefixCache | None) -> None:
        """Report this prefix cache's counters (None: the cache is off, all zeros)."""
        self._prefix.cache = cache

    def set_profile(self, active: str, power) -> None:
        for name in ("plugged", "battery"):
            self.profile.labels(name).set(1 if name == active else 0)
        for src in ("ac", "battery", "unknown"):
            self.power_source.labels(src).set(1 if power is not None and power.source == src else 0)

    def observe_hybrid(self, model: str, st) -> None:
        self.loop_requests.labels(model).inc()
        for stage, s in st.seconds.items():
            self.stage_seconds.labels(model, stage).observe(s)
        for role, ms in (("large", st.large), ("small", st.small)):
            for kind in ("prompt", "cached", "completion"):
                self.stage_tokens.labels(model, role, kind).inc(getattr(ms, f"{kind}_tokens"))
        self.reasoning_tokens.labels(model, "raw").inc(st.raw_reasoning_tokens)
        self.reasoning_tokens.labels(model, "condensed").inc(st.condensed_tokens)
        self.peak_context.labels(model).observe(st.peak_context_tokens)

    def set_queue_state(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)


class _PrefixCacheCollector:
    """The prefix cache's own counts, read at scrape time: the worker thread counts every
    lookup as it happens (cancelled requests included) and nothing is copied twice."""

    def __init__(self):
        self.cache: PrefixCache | None = None

    def collect(self):
        c = self.cache
        s = c.stats if c is not None else PrefixCacheStats()
        for name, doc, value in (
                ("queries", "Prompts looked up in the prefix cache (misses = queries - hits)", s.queries),
                ("hits", "Prompts that reused cached KV for a prefix", s.hits),
                ("query_tokens", "Prompt tokens looked up in the prefix cache", s.query_tokens),
                ("hit_tokens", "Prompt tokens served from the prefix cache instead of prefilled", s.hit_tokens),
                ("evictions", "Prefix-cache entries evicted to stay under the budget", s.evictions)):
            yield CounterMetricFamily(f"hybrid_prefix_cache_{name}", doc, value=value)
        yield GaugeMetricFamily("hybrid_prefix_cache_bytes", "KV bytes the prefix cache holds",
                                value=c.nbytes if c is not None else 0)
        yield GaugeMetricFamily("hybrid_prefix_cache_budget_bytes", "The prefix cache's byte budget (0 = off)",
                                value=c.budget if c is not None else 0)
