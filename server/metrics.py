"""Prometheus metrics for the service.

Each server gets its own :class:`prometheus_client.CollectorRegistry`, so several servers can
live in one process (the tests do this) without "duplicated timeseries" errors. Exposed with
``gramstyle serve --metrics-port PORT`` at ``http://HOST:PORT/metrics``:

- ``gramstyle_requests_total{rpc,code}``: finished RPCs by method and status code name;
- ``gramstyle_request_duration_seconds{rpc}``: RPC wall time histogram;
- ``gramstyle_queue_depth``: compute jobs admitted and waiting for a worker;
- ``gramstyle_busy_workers``: compute jobs running;
- ``gramstyle_memory_reserved_bytes``: the running jobs' peak-memory estimates, summed;
- ``gramstyle_memory_budget_bytes``: what they may add up to (``--memory-budget``);
- ``gramstyle_message_bytes``: request messages in flight (being received, or held by their
  calls), see server/message_budget.py; ``gramstyle_message_budget_bytes``: their budget;
- ``gramstyle_iterations_total``: optimisation iterations run;
- ``gramstyle_target_cache_hits_total`` / ``gramstyle_target_cache_misses_total``: lookups
  of image targets in the engines' target caches (engine/target_cache.py);
- ``gramstyle_target_cache_bytes``: bytes those caches hold now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
        self.memory_reserved = Gauge("gramstyle_memory_reserved_bytes",
                                     "Peak-memory estimates of the running jobs, summed.",
                                     registry=self.registry)
        self.memory_budget = Gauge("gramstyle_memory_budget_bytes",
                                   "What the running jobs' estimates may add up to.",
                                   registry=self.registry)
        self.message_bytes = Gauge("gramstyle_message_bytes",
                                   "Bytes reserved by request messages in flight.",
                                   registry=self.registry)
        self.message_budget = Gauge("gramstyle_message_budget_bytes",
                                    "What request messages in flight may reserve.",
                                    registry=self.registry)

    def watch_target_caches(self, caches: Iterable) -> None:
        """Export the hit, miss and byte counts of these target caches (each counted once,
        however many engines share it), read at every scrape."""
        unique = list({id(c): c for c in caches}.values())
        self.registry.register(_TargetCacheCollector(lambda: [c.stats() for c in unique]))

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        """Record one finished RPC (``code`` is the status code name, e.g. 'OK')."""
        self.requests.labels(rpc=rpc, code=code).inc()
        self.duration.labels(rpc=rpc).observe(seconds)

    def set_load(self, busy: int, queued: int, reserved: int = 0) -> None:
        """Update the worker/queue/memory gauges (the WorkQueue's ``on_change`` hook)."""
        self.busy_workers.set(busy)
        self.queue_depth.set(queued)
        self.memory_reserved.set(reserved)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr``:``port`` (0: a free port) in a daemon thread; return
        the port. ``addr`` may be an IPv6 address, with or without brackets."""
        httpd, _thread = start_http_server(port, addr=addr.strip("[]"), registry=self.registry)
        return httpd.server_port


class _TargetCacheCollector:
    """Target cache counters, summed over the caches, taken from their stats at scrape time
    (the caches count; a second count here could drift)."""

    def __init__(self, stats: Callable[[], list]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        yield CounterMetricFamily("gramstyle_target_cache_hits",
                                  "Target lookups answered from the target cache.",
                                  value=sum(s.hits for s in stats))
        yield CounterMetricFamily("gramstyle_target_cache_misses",
                                  "Target lookups that ran the network.",
                                  value=sum(s.misses for s in stats))
        yield GaugeMetricFamily("gramstyle_target_cache_bytes",
                                "Bytes the target cache holds.",
                                value=sum(s.bytes for s in stats))
