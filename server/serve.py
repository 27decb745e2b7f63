"""Start-up and shutdown of the gRPC server (``gramstyle serve``).

:class:`GramstyleServer` wires the pieces together: the StyleTransferService servicer, the standard
``grpc.health.v1`` health service, server reflection, the request-log/metrics interceptor,
the bounded worker queue and the message-size limits. :func:`run` loads the model once,
prints one ``ready`` line, and serves until SIGTERM/SIGINT, then shuts down gracefully:

1. health turns NOT_SERVING (load balancers and readiness probes stop sending work);
2. ``server.stop(grace)``: new calls are refused, in-flight calls may finish within ``grace``
   seconds, after which they are cancelled (their optimisation stops within one iteration);
3. the process exits 0.

A second signal during the drain cancels the remaining calls at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gramstyle import kernels
from gramstyle.images import DEFAULT_MAX_PIXELS
from gramstyle.options import MAX_ITERATIONS, MAX_SIZE
from gramstyle.server.admission import WorkQueue
from gramstyle.server.engine import StyleTransfer
from gramstyle.server.interceptors import RequestLogInterceptor
from gramstyle.server.metrics import Metrics
from gramstyle.server.service import SERVICE_NAME, StyleTransferService
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Default send/receive limit: a 2048x2048 RGB PNG is at most ~12.6 MB (incompressible
#: noise), a request may carry several images, and a 2048 px gradient is 50 MB of float32.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Threads for cheap RPCs (health, info, reflection, refusals) on top of one per admitted job.
_SPARE_THREADS = 16


@dataclass
class ServeConfig:
    """Everything ``gramstyle serve`` takes; see its --help."""

    host: str = "[::]"
    port: int = 50051
    arch: str = "vgg19"
    #: One or more weights (imagenet, random or a path), all with ``arch``; the first is
    #: the default model.
    weights: Sequence[str] = ("imagenet",)
    pooling: str = "max"
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_size: int = MAX_SIZE
    max_iterations: int = MAX_ITERATIONS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 1
    queue_size: int = 4
    grace_s: float = 30.0
    metrics_port: int | None = None


class GramstyleServer:
    """A configured, not yet started gRPC server around loaded engines."""

    def __init__(self, engines: Sequence[StyleTransfer], *, host: str = "[::]", port: int = 0,
                 workers: int = 1, queue_size: int = 4,
                 max_iterations: int = MAX_ITERATIONS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 metrics: Metrics | None = None):
        self.metrics = metrics or Metrics()
        self.work = WorkQueue(workers, queue_size, on_change=self.metrics.set_load)
        self.service = StyleTransferService(
            engines, self.work, max_iterations=max_iterations,
            max_message_bytes=max_message_bytes, on_iterations=self.metrics.iterations.inc)
        self.health = health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=2))
        # Each admitted job holds a handler thread while it waits or streams; the spare
        # threads keep health checks and GetServerInfo answering when every worker is busy.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers + queue_size + _SPARE_THREADS,
                                       thread_name_prefix="gramstyle-rpc"),
            interceptors=[RequestLogInterceptor(self.metrics)],
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # Keep idle client connections healthy through proxies/NATs.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        pb_grpc.add_StyleTransferServiceServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"port: cannot listen on {host}:{port} (in use or not permitted)")
        self.host = host
        self._stopped = threading.Event()

    def start(self) -> GramstyleServer:
        self.server.start()
        for name in ("", SERVICE_NAME):  # "" is the whole server, as probes ask for it
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = 30.0) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, drain in-flight ones."""
        if self._stopped.is_set():
            self.server.stop(None)  # second request: cancel what is left now
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.work.shutdown(wait=True)

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> GramstyleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=None)


def load_engines(config: ServeConfig) -> list[StyleTransfer]:
    """Load every model once (raises ValueError for bad arch/weights/device)."""
    return [StyleTransfer(arch=config.arch, weights=w, pooling=config.pooling,
                          device=config.device, max_size=config.max_size,
                          max_pixels=config.max_pixels)
            for w in config.weights]


def run(config: ServeConfig) -> int:
    """Load, serve until SIGTERM/SIGINT, drain, and return the exit code (0)."""
    engines = load_engines(config)
    server = GramstyleServer(
        engines, host=config.host, port=config.port, workers=config.workers,
        queue_size=config.queue_size, max_iterations=config.max_iterations,
        max_message_bytes=config.max_message_bytes)
    stop_requested = threading.Event()
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        log.info("received %s; shutting down (grace %.0f s)", signal.Signals(signum).name,
                 config.grace_s)
        if signals > 1:
            server.server.stop(None)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics_note = ""
    if config.metrics_port is not None:
        metrics_port = server.metrics.serve_http(config.metrics_port)
        metrics_note = f", metrics on :{metrics_port}/metrics"
    server.start()
    default = engines[0]
    models = ", ".join(f"{e.arch}/{e.weights_name}" for e in engines)
    problem = kernels.load_error()
    if problem is not None:
        log.error("the compiled Gram op did not load (%s); running the einsum fallback, "
                  "which is slower. Reinstall gramstyle against the installed torch.", problem)
    print(f"gramstyle server ready on port {server.port}: model {models}, device "
          f"{default.device}, backend {default.backend}, workers {config.workers}, "
          f"queue {config.queue_size}{metrics_note}", flush=True)
    # A timed wait keeps the main thread responsive to signals on every platform.
    while not stop_requested.wait(1.0):
        pass
    server.stop(config.grace_s)
    log.info("stopped")
    return 0


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
