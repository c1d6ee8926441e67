"""The Serve deployment's Prometheus metrics (Ray's exporter, ``ray.serve.metrics``), one object per replica.

``llamaray_requests_total`` {endpoint, status}, ``llamaray_request_latency_s``, ``llamaray_ttft_s``,
``llamaray_tokens_per_s`` {endpoint}, ``llamaray_generated_tokens_total``, ``llamaray_ongoing_requests`` (this
replica's queue depth).
"""

from __future__ import annotations

import time

from actors.engines import Delta


class Tally:
    """Generated tokens and the time of the first one, for a request's metrics and usage."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.t_first: float | None = None

    def add(self, batch: list[tuple[int, Delta]]) -> None:
        for _, d in batch:
            if self.t_first is None and d.token_ids:
                self.t_first = time.perf_counter()
            self.n_tokens += len(d.token_ids)


class ServeMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics as m

        tags = ("endpoint",)
        self.requests = m.Counter("llamaray_requests_total", description="HTTP requests answered",
                                  tag_keys=("endpoint", "status"))
        self.latency = m.Histogram("llamaray_request_latency_s", description="request latency (s)",
                                   boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120], tag_keys=tags)
        self.ttft = m.Histogram("llamaray_ttft_s", description="time to first token (s)",
                                boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=tags)
        self.tps = m.Histogram("llamaray_tokens_per_s", description="decode tokens/s of one completion",
                               boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], tag_keys=tags)
        self.tokens = m.Counter("llamaray_generated_tokens_total", description="generated tokens", tag_keys=tags)
        self.ongoing_gauge = m.Gauge("llamaray_ongoing_requests", description="requests in this replica (queue depth)")
        self.ongoing = 0

    def enter(self) -> None:
        """A request starts generating."""
        self.ongoing += 1
        self.ongoing_gauge.set(self.ongoing)

    def leave(self) -> None:
        self.ongoing -= 1
        self.ongoing_gauge.set(self.ongoing)

    def rejected(self, endpoint: str, status: int) -> None:
        """A request answered with an error before any generation."""
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def finished(self, endpoint: str, status: str, t0: float, tally: Tally) -> None:
        tags = {"endpoint": endpoint}
        now = time.perf_counter()
        self.requests.inc(tags={"endpoint": endpoint, "status": status})
        self.latency.observe(now - t0, tags=tags)
        if tally.t_first is not None:
            self.ttft.observe(tally.t_first - t0, tags=tags)
            if tally.n_tokens > 1 and now > tally.t_first:
                self.tps.observe((tally.n_tokens - 1) / (now - tally.t_first), tags=tags)
        self.tokens.inc(tally.n_tokens, tags=tags)
