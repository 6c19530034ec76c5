"""Prometheus metrics of one server: requests, tokens, latencies, queue depth, active sequences.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never collide.
Queue depth and active sequences are read from the scheduler at scrape time. The `endpoint`
label takes only the server's known paths (anything else is "other"), so label cardinality stays
bounded whatever clients send.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

KNOWN_ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in KNOWN_ENDPOINTS else "other"


class Metrics:
    def __init__(self, scheduler_stats: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nanochat_prompt_tokens", "prompt tokens submitted to the engine", registry=r)
        self.completion_tokens = Counter("nanochat_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("nanochat_cancelled_sequences", "sequences stopped because the client went away", registry=r)
        self.request_seconds = Histogram("nanochat_request_duration_seconds", "time from request to last token",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft_seconds = Histogram("nanochat_time_to_first_token_seconds", "time from request to first generated token",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("nanochat_queue_depth", "requests waiting for a batch slot", registry=r)
        self.queue_depth.set_function(lambda: scheduler_stats().get("queue_depth", 0))
        self.active = Gauge("nanochat_active_sequences", "sequences being decoded now", registry=r)
        self.active.set_function(lambda: scheduler_stats().get("active", 0))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
