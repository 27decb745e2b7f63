"""The gRPC server's life cycle (``gramstyle serve``): build, start, serve, drain, stop.

:class:`GramstyleServer` wires the pieces together on a ``grpc.aio`` server: the
StyleTransferService servicer, the standard ``grpc.health.v1`` health service, server
reflection, the request-log/metrics interceptor, the bounded worker queue (by count and by
memory) and the message-size limits, all from one :class:`~gramstyle.server.config.ServeConfig`.
:func:`run` loads the model once, prints one ``ready`` line, and serves until SIGTERM/SIGINT,
then shuts down gracefully:

1. health turns NOT_SERVING (load balancers and readiness probes stop sending work);
2. ``server.stop(grace)``: new calls are refused, in-flight calls may finish within ``grace``
   seconds, after which they are cancelled (their jobs stop within a second);
3. the process exits 0.

A second signal during the drain cancels the remaining calls at once; a stop during start-up
(the model load included) exits 0 at once (:mod:`gramstyle.server.signals`).

The other concerns live beside it: the settings (:mod:`~gramstyle.server.config`), the default
memory budget (:mod:`~gramstyle.server.admission`), the health servicer
(:mod:`~gramstyle.server.health`), addresses and bind errors (:mod:`~gramstyle.server.listen`),
signals (:mod:`~gramstyle.server.signals`) and logging (:mod:`~gramstyle.server.logs`).

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
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gramstyle import kernels
from gramstyle.engine.target_cache import TargetCache
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.errors import FieldError
from gramstyle.server.admission import WorkQueue, default_memory_budget
from gramstyle.server.config import ServeConfig
from gramstyle.server.health import HealthServicer
from gramstyle.server.interceptors import RequestLogInterceptor
from gramstyle.server.listen import bind_problem, default_metrics_host
from gramstyle.server.logs import configure_logging, log_loop_error
from gramstyle.server.message_budget import (
    RECEIVE_FACTOR,
    MessageBudget,
    MessageBudgetInterceptor,
    default_message_budget,
)
from gramstyle.server.metrics import Metrics
from gramstyle.server.security import (
    AuthInterceptor,
    TlsFiles,
    TokenStore,
    check_plaintext_tokens,
)
from gramstyle.server.service import SERVICE_NAME, StyleTransferService
from gramstyle.server.signals import Signals, StartupCancelled
from gramstyle.sizes import format_size
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: How long calls in flight on an aged-out connection may still run before it is closed (s):
#: an hour, longer than any sane Stylize deadline, so that ageing never cuts a call.
MAX_CONNECTION_AGE_GRACE_S = 3600.0
#: Seconds a health request's message may take to arrive on the main port.
HEALTH_MESSAGE_TIMEOUT_S = 5.0
#: The plaintext health port's receive limit: a health request is a few bytes.
HEALTH_MAX_MESSAGE_BYTES = 4096


# ---------------------------------------------------------------------------- the server


class GramstyleServer:
    """A configured, not yet started gRPC server around loaded engines.

    The asyncio server runs on an event loop in a thread of its own; ``start``, ``stop`` and
    ``wait`` may be called from any other thread.

    Args:
        engines: the loaded models; the first is the default.
        config: every setting (:class:`ServeConfig`): where to listen (port 0: a free one,
            see ``.port``; OSError "port N is already in use" when the address is taken),
            the workers and queue, the per-request limits, the memory budget (None: derived
            from the machine's memory, :func:`default_memory_budget`), the health port (0:
            a free one, see ``.health_port``), the HTTP/JSON port (0: a free one, see
            ``.http_port``; :mod:`gramstyle.server.http`), the connection age. The model settings
            (arch, weights, ..., max_size, max_pixels) are :func:`load_engines`', and
            ``metrics_port``, ``metrics_host`` and ``grace_s`` are :func:`run`'s.
        tls, tokens: the TLS files (mutual TLS when they have a client CA) and the bearer
            token store, already read (:func:`run` reads them before the model loads, so
            that a bad file fails fast). When neither is given they are read from
            ``config``'s paths (:func:`security_from_config`); None after that: plaintext,
            no token needed. Both are reloaded by :meth:`reload` and when they change on
            disk.
    """

    def __init__(self, engines: Sequence[StyleTransfer], config: ServeConfig, *,
                 tls: TlsFiles | None = None, tokens: TokenStore | None = None):
        if tls is None and tokens is None:
            tls, tokens = security_from_config(config)
        self.config = config
        self.tls, self.tokens, self.public_reflection = tls, tokens, config.public_reflection
        self.max_connection_age_s = config.max_connection_age_s
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.http: Any = None  # the HttpFront, with config.http_port
        self.http_port: int | None = None
        self.metrics = Metrics()
        self.metrics.watch_target_caches(e.target_cache for e in engines)
        if tls is not None:
            self.metrics.watch_tls(tls)
        memory_budget = config.memory_budget
        if memory_budget is None:
            caches = {id(e.target_cache): e.target_cache for e in engines}.values()
            memory_budget = default_memory_budget(sum(c.max_bytes for c in caches))
        self.metrics.memory_budget.set(memory_budget)
        message_budget = config.message_budget
        if message_budget is None:
            message_budget = default_message_budget(memory_budget, config.max_message_bytes)
        self.messages = MessageBudget(message_budget, config.max_message_bytes,
                                      config.message_timeout_s,
                                      on_change=self.metrics.message_bytes.set)
        self.metrics.message_budget.set(message_budget)
        # Health on the main port: its own two receipts, so that uploads filling the message
        # budget never delay a probe (which the plaintext --health-port avoids altogether:
        # it accepts 4 KiB).
        self.health_messages = MessageBudget(2 * RECEIVE_FACTOR * config.max_message_bytes,
                                             config.max_message_bytes,
                                             min(config.message_timeout_s,
                                                 HEALTH_MESSAGE_TIMEOUT_S))
        self.work = WorkQueue(config.workers, config.queue_size, memory_budget=memory_budget,
                              on_change=self.metrics.set_load)
        self.service = StyleTransferService(
            engines, self.work, max_iterations=config.max_iterations,
            max_message_bytes=config.max_message_bytes, max_images=config.max_images,
            result_chunk_bytes=config.result_chunk_bytes,
            max_request_memory=config.max_request_memory,
            on_iterations=self.metrics.iterations.inc)
        self.host = config.host
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve_loop, name="gramstyle-grpc",
                                        daemon=True)
        self._thread.start()
        try:
            self.server, self.health, self.port = self._call(self._build(
                config.host, config.port, config.max_message_bytes,
                config.max_concurrent_streams))
            if config.health_port is not None:
                self.health_server, self.health_port = self._call(
                    self._build_health(config.host, config.health_port))
            if config.http_port is not None:
                self._build_http(config.host, config.http_port, config.max_message_bytes)
        except BaseException:
            self._close()
            raise

    # -------------------------------------------------------------- the loop thread

    def _serve_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.set_exception_handler(log_loop_error)
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
                     ) -> tuple[grpc.aio.Server, HealthServicer, int]:
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
        servicer = HealthServicer()
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
            raise OSError(bind_problem(host, port))
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
            raise OSError(f"--health-port: {bind_problem(host, port)}")
        return server, bound

    def _build_http(self, host: str, port: int, max_message_bytes: int) -> None:
        from gramstyle.server.http import HttpFront  # only servers with --http-port need it

        self.http = HttpFront(self.service, self.health, self.metrics,
                              max_message_bytes=max_message_bytes, tokens=self.tokens,
                              public_reflection=self.public_reflection, tls=self.tls,
                              header_timeout_s=self.config.http_header_timeout_s,
                              body_timeout_s=self.config.http_body_timeout_s,
                              max_connections=self.config.http_max_connections)
        try:
            self.http_port = self.http.bind(host, port)
        except OSError as exc:
            raise OSError(f"--http-port: {exc}") from None

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
        if self.http is not None:
            await self.http.start()
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
                    if self.http is not None:
                        self._loop.call_soon_threadsafe(self.http.cancel_calls)
                except RuntimeError:  # the loop has just closed
                    pass
            return
        try:
            self._call(self._stop(grace))
        finally:
            self._close()

    async def _stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        if self.http is not None:  # both drain at once; HTTP health answers meanwhile
            await asyncio.gather(self.server.stop(grace), self.http.stop(grace))
        else:
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


# ---------------------------------------------------------------------------- gramstyle serve


def load_engines(config: ServeConfig) -> list[StyleTransfer]:
    """Load every model once (raises ValueError for bad arch/weights/device); they share one
    target cache of ``config.target_cache_mb`` MiB."""
    cache = TargetCache(config.target_cache_mb * 2**20)
    return [StyleTransfer(arch=config.arch, weights=w, pooling=config.pooling,
                          device=config.device, max_size=config.max_size,
                          max_pixels=config.max_pixels, target_cache=cache)
            for w in config.weights]


def run(config: ServeConfig, signals: Signals | None = None) -> int:
    """Load, serve until SIGTERM/SIGINT, drain, and return the exit code (0, also for a stop
    during start-up). Raises OSError when the port is taken ("port N is already in use"),
    ValueError naming the option when a TLS or token file is bad (checked before the model
    loads).

    ``signals``: handlers the caller installed earlier (the CLI does, before importing torch);
    None: installed here, from now until the return."""
    if signals is None:
        with Signals() as own:
            return run(config, own)
    signals.grace_s = config.grace_s
    try:
        tls, tokens = security_from_config(config)
        engines = load_engines(config)
        server = GramstyleServer(engines, config, tls=tls, tokens=tokens)
        signals.serving(server)
    except StartupCancelled:
        return 0
    try:
        metrics_note = _serve_metrics(server, config)
    except BaseException:
        server.stop(None)
        raise
    server.start()
    _print_ready(server, config, engines, metrics_note)
    # A timed wait keeps the main thread responsive to signals on every platform.
    while not signals.stop_requested.wait(1.0):
        pass
    server.stop(config.grace_s)
    log.info("stopped")
    return 0


def _serve_metrics(server: GramstyleServer, config: ServeConfig) -> str:
    """Start the metrics endpoint when asked for; the ready line's note about it."""
    if config.metrics_port is None:
        return ""
    host = config.metrics_host or default_metrics_host(config.host)
    try:
        port = server.metrics.serve_http(config.metrics_port, addr=host)
    except OSError as exc:
        raise OSError(f"--metrics-port: cannot listen on {host}:{config.metrics_port}: "
                      f"{exc.strerror or exc}") from None
    return f", metrics on :{port}/metrics (host {host})"


