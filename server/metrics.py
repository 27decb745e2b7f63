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
- ``gramstyle_target_cache_bytes``: bytes those caches hold now;
- with TLS, ``gramstyle_tls_certificate_expiry_seconds``: seconds until the served
  certificate's notAfter (alert well ahead of 0), and
  ``gramstyle_tls_reload_failures_total{reason}``: certificate reloads refused (expired,
  not_yet_valid, key_mismatch, invalid, unreadable).

``serve_http`` answers each scrape on a thread of its own, with a socket timeout
(``SCRAPE_TIMEOUT_S``) and at most ``MAX_SCRAPE_THREADS`` at once: half-open connections
cannot pile up threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: Seconds a metrics connection may take to send its request (a scrape is one small GET).
SCRAPE_TIMEOUT_S = 5.0
#: Metrics connections answered at once; more wait in the listen backlog.
MAX_SCRAPE_THREADS = 16

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

    def watch_tls(self, tls: object) -> None:
        """Export the seconds until ``tls`` (a security.TlsFiles) expires and its refused
        reloads, read at every scrape."""
        self.registry.register(_TlsCollector(tls))

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
        server = make_server(addr.strip("[]"), port, make_wsgi_app(self.registry),
                             _BoundedThreadingServer.for_address(addr.strip("[]")),
                             handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="gramstyle-metrics",
                         daemon=True).start()
        return server.server_port


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


class _TlsCollector:
    def __init__(self, tls: object):
        self._tls = tls

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("gramstyle_tls_certificate_expiry_seconds",
                                "Seconds until the served TLS certificate expires.",
                                value=self._tls.not_after - time.time())
        failures = CounterMetricFamily("gramstyle_tls_reload_failures",
                                       "TLS certificate reloads refused, by reason.",
                                       labels=["reason"])
        for reason, count in sorted(self._tls.reload_failures.items()):
            failures.add_metric([reason], count)
        yield failures


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a connection that sends nothing is dropped after
    ``SCRAPE_TIMEOUT_S``."""

    timeout = SCRAPE_TIMEOUT_S

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _BoundedThreadingServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's server spends one thread per connection, however many: 400
    half-open connections made 400 threads. Here at most ``MAX_SCRAPE_THREADS`` run; the
    accept loop waits for a free one (the rest wait in the kernel's backlog)."""

    daemon_threads = True
    allow_reuse_address = True
    _slots = threading.BoundedSemaphore(MAX_SCRAPE_THREADS)

    @classmethod
    def for_address(cls, addr: str) -> type:
        import socket

        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return type("MetricsServer", (cls,), {"address_family": family,
                                              "_slots": threading.BoundedSemaphore(
                                                  MAX_SCRAPE_THREADS)})

    def process_request(self, request, client_address) -> None:  # noqa: ANN001
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
