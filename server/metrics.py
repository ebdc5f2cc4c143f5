"""Prometheus metrics, one registry per app (no import-time global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def set_queue_state(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
