"""Prometheus metrics for `GET /metrics`, kept in a registry of the app's own (so several apps in
one process, as in the tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, backends: dict):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slmkit_requests", "HTTP requests", ["path", "status"], registry=r)
        self.request_seconds = Histogram("slmkit_request_seconds", "HTTP request handling time (streams: until "
                                         "headers)", ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("slmkit_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("slmkit_completion_tokens", "tokens generated", ["model"], registry=r)
        self.generation_seconds = Histogram("slmkit_generation_seconds", "time to a complete answer", ["model"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("slmkit_time_to_first_token_seconds", "time to the first streamed "
                                             "token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.escalations = Counter("slmkit_router_decisions", "router decisions", ["decision", "reason"], registry=r)
        queue = Gauge("slmkit_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        active = Gauge("slmkit_active_sequences", "sequences in the decode batch", ["model"], registry=r)
        for name, backend in backends.items():
            scheduler = getattr(backend, "scheduler", None)
            if scheduler is not None:
                queue.labels(name).set_function(lambda s=scheduler: s.queue_depth)
                active.labels(name).set_function(lambda s=scheduler: s.active)

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path.startswith("/v1/") or path in ("/", "/health", "/metrics") else "other"
        self.requests.labels(path, str(status)).inc()
        self.request_seconds.labels(path).observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.completion_tokens.labels(model).inc(completion)

    def latency(self, model: str, seconds: float) -> None:
        self.generation_seconds.labels(model).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self.first_token_seconds.labels(model).observe(seconds)

    def decision(self, decision: str, reason: str) -> None:
        self.escalations.labels(decision, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
