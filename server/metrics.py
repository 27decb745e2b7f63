"""Prometheus metrics for the service.

Each server gets its own :class:`prometheus_client.CollectorRegistry`, so several servers can
live in one process (the tests do this) without "duplicated timeseries" errors. Exposed with
``gramstyle serve --metrics-port PORT`` at ``http://HOST:PORT/metrics``:

- ``gramstyle_requests_total{rpc,code}``: finished RPCs by method and status code name;
- ``gramstyle_request_duration_seconds{rpc}``: RPC wall time histogram;
- ``gramstyle_queue_depth``: compute jobs admitted and waiting for a worker;
- ``gramstyle_busy_workers``: compute jobs running;
- ``gramstyle_iterations_total``: optimisation iterations run.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Style transfer takes from ~10 ms (GetServerInfo) to many minutes (a 2048 px Stylize).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
            1800)


class Metrics:
    """The service's metrics, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gramstyle_requests", "Finished RPCs by method and status code.",
                                ["rpc", "code"], registry=self.registry)
        self.duration = Histogram("gramstyle_request_duration_seconds", "RPC wall time.",
                                  ["rpc"], buckets=_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("gramstyle_queue_depth",
                                 "Compute jobs admitted and waiting for a worker.",
                                 registry=self.registry)
        self.busy_workers = Gauge("gramstyle_busy_workers", "Compute jobs running.",
                                  registry=self.registry)
        self.iterations = Counter("gramstyle_iterations", "Optimisation iterations run.",
                                  registry=self.registry)

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        """Record one finished RPC (``code`` is the status code name, e.g. 'OK')."""
        self.requests.labels(rpc=rpc, code=code).inc()
        self.duration.labels(rpc=rpc).observe(seconds)

    def set_load(self, busy: int, queued: int) -> None:
        """Update the worker/queue gauges (the WorkQueue's ``on_change`` hook)."""
        self.busy_workers.set(busy)
        self.queue_depth.set(queued)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``port`` (0: a free one) in a daemon thread; return the port."""
        httpd, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return httpd.server_port
