"""Prometheus metrics of one engine, shared by every front end (gRPC, HTTP).

AsyncLLM records them as requests are added, produce tokens and finish, and refreshes the
gauges after every engine step. Each engine has its own CollectorRegistry, so several
engines in one process (tests) do not collide; the HTTP front end serves it at /metrics.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels
        self.requests = Counter("jaxserve_requests", "Requests by final status", ["model_name", "status"],
                                registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of accepted requests",
                                     ["model_name"], registry=r).labels(**labels)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Generated tokens", ["model_name"],
                                         registry=r).labels(**labels)
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds", "Time between output tokens",
                              ["model_name"], buckets=TOKEN_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("jaxserve_e2e_request_latency_seconds", "End-to-end request latency",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)

        def gauge(name: str, doc: str):
            return Gauge(name, doc, ["model_name"], registry=r).labels(**labels)

        self.running = gauge("jaxserve_num_requests_running", "Sequences running")
        self.waiting = gauge("jaxserve_num_requests_waiting", "Sequences waiting")
        self.kv_pages_used = gauge("jaxserve_kv_cache_pages_used", "KV pages in use")
        self.kv_pages_total = gauge("jaxserve_kv_cache_pages_total", "KV pages in the pool")
        self.compile_count = gauge("jaxserve_compile_count", "XLA compilations of the engine step")

        def counter(name: str, doc: str):
            return Counter(name, doc, ["model_name"], registry=r).labels(**labels)

        # Engine totals, exported as counters (rate() works); refresh() adds what is new.
        self.preemptions = counter("jaxserve_preemptions", "Requests preempted (pages freed, recomputed later)")
        self.prefix_hits = counter("jaxserve_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache")
        self.prefix_queries = counter("jaxserve_prefix_cache_query_tokens",
                                      "Prompt tokens looked up in the prefix cache")
        # Speculative decoding (vLLM's spec_decode counters; acceptance rate = rate(accepted) /
        # rate(draft_tokens), mean acceptance length = 1 + rate(accepted) / rate(drafts)); they stay 0 when it is off.
        self.spec_drafts = counter("jaxserve_spec_decode_num_drafts", "Verification steps of speculating sequences")
        self.spec_draft_tokens = counter("jaxserve_spec_decode_num_draft_tokens", "Proposed tokens verified")
        self.spec_accepted = counter("jaxserve_spec_decode_num_accepted_tokens", "Proposed tokens accepted")
        self._counters = (("num_preemptions", self.preemptions), ("prefix_cache_hit_tokens", self.prefix_hits),
                          ("prefix_cache_query_tokens", self.prefix_queries), ("spec_num_drafts", self.spec_drafts),
                          ("spec_num_draft_tokens", self.spec_draft_tokens),
                          ("spec_num_accepted_tokens", self.spec_accepted))
        self._totals = {key: 0 for key, _ in self._counters}
        # Requests a front end refused (HTTP 4xx / 503, gRPC INVALID_ARGUMENT, UNAUTHENTICATED,
        # RESOURCE_EXHAUSTED, UNAVAILABLE), before or by the engine: _total{reason=...}
        self.model_name = model_name
        self.rejected = Counter("jaxserve_requests_rejected", "Requests refused by a front end, by reason",
                                ["model_name", "reason"], registry=r)

    def rebase(self, stats: dict) -> None:
        """From now on the engine totals count from `stats` (what the warm-up did is not counted)."""
        for key in self._totals:
            self._totals[key] = stats.get(key, 0)

    def request_finished(self, status: str, arrival: float) -> None:
        self.requests.labels(status=status, **self._labels).inc()
        self.e2e.observe(time.monotonic() - arrival)

    def refresh(self, stats: dict) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_pages_used.set(stats["num_total_pages"] - stats["num_free_pages"])
        self.kv_pages_total.set(stats["num_total_pages"])
        self.compile_count.set(stats["compile_count"])
        for key, counter in self._counters:
            new = stats.get(key, 0) - self._totals[key]
            if new > 0:
                counter.inc(new)
                self._totals[key] = stats[key]

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
