"""Start-up and shutdown of the gRPC server (``gramstyle serve``).

:class:`GramstyleServer` wires the pieces together on a ``grpc.aio`` server: the
StyleTransferService servicer, the standard ``grpc.health.v1`` health service, server
reflection, the request-log/metrics interceptor, the bounded worker queue (by count and by
memory) and the message-size limits. :func:`run` loads the model once, prints one ``ready``
line, and serves until SIGTERM/SIGINT, then shuts down gracefully:

1. health turns NOT_SERVING (load balancers and readiness probes stop sending work);
2. ``server.stop(grace)``: new calls are refused, in-flight calls may finish within ``grace``
   seconds, after which they are cancelled (their jobs stop within a second);
3. the process exits 0.

A second signal during the drain cancels the remaining calls at once.

Why asyncio: with a thread pool, every open stream holds a thread -- an idle reflection
stream, a health Watch, a Stylize whose caller does not read -- and a few dozen of them
stopped every RPC, health checks included. On one event loop a stream is a coroutine and
holds nothing but memory; the compute runs on the work queue's threads. The loop runs on its
own thread, so the server can be started and stopped from plain synchronous code (the CLI,
the tests). Each HTTP/2 connection may open at most ``max_concurrent_streams`` streams at
once; a well-behaved client queues the excess itself, and the server refuses streams beyond
it at once (REFUSED_STREAM). ``grpc.so_reuseport`` is off, so a second server on a busy port
fails instead of sharing it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gramstyle import kernels
from gramstyle.engine.target_cache import DEFAULT_TARGET_CACHE_MB, TargetCache
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.images import DEFAULT_MAX_PIXELS
from gramstyle.options import MAX_ITERATIONS, MAX_SIZE
from gramstyle.server.admission import WorkQueue
from gramstyle.server.interceptors import JsonFormatter, RequestLogInterceptor
from gramstyle.server.message_budget import (
    DEFAULT_ARRIVAL_TIMEOUT_S,
    RECEIVE_FACTOR,
    MessageBudget,
    MessageBudgetInterceptor,
)
from gramstyle.server.metrics import Metrics
from gramstyle.server.security import (
    AuthInterceptor,
    TlsFiles,
    TokenStore,
    check_plaintext_tokens,
)
from gramstyle.server.service import DEFAULT_MAX_IMAGES, SERVICE_NAME, StyleTransferService
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Default send/receive limit: a 2048x2048 RGB PNG is at most ~12.6 MB (incompressible
#: noise), a request may carry several images, and a 2048 px gradient is 50 MB of float32.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Streams one HTTP/2 connection may have open at once (grpc.max_concurrent_streams).
DEFAULT_MAX_CONCURRENT_STREAMS = 100
#: Share of the machine's (or the container's) memory the default memory budget may use.
MEMORY_BUDGET_SHARE = 0.8
#: Connection age (s) after which the server asks the client to reconnect (GOAWAY), so that
#: clients balancing over DNS (a headless Service) find replicas added by a scale-up.
MAX_CONNECTION_AGE_S = 300.0
#: How long calls in flight on such a connection may still run before it is closed (s): an
#: hour, longer than any sane Stylize deadline, so that ageing never cuts a call.
MAX_CONNECTION_AGE_GRACE_S = 3600.0
#: Default share of the memory budget that request messages in flight may hold besides it
#: (``--message-budget``; at least two of the largest messages).
MESSAGE_BUDGET_SHARE = 0.25
#: Seconds a health request's message may take to arrive on the main port.
HEALTH_MESSAGE_TIMEOUT_S = 5.0
#: The plaintext health port's receive limit: a health request is a few bytes.
HEALTH_MAX_MESSAGE_BYTES = 4096
#: Addresses that mean "every interface".
_ALL_INTERFACES = {"", "[::]", "::", "0.0.0.0", "*"}


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
    #: Where the metrics listen; None: ``host``, or loopback when ``host`` is every interface.
    metrics_host: str | None = None
    #: Budget of the target cache the loaded models share (MiB; 0 turns it off).
    target_cache_mb: int = DEFAULT_TARGET_CACHE_MB
    #: Images per request (content, style, init image, candidate together).
    max_images: int = DEFAULT_MAX_IMAGES
    #: Largest estimated peak memory of one request, bytes (None: the memory budget).
    max_request_memory: int | None = None
    #: What the running requests' estimates may add up to, bytes (None: derived from the
    #: machine's memory, see :func:`default_memory_budget`).
    memory_budget: int | None = None
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    #: What request messages in flight (being received, or parsed and held by their calls)
    #: may add up to, bytes, besides the memory budget (None: see
    #: :func:`default_message_budget`).
    message_budget: int | None = None
    #: Seconds a request message may take to arrive.
    message_timeout_s: float = DEFAULT_ARRIVAL_TIMEOUT_S
    log_level: str = "INFO"
    #: "text" (key=value) or "json" (one object per line).
    log_format: str = "text"
    #: TLS: the certificate chain and key (PEM paths); with ``tls_client_ca``, mutual TLS.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    #: Bearer tokens file (one per line); None: no token needed.
    auth_tokens: str | None = None
    #: Reflection and GetServerInfo answer without a token.
    public_reflection: bool = False
    #: Allow tokens over plaintext on a non-loopback address (warns).
    insecure_auth: bool = False
    #: A plaintext port serving only grpc.health.v1 (for kubelet probes); None: none.
    health_port: int | None = None


# ---------------------------------------------------------------------------- machine


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit
    (cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def process_rss() -> int:
    """This process's resident memory, in bytes (0 where /proc is missing)."""
    try:
        match = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def default_memory_budget(reserved: int = 0) -> int:
    """The default ``--memory-budget``: ``MEMORY_BUDGET_SHARE`` of :func:`machine_memory`,
    less what this process already holds (the loaded models) and ``reserved`` bytes (the
    target cache), and at least 256 MiB."""
    budget = int(MEMORY_BUDGET_SHARE * machine_memory()) - process_rss() - reserved
    return max(256 * 2**20, budget)


