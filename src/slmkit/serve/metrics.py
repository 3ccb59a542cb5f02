"""Prometheus metrics for `GET /metrics`, kept in a registry of the app's own (so several apps in
one process, as in the tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        r.register(DecodeSavings({name: b.scheduler for name, b in backends.items() if getattr(b, "scheduler", None)}))

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


class DecodeSavings:
    """The prefix cache's and speculative decoding's counters, read from each model's scheduler when
    /metrics is scraped (they are plain integers the scheduler thread increments)."""

    def __init__(self, schedulers: dict):
        self.schedulers = schedulers

    def collect(self):
        counters = {
            "prefix_cache_lookups": "prompts looked up in the prefix cache",
            "prefix_cache_hits": "prompts that reused a cached prefix",
            "prefix_cache_reused_tokens": "prompt tokens whose KV came from the prefix cache instead of a forward pass",
            "prefix_cache_evictions": "cached prefixes evicted (least recently used) to stay within the budget",
            "speculative_drafted_tokens": "prompt-lookup guesses verified",
            "speculative_accepted_tokens": "prompt-lookup guesses kept"}
        families = {key: CounterMetricFamily(f"slmkit_{key}", text, labels=["model"]) for key, text in counters.items()}
        size = GaugeMetricFamily("slmkit_prefix_cache_bytes", "memory held by cached prefixes", labels=["model"])
        for name, scheduler in self.schedulers.items():
            cache = scheduler.prefix
            values = {"speculative_drafted_tokens": scheduler.drafted,
                      "speculative_accepted_tokens": scheduler.accepted}
            if cache is not None:
                values.update(prefix_cache_lookups=cache.lookups, prefix_cache_hits=cache.hits,
                              prefix_cache_reused_tokens=cache.reused_tokens, prefix_cache_evictions=cache.evictions)
                size.add_metric([name], cache.bytes)
            for key, value in values.items():
                families[key].add_metric([name], value)
        yield from families.values()
        yield size
