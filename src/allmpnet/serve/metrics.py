"""Prometheus metrics for one server, on its own registry (so several apps in one process never collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from allmpnet.serve.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("allmpnet_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("allmpnet_request_seconds", "Time from request to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.texts = Counter("allmpnet_texts_embedded", "Texts embedded", registry=r)
        self.tokens = Counter("allmpnet_tokens", "Word pieces embedded (special tokens included)", registry=r)
        self.truncated = Counter("allmpnet_texts_truncated", "Texts cut at max_seq_length", registry=r)
        self.rejected = Counter("allmpnet_queue_full_rejections", "Requests answered 503 because the queue was full",
                                registry=r)
        self.queue = Gauge("allmpnet_queue_texts", "Texts waiting for a forward pass", registry=r)
        self.inflight = Gauge("allmpnet_inflight_bytes", "Bytes charged to admitted requests (bodies and answers)",
                              registry=r)
        self.batch_rows = Histogram("allmpnet_batch_rows", "Texts per forward pass", buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("allmpnet_batch_requests", "Requests merged into one forward pass",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("allmpnet_batch_padded_tokens", "Padded tokens per forward pass",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("allmpnet_batch_seconds", "Forward pass time", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.padding = Counter("allmpnet_padding_tokens", "Padding tokens computed and thrown away", registry=r)

    def record_batch(self, stats: BatchStats) -> None:
        self.batch_rows.observe(stats.rows)
        self.batch_requests.observe(stats.requests)
        self.batch_tokens.observe(stats.padded_tokens)
        self.batch_seconds.observe(stats.seconds)
        self.padding.inc(stats.padded_tokens - stats.real_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