def default_message_budget(memory_budget: int, max_message_bytes: int) -> int:
    """The default ``--message-budget``: ``MESSAGE_BUDGET_SHARE`` of the memory budget, and
    room to receive at least two of the largest messages at once."""
    return max(int(MESSAGE_BUDGET_SHARE * memory_budget),
               2 * RECEIVE_FACTOR * max_message_bytes)


def default_metrics_host(host: str) -> str:
    """``--metrics-host``'s default: ``host``, or loopback when ``host`` is every interface
    (metrics are for the machine's own scraper unless asked for)."""
    return "127.0.0.1" if host.strip() in _ALL_INTERFACES else host.strip("[]")


def _bind_problem(host: str, port: int) -> str:
    """Why gRPC could not listen on host:port, found by trying to bind the same address."""
    address = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port in TIME_WAIT is free, a listening one is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is already in use"
                if exc.errno == errno.EACCES:
                    return f"port {port}: permission denied (ports below 1024 need privileges)"
                return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return f"cannot listen on {host}:{port}"


# ---------------------------------------------------------------------------- health


class _HealthServicer(health.aio.HealthServicer):
    """grpc_health's asyncio servicer, with ``Watch`` fixed for many watchers.

    Upstream's Watch forgets a service's condition when *any* of its watchers leaves, so the
    others never hear of a later change (NOT_SERVING at shutdown), and it writes while
    holding the condition's lock, so one watcher that does not read blocks every status
    change. Here the condition lives while anyone watches, and writes happen outside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: collections.Counter[str] = collections.Counter()

    def _status(self, service: str) -> int:
        return self._server_status.get(service,
                                       health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] += 1
        last = None
        try:
            while True:
                status = self._status(service)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                async with condition:
                    if self._status(service) == last:
                        await condition.wait()
        finally:
            self._watching[service] -= 1
            if self._watching[service] <= 0:
                del self._watching[service]
                self._server_watchers.pop(service, None)


# ---------------------------------------------------------------------------- the server


class GramstyleServer:
    """A configured, not yet started gRPC server around loaded engines.

    The asyncio server runs on an event loop in a thread of its own; ``start``, ``stop`` and
    ``wait`` may be called from any other thread.

    Args:
        engines: the loaded models; the first is the default.
        host, port: where to listen (port 0: a free one, see ``.port``). Raises OSError
            ("port N is already in use") when the address is taken.
        workers, queue_size: compute threads, and jobs that may wait for one.
        max_iterations, max_message_bytes: per-request limits.
        metrics: where to count (a fresh :class:`Metrics` by default).
        max_images: images per request.
        max_request_memory: largest estimated peak memory of one request, bytes (None: the
            memory budget).
        memory_budget: what the running jobs' estimates may add up to, bytes (None: derived
            from the machine's memory, :func:`default_memory_budget`).
        max_concurrent_streams: streams one connection may have open at once.
        tls: serve TLS (mutual TLS when it has a client CA) with these files, reloaded by
            :meth:`reload` and when they change on disk (None: plaintext).
        tokens: require a bearer token from this store on every call but health (None: no
            token needed); ``public_reflection`` also opens reflection and GetServerInfo.
        health_port: also listen on this plaintext port (0: a free one, see
            ``.health_port``) with only grpc.health.v1, mirroring the main port's status.
        max_connection_age_s: the server closes (GOAWAY) a client connection after about
            this long, so that ``dns:///`` clients resolve again and find new replicas; calls
            in flight on it go on (up to ``MAX_CONNECTION_AGE_GRACE_S``).
        message_budget: bytes the request messages in flight may hold (None:
            :func:`default_message_budget`); see :mod:`gramstyle.server.message_budget`.
        message_timeout_s: seconds a request message may take to arrive.
    """

    def __init__(self, engines: Sequence[StyleTransfer], *, host: str = "[::]", port: int = 0,
                 workers: int = 1, queue_size: int = 4,
                 max_iterations: int = MAX_ITERATIONS,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 metrics: Metrics | None = None, max_images: int = DEFAULT_MAX_IMAGES,
                 max_request_memory: int | None = None, memory_budget: int | None = None,
                 max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS,
                 tls: TlsFiles | None = None, tokens: TokenStore | None = None,
                 public_reflection: bool = False, health_port: int | None = None,
                 max_connection_age_s: float = MAX_CONNECTION_AGE_S,
                 message_budget: int | None = None,
                 message_timeout_s: float = DEFAULT_ARRIVAL_TIMEOUT_S):
        self.tls, self.tokens, self.public_reflection = tls, tokens, public_reflection
        self.max_connection_age_s = max_connection_age_s
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.metrics = metrics or Metrics()
        self.metrics.watch_target_caches(e.target_cache for e in engines)
        if tls is not None:
            self.metrics.watch_tls(tls)
        if memory_budget is None:
            caches = {id(e.target_cache): e.target_cache for e in engines}.values()
            memory_budget = default_memory_budget(sum(c.max_bytes for c in caches))
        self.metrics.memory_budget.set(memory_budget)
        if message_budget is None:
            message_budget = default_message_budget(memory_budget, max_message_bytes)
        self.messages = MessageBudget(message_budget, max_message_bytes, message_timeout_s,
                                      on_change=self.metrics.message_bytes.set)
        self.metrics.message_budget.set(message_budget)
        # Health on the main port: its own two receipts, so that uploads filling the message
        # budget never delay a probe (which the plaintext --health-port avoids altogether:
        # it accepts 4 KiB).
        self.health_messages = MessageBudget(2 * RECEIVE_FACTOR * max_message_bytes,
                                             max_message_bytes,
                                             min(message_timeout_s, HEALTH_MESSAGE_TIMEOUT_S))
        self.work = WorkQueue(workers, queue_size, memory_budget=memory_budget,
                              on_change=self.metrics.set_load)
        self.service = StyleTransferService(
            engines, self.work, max_iterations=max_iterations,
            max_message_bytes=max_message_bytes, max_images=max_images,
            max_request_memory=max_request_memory, on_iterations=self.metrics.iterations.inc)
        self.host = host
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_loop, name="gramstyle-grpc",
                                        daemon=True)
        self._thread.start()
        try:
            self.server, self.health, self.port = self._call(self._build(
                host, port, max_message_bytes, max_concurrent_streams))
            if health_port is not None:
                self.health_server, self.health_port = self._call(
                    self._build_health(host, health_port))
        except BaseException:
            self._close()
            raise

    # -------------------------------------------------------------- the loop thread

    def _serve_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(_log_loop_error)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _call(self, coroutine: Coroutine) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _close(self) -> None:
        """Stop the workers and the loop thread (the server must be stopped)."""
        self.work.shutdown(wait=True)
        self.service.close()
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._stopped.set()

    async def _build(self, host: str, port: int, max_message_bytes: int, streams: int
                     ) -> tuple[grpc.aio.Server, _HealthServicer, int]:
        interceptors: list[grpc.aio.ServerInterceptor] = [RequestLogInterceptor(self.metrics)]
        if self.tokens is not None:  # after the log: refused calls are logged and counted
            interceptors.append(AuthInterceptor(self.tokens, self.public_reflection))
        # Innermost: a refused call's message is never read.
        interceptors.append(MessageBudgetInterceptor(self.messages, self.health_messages))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_concurrent_streams", streams),
                # Identity only: a compressed request is refused (UNIMPLEMENTED "Compression
                # algorithm 'gzip' is disabled") from its headers, before it is read; 61 KB
                # of gzip on the wire was 60 MiB in memory. gramstyle's clients never
                # compress.
                ("grpc.compression_enabled_algorithms_bitset", 1),
                # gRPC sets SO_REUSEPORT by default, so a second server on a busy port would
                # start and share it; fail instead.
                ("grpc.so_reuseport", 0),
                # Keep idle client connections healthy through proxies/NATs.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # Close (GOAWAY) each connection after a while (gRPC adds +-10 % jitter):
                # dns:/// clients then resolve again and spread onto replicas added since.
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(MAX_CONNECTION_AGE_GRACE_S * 1000)),
            ])
        pb_grpc.add_StyleTransferServiceServicer_to_server(self.service, server)
        servicer = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            if self.tls is not None:
                bound = server.add_secure_port(f"{host}:{port}", self.tls.credentials())
            else:
                bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(_bind_problem(host, port))
        return server, servicer, bound

    async def _build_health(self, host: str, port: int) -> tuple[grpc.aio.Server, int]:
        """The plaintext health-only listener (kubelet gRPC probes cannot do TLS). It shares
        the main server's health servicer, so it answers exactly what the main port would,
        NOT_SERVING during the drain included."""
        server = grpc.aio.server(
            interceptors=[RequestLogInterceptor(self.metrics)],
            options=[("grpc.so_reuseport", 0),
                     ("grpc.max_receive_message_length", HEALTH_MAX_MESSAGE_BYTES),
                     ("grpc.compression_enabled_algorithms_bitset", 1)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise OSError(f"--health-port: {_bind_problem(host, port)}")
        return server, bound

    def reload(self) -> None:
        """Re-read the TLS files and the tokens (SIGHUP). New connections get the new
        certificate; open connections and calls in flight go on. A file that fails its
        checks is logged and the previous one stays."""
        if self.tls is not None:
            self.tls.reload()
        if self.tokens is not None:
            self.tokens.reload()

    # -------------------------------------------------------------- life cycle

    def start(self) -> GramstyleServer:
        self._call(self._start())
        return self

    async def _start(self) -> None:
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for name in ("", SERVICE_NAME):  # "" is the whole server, as probes ask for it
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 30.0) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, drain in-flight ones for up to
        ``grace`` seconds (None: cancel them now), stop the workers. A second call while
        the first drains cancels what is left at once."""
        with self._lock:
            first, self._stopping = not self._stopping, True
        if not first:
            if not self._loop.is_closed():
                try:
                    asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop)
                except RuntimeError:  # the loop has just closed
                    pass
            return
        try:
            self._call(self._stop(grace))
        finally:
            self._close()

    async def _stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:  # answered NOT_SERVING during the drain
            await self.health_server.stop(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; True if ``timeout`` passed first (as
        ``grpc.Server.wait_for_termination``)."""
        return not self._stopped.wait(timeout)

    def __enter__(self) -> GramstyleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=None)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Unexpected errors on the server's loop: one log line, with the traceback if any."""
    exc = context.get("exception")
    log.error("event loop: %s", context.get("message", "error"),
              exc_info=exc if isinstance(exc, BaseException) else None)


# ---------------------------------------------------------------------------- gramstyle serve


def load_engines(config: ServeConfig) -> list[StyleTransfer]:
    """Load every model once (raises ValueError for bad arch/weights/device); they share one
    target cache of ``config.target_cache_mb`` MiB."""
    cache = TargetCache(config.target_cache_mb * 2**20)
    return [StyleTransfer(arch=config.arch, weights=w, pooling=config.pooling,
                          device=config.device, max_size=config.max_size,
                          max_pixels=config.max_pixels, target_cache=cache)
            for w in config.weights]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def run(config: ServeConfig) -> int:
    """Load, serve until SIGTERM/SIGINT, drain, and return the exit code (0). Raises OSError
    when the port is taken ("port N is already in use"), ValueError naming the option when a
    TLS or token file is bad (checked before the model loads)."""
    tls, tokens = security_from_config(config)
    engines = load_engines(config)
    server = GramstyleServer(
        engines, host=config.host, port=config.port, workers=config.workers,
        queue_size=config.queue_size, max_iterations=config.max_iterations,
        max_message_bytes=config.max_message_bytes, max_images=config.max_images,
        max_request_memory=config.max_request_memory, memory_budget=config.memory_budget,
        max_concurrent_streams=config.max_concurrent_streams, tls=tls, tokens=tokens,
        public_reflection=config.public_reflection, health_port=config.health_port,
        message_budget=config.message_budget, message_timeout_s=config.message_timeout_s)
    stop_requested = threading.Event()
    signals = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        log.info("received %s; shutting down (grace %.0f s)", signal.Signals(signum).name,
                 config.grace_s)
        if signals > 1:
            server.stop(None)  # the drain is under way: cancel what is left
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP: re-read the certificate, key, client CA and tokens (cert-manager rotation,
    # a new token list), off the signal handler so that file reads and logging are safe.
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(
        target=server.reload, name="gramstyle-reload", daemon=True).start())
    security_note = ""
    if tls is not None:
        security_note += ", mutual TLS" if tls.mutual else ", TLS"
    if tokens is not None:
        security_note += f", bearer tokens ({len(tokens)})"
    if server.health_port is not None:
        security_note += f", plaintext health on :{server.health_port}"
    metrics_note = ""
    if config.metrics_port is not None:
        metrics_host = config.metrics_host or default_metrics_host(config.host)
        try:
            metrics_port = server.metrics.serve_http(config.metrics_port, addr=metrics_host)
        except OSError as exc:
            server.stop(None)
            raise OSError(f"--metrics-port: cannot listen on {metrics_host}:"
                          f"{config.metrics_port}: {exc.strerror or exc}") from None
        metrics_note = f", metrics on :{metrics_port}/metrics (host {metrics_host})"
    server.start()
    default = engines[0]
    models = ", ".join(f"{e.arch}/{e.weights_name}" for e in engines)
    problem = kernels.load_error()
    if problem is not None:
        log.error("the compiled Gram op did not load (%s); running the einsum fallback, "
                  "which is slower. Reinstall gramstyle against the installed torch.", problem)
    limits = server.service.limits()
    print(f"gramstyle server ready on port {server.port}: model {models}, device "
          f"{default.device}, backend {default.backend}, precision auto={default.auto_precision}"
          f", workers {config.workers}, queue {config.queue_size}, target cache "
          f"{config.target_cache_mb} MiB, memory budget {_gib(limits['memory_budget_bytes'])} "
          f"(per request {_gib(limits['max_request_memory_bytes'])}), max images "
          f"{config.max_images}{metrics_note}{security_note}", flush=True)
    # A timed wait keeps the main thread responsive to signals on every platform.
    while not stop_requested.wait(1.0):
        pass
    server.stop(config.grace_s)
    log.info("stopped")
    return 0


def security_from_config(config: ServeConfig) -> tuple[TlsFiles | None, TokenStore | None]:
    """The TLS files and token store ``config`` asks for, read and checked now (ValueError
    naming the option and the file), after refusing tokens over plaintext to the network
    (unless ``insecure_auth``, which warns)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        missing = "tls_key" if config.tls_key is None else "tls_cert"
        raise ValueError(f"{missing}: TLS needs both --tls-cert and --tls-key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("tls_client_ca: mutual TLS needs --tls-cert and --tls-key too")
    check_plaintext_tokens(config.host, config.tls_cert is not None,
                           config.auth_tokens is not None, config.insecure_auth)
    tls = None if config.tls_cert is None else TlsFiles(
        config.tls_cert, config.tls_key, config.tls_client_ca)
    tokens = None if config.auth_tokens is None else TokenStore(config.auth_tokens)
    return tls, tokens


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logs to stderr: ``fmt`` 'text' (one line each; request lines as key=value) or 'json'
    (one JSON object per line)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