def _print_ready(server: GramstyleServer, config: ServeConfig,
                 engines: Sequence[StyleTransfer], metrics_note: str) -> None:
    """The one ``ready`` line on stdout (and an ERROR log when the compiled op is missing)."""
    security_note = ""
    if server.tls is not None:
        security_note += ", mutual TLS" if server.tls.mutual else ", TLS"
    if server.tokens is not None:
        security_note += f", bearer tokens ({len(server.tokens)})"
    if server.health_port is not None:
        security_note += f", plaintext health on :{server.health_port}"
    if server.http_port is not None:
        security_note += f", HTTP on :{server.http_port}"
    default = engines[0]
    models = ", ".join(f"{e.arch}/{e.weights_name}" for e in engines)
    problem = kernels.load_error()
    if problem is not None:
        log.error("the compiled Gram op did not load (%s); running the einsum fallback, "
                  "which is slower. Reinstall gramstyle against the installed torch.", problem)
    limits = server.service.limits()
    budget = format_size(limits["memory_budget_bytes"], digits=1)
    per_request = format_size(limits["max_request_memory_bytes"], digits=1)
    print(f"gramstyle server ready on port {server.port}: model {models}, device "
          f"{default.device}, backend {default.backend}, precision auto={default.auto_precision}"
          f", workers {config.workers}, queue {config.queue_size}, target cache "
          f"{config.target_cache_mb} MiB, memory budget {budget} (per request {per_request}), "
          f"max images {config.max_images}{metrics_note}{security_note}", flush=True)


def security_from_config(config: ServeConfig) -> tuple[TlsFiles | None, TokenStore | None]:
    """The TLS files and token store ``config`` asks for, read and checked now (ValueError
    naming the option and the file), after refusing tokens over plaintext to the network
    (unless ``insecure_auth``, which warns)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        missing = "tls_key" if config.tls_key is None else "tls_cert"
        raise FieldError(missing, "TLS needs both --tls-cert and --tls-key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise FieldError("tls_client_ca", "mutual TLS needs --tls-cert and --tls-key too")
    check_plaintext_tokens(config.host, config.tls_cert is not None,
                           config.auth_tokens is not None, config.insecure_auth)
    tls = None if config.tls_cert is None else TlsFiles(
        config.tls_cert, config.tls_key, config.tls_client_ca)
    tokens = None if config.auth_tokens is None else TokenStore(config.auth_tokens)
    return tls, tokens


__all__ = ["GramstyleServer", "ServeConfig", "configure_logging", "default_metrics_host",
           "load_engines", "run", "security_from_config"]
