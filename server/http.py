"""The HTTP/JSON front of the server (``gramstyle serve --http-port PORT``).

The same service as gRPC, from the same process: the routes call the
:class:`~gramstyle.server.service.StyleTransferService` methods themselves, with an adapter
(:class:`HttpContext`) for the part of ``grpc.aio.ServicerContext`` they use, so the engines,
work queue, admission, limits, error messages, request ids, log lines and metrics are the
gRPC ones. One contract: bodies are the proto messages in protobuf's canonical JSON mapping
(:mod:`google.protobuf.json_format`); nothing here re-declares the schema.

Routes (``ROUTES``):

- ``POST /v1/stylize``: a StylizeRequest as JSON, or as ``multipart/form-data`` (files
  ``content``, ``style``, ``style_mask``, ``style_source_mask`` (each may repeat; an empty
  mask file: no mask for that style), ``init_image``; every other field by its proto or
  JSON name, as
  text). Answers ``text/event-stream``: one event per StylizeResponse, named after its kind
  (``progress``, then one ``result``, which always holds the whole image: a result the
  servicer cuts into ResultChunk messages for gRPC is reassembled here), its data the
  message in JSON; a failure after the stream started is an ``error`` event carrying the
  error object below.
- ``POST /v1/losses``: ComputeLossesRequest -> ComputeLossesResponse.
- ``GET /v1/info``: GetServerInfoResponse.
- ``GET /healthz`` (the whole server, gRPC health service "") and ``GET /readyz`` (the
  StyleTransferService): ``{"status": "SERVING"}`` with 200, or 503 when not serving --
  NOT_SERVING while the server drains, as gRPC health answers.
- ``GET /``: the page (``http_page.html``): pick images, start, watch the previews.

Errors are Google's JSON error object -- ``{"error": {"code": HTTP status, "status": gRPC
code name, "message": ..., "details": [google.rpc.BadRequest ...]}}`` -- with the HTTP status
Google's API design guide gives the gRPC code (:data:`HTTP_STATUS`); a body over the limit is
413.

The same rules as gRPC: bearer tokens (``Authorization: Bearer ...``; the page and health are
open, and GetServerInfo with ``public_reflection``); TLS from the same files, reloaded with
them; a body over :func:`body_limit` refused from its Content-Length before it is read, and
counted while it streams; a client that disconnects cancels its call (the job stops within a
second); while the server drains, new calls get 503 UNAVAILABLE and calls in flight may finish
within the grace period. It runs under uvicorn on the gRPC server's event loop.

Slow and idle clients (slowloris) are bounded: a connection has ``header_timeout_s`` to send
a request's line and headers (from when it opens, or from its previous answer; then it is
closed, 408 when part of a request came), a call has ``body_timeout_s`` to receive its body
(then 408), at most ``max_connections`` connections are served at once (a request on one
beyond them is answered 503 at once and the connection closed), and a request's head is at
most :data:`MAX_HEAD_BYTES`. A call may carry a deadline, ``X-Request-Timeout: 30s``
(:func:`parse_timeout`), enforced as gRPC enforces its deadline: the call is cancelled when
it passes (the job stops), ``time_remaining()`` counts down to it, and the answer is 504
DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import grpc
import h11
import uvicorn
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from prometheus_client import Counter, Gauge
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from gramstyle import codec
from gramstyle.errors import FieldError, GramstyleError
from gramstyle.server.interceptors import REQUEST_ID_KEY, observe
from gramstyle.server.metrics import Metrics
from gramstyle.server.security import UNAUTHENTICATED_MESSAGE, TlsFiles, TokenStore
from gramstyle.server.service import SERVICE_NAME, StyleTransferService
from gramstyle.server.status import rich_status
from gramstyle.v1 import gramstyle_pb2 as pb

log = logging.getLogger(__name__)

#: gRPC code -> HTTP status, as Google's API design guide tables it (499: client closed).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
}
_STATUS_OF_HTTP = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}
#: Room for the JSON around the base64 of a message at the size limit (bytes).
JSON_OVERHEAD_BYTES = 64 * 1024
#: How long (s) calls cut by the end of the grace period may take to say so before uvicorn
#: closes their connections.
_CLOSE_TIMEOUT_S = 2.0
SHUTTING_DOWN_MESSAGE = "the server is shutting down; try another replica or retry later"
_DETAILS_KEY = "grpc-status-details-bin"
_PARSE_FIELD = re.compile(r"Failed to parse (\w+) field")
_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no", ""}
#: The largest request line plus headers (bytes); a longer head is answered 400 (h11's own
#: default, set here so that it is a decision, not an accident).
MAX_HEAD_BYTES = 16 * 1024
#: The header that carries a call's deadline (a duration: 30s, 500ms, 2m, 1.5h, or seconds).
TIMEOUT_HEADER = "x-request-timeout"
#: The longest deadline (s): gRPC's grpc-timeout header holds at most 8 digits of a unit.
MAX_TIMEOUT_S = 99_999_999.0
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: File descriptors kept free beside the HTTP connections (gRPC, models, logs).
_SPARE_DESCRIPTORS = 256


def body_limit(max_message_bytes: int) -> int:
    """The largest request body (bytes) for a message limit: the base64 of a message at the
    limit (4/3 of it) plus the JSON around it."""
    return max_message_bytes * 4 // 3 + JSON_OVERHEAD_BYTES


def parse_timeout(text: str) -> float:
    """A call's ``X-Request-Timeout`` in seconds: a number and an optional unit, ``ms``,
    ``s`` (the default), ``m`` or ``h`` (``30s``, ``500ms``, ``2m``, ``1.5``). Raises
    ValueError naming the header when it is not one, or not in (0, MAX_TIMEOUT_S]."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{TIMEOUT_HEADER}: expected a duration such as 30s, 500ms or 2m, "
                         f"got {text[:40]!r}")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ValueError(f"{TIMEOUT_HEADER}: must be more than 0 and at most "
                         f"{MAX_TIMEOUT_S:.0f} s, got {text[:40]!r}")
    return seconds


def to_json(message: Message) -> dict:
    """A message in protobuf's canonical JSON mapping (lowerCamelCase names, bytes as base64,
    64-bit integers as strings), fields at their defaults included."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def error_object(code: grpc.StatusCode, message: str, details: Any = None,
                 http_status: int | None = None) -> dict:
    """Google's JSON error object for a status; ``details`` is the serialized
    google.rpc.Status of a rich status (the BadRequest naming the field), if any."""
    error: dict[str, Any] = {"code": http_status or HTTP_STATUS.get(code, 500),
                             "status": code.name, "message": message}
    if details:
        status = status_pb2.Status.FromString(details)
        if status.details:
            error["details"] = json_format.MessageToDict(status)["details"]
    return {"error": error}


class BodyTooLarge(GramstyleError):
    """The request body is over the limit (HTTP 413)."""


class HttpContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer and the request log use, for a
    call that came over HTTP. ``abort`` records the status and raises
    ``grpc.aio.AbortError``, as grpc.aio does; the route turns it into the HTTP answer."""

    def __init__(self, request: Request):
        self.request = request
        client = request.client
        self._peer = f"http:{client.host}:{client.port}" if client else "http:unknown"
        self._metadata = tuple((key, value) for key, value in request.headers.items()
                               if key == REQUEST_ID_KEY)
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.trailing_metadata: Any = ()
        self.request_id = ""
        #: An HTTP status that overrides the one of the code (413 for a body over the limit).
        self.http_status: int | None = None
        #: Set once the body has been read: from then on the connection's only message is
        #: its end (a disconnect).
        self.body_read = asyncio.Event()
        #: The call's deadline (time.monotonic() seconds) from X-Request-Timeout, if any; a
        #: header that is not a duration is kept in ``timeout_problem`` (a 400 once admitted).
        self.deadline: float | None = None
        self.timeout_problem: str | None = None
        timeout = request.headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            try:
                self.deadline = time.monotonic() + parse_timeout(timeout)
            except ValueError as exc:
                self.timeout_problem = str(exc)
        #: The deadline passed and the call was cancelled for it.
        self.expired = False
        #: The answer's head, and its end, have been sent.
        self.started = self.finished = False
        #: Answer with ``connection: close`` (a body left unread).
        self.close_connection = False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def send_initial_metadata(self, metadata: Any) -> None:
        for key, value in metadata:
            if key == REQUEST_ID_KEY:
                self.request_id = value

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        self._code, self._details = code, details
        self.trailing_metadata = trailing_metadata or ()
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def time_remaining(self) -> float | None:
        """Seconds to the call's deadline (X-Request-Timeout), or None without one; <= 0
        once it passed, as grpc.aio's."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cancelled(self) -> bool:
        return False

    def error(self) -> dict:
        """The error object of the status ``abort`` set."""
        details = dict(self.trailing_metadata).get(_DETAILS_KEY)
        return error_object(self._code or grpc.StatusCode.UNKNOWN, self._details, details,
                            self.http_status)

    def headers(self) -> dict[str, str]:
        headers = {REQUEST_ID_KEY: self.request_id} if self.request_id else {}
        if self.close_connection:
            headers["connection"] = "close"
        return headers


# ---------------------------------------------------------------------------- bodies


async def _abort_invalid(context: HttpContext, message: str, field: str | None = None) -> None:
    """INVALID_ARGUMENT, with a field violation naming ``field`` when given."""
    status = rich_status(grpc.StatusCode.INVALID_ARGUMENT, message, field)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _parse_problem(exc: Exception, message: Message) -> tuple[str, str | None]:
    """A json_format error as (a message starting with the field it names, that field), when
    it names a field of ``message`` (so the error carries a field violation); else (a
    message starting with "request body", None). json_format names the field only in its
    message, so this is the one place that reads a field from a message."""
    text = str(exc)
    match = _PARSE_FIELD.search(text)
    if match:
        fields = message.DESCRIPTOR.fields_by_name
        by_json = {f.json_name: f for f in message.DESCRIPTOR.fields}
        field = fields.get(match.group(1)) or by_json.get(match.group(1))
        if field is not None:
            return f"{field.name}: {text}", field.name
    return f"request body: {text}", None


def _form_value(field: FieldDescriptor, value: str) -> Any:
    """A form field's text as the JSON value json_format parses for ``field``."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        lowered = value.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise FieldError(field.name, f"expected true or false, got {value[:40]!r}")
        return lowered in _TRUE
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        try:
            return json.loads(value)
        except ValueError as exc:
            raise FieldError(field.name, f"expected a JSON object ({exc})") from None
    return value


def _repeated(field: FieldDescriptor) -> bool:
    # ``is_repeated`` is new in protobuf 6.31 (``label`` is deprecated from then on).
    repeated = getattr(field, "is_repeated", None)
    return field.label == FieldDescriptor.LABEL_REPEATED if repeated is None else repeated


async def _message_from_form(form: Any, message: Message) -> None:
    """Fill ``message`` from a multipart form: files for its images (repeated
    WeightedImage fields and bytes fields), text for every other field, by proto or JSON
    name. Raises ValueError naming the form field."""
    descriptor = message.DESCRIPTOR
    by_name = {**{f.json_name: f for f in descriptor.fields}, **descriptor.fields_by_name}
    values: dict[str, Any] = {}
    files: list[tuple[FieldDescriptor, bytes]] = []
    for key, value in form.multi_items():
        field = by_name.get(key)
        if field is None:
            raise FieldError(key[:40], f"not a field of {descriptor.full_name}")
        is_image = field.type == FieldDescriptor.TYPE_BYTES or (
            field.message_type is not None and field.message_type.name == "WeightedImage")
        if isinstance(value, UploadFile):
            if not is_image:
                raise FieldError(field.name, "a file was sent for a field that takes text")
            files.append((field, await value.read()))
        elif is_image:
            raise FieldError(field.name, "send the image as a file")
        elif _repeated(field):
            values.setdefault(field.name, []).append(_form_value(field, value))
        else:
            values[field.name] = _form_value(field, value)
    json_format.ParseDict(values, message)
    for field, data in files:
        if field.type == FieldDescriptor.TYPE_BYTES and _repeated(field):  # per-style masks
            getattr(message, field.name).append(data)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, field.name, data)
        else:
            getattr(message, field.name).add(data=data)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _charged(request: Request, charge: Callable[[int], None]) -> Request:
    """``request`` whose body passes every chunk's size to ``charge`` as it arrives, which
    raises (:class:`BodyTooLarge`) to refuse the rest (a chunked body has no Content-Length
    to check first)."""
    async def receive() -> dict:
        event = await request.receive()
        if event["type"] == "http.request":
            charge(len(event.get("body", b"")))
        return event
    return Request(request.scope, receive)


# ---------------------------------------------------------------------------- TLS


class _TlsContext:
    """An ``ssl.SSLContext`` for uvicorn from the gRPC server's :class:`TlsFiles`: a new
    handshake gets a context rebuilt from the files whenever they were reloaded (SIGHUP, or
    changed on disk: checked here too, at most once a second), as gRPC's does. The switch
    happens in the server-name callback, which OpenSSL calls at every ClientHello, with or
    without a server name."""

    def __init__(self, tls: TlsFiles):
        self.tls = tls
        self._built_from = tls.pem
        self._current = self._build()
        self.context = self._build()
        self.context.sni_callback = self._pick

    def _build(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert, self.tls.key)
        if self.tls.client_ca is not None:
            context.load_verify_locations(self.tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _pick(self, connection: Any, _server_name: str | None, _context: Any) -> None:
        try:
            if self.tls.changed_on_disk():
                self.tls.reload()
            if self.tls.pem is not self._built_from:
                self._built_from = self.tls.pem
                self._current = self._build()
            connection.context = self._current
        except Exception:  # noqa: BLE001 -- keep the previous certificate, as gRPC does
            log.exception("HTTP TLS certificate reload")
            connection.context = self._current


# ---------------------------------------------------------------------------- the front


class _GuardedH11(H11Protocol):
    """uvicorn's h11 connection with what uvicorn leaves out: a deadline on each request's
    head and a cap on connections (see :class:`HttpFront`; ``front`` is set on a subclass
    made per front).

    uvicorn times a connection out only while it is idle after an answer, and any byte
    resets that; a new connection, or one sending its head a byte at a time, is never
    cut. Here a timer starts when the connection opens and after each answer, and only a
    complete head (a new request/response cycle) stops it."""

    front: HttpFront

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_after: Any = None  # the cycle whose successor's head is awaited
        self._head_bytes = 0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        front = self.front
        if len(front.connections) >= front.max_connections:
            self.app = front.over_capacity  # its request is answered 503, then closed
            front.refused_connections.inc()
        else:
            front.connections.add(self)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.front.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._waiting_after:
            self._stop_head_timer()  # a whole head came: the call's own limits take over

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may start a pipelined request's cycle
        if self.cycle is finished and not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._waiting_after, self._head_bytes = self.cycle, 0
        self._head_timer = self.loop.call_later(self.front.header_timeout_s,
                                                self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._waiting_after:
            return
        if self._head_bytes and self.conn.their_state is h11.IDLE:  # part of a request
            # came: say why it is cut (h11 cannot answer a request it has not parsed, so the
            # answer is written here)
            self.front.timeouts.labels(phase="head").inc()
            body = json.dumps(error_object(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request line and headers: not received within "
                f"{self.front.header_timeout_s:g} s (--http-header-timeout)",
                http_status=408), separators=(",", ":")).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        else:
            self.front.timeouts.labels(phase="idle").inc()
        self.transport.close()


def _fit_descriptor_limit(wanted: int) -> None:
    """Raise this process's soft limit of open files to ``wanted`` when it is lower (each
    HTTP connection is one), as far as the hard limit allows."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if new > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        log.warning("open-file limit %d is below the %d that --http-max-connections needs; "
                    "raise it (ulimit -n) or lower --http-max-connections", new, wanted)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port ("[::]" is every interface, IPv4 and IPv6); OSError
    naming the port when it cannot be had."""
    address = host.strip("[]") or "::"
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} is already in use") from None
        if exc.errno == errno.EACCES:
            raise OSError(f"port {port}: permission denied (ports below 1024 need "
                          f"privileges)") from None
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def _wait_disconnect(context: HttpContext, receive: Callable) -> None:
    """Return when the client has gone (after the body was read: until then the route
    reads the connection)."""
    await context.body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class HttpFront:
    """The HTTP/JSON front over a running service (see the module docstring).

    Args:
        service: the gRPC servicer whose methods the routes call.
        health: the gRPC health servicer (its status is what /healthz and /readyz answer).
        metrics: where calls are counted, labelled ``rpc="METHOD /path"``.
        max_message_bytes: the gRPC message limit; bodies may be :func:`body_limit` bytes.
        tokens: bearer tokens required on every route but the page and health (None: none).
        public_reflection: GetServerInfo answers without a token too.
        tls: serve HTTPS with these files (None: plain HTTP).
        header_timeout_s: how long a connection may take to send a request's line and
            headers (s), from when it opens or from its previous answer
            (``ServeConfig.http_header_timeout_s``).
        body_timeout_s: how long a call may take to receive its body (s); then 408
            (``http_body_timeout_s``).
        max_connections: connections served at once; a request on one beyond them gets 503
            (``http_max_connections``).
    """

    def __init__(self, service: StyleTransferService, health: Any, metrics: Metrics, *,
                 max_message_bytes: int, tokens: TokenStore | None = None,
                 public_reflection: bool = False, tls: TlsFiles | None = None,
                 header_timeout_s: float, body_timeout_s: float, max_connections: int):
        self.service, self.health, self.metrics = service, health, metrics
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.max_connections = max_connections
        #: The connections being served (at most ``max_connections``).
        self.connections: set[asyncio.Protocol] = set()
        Gauge("gramstyle_http_connections", "HTTP connections being served.",
              registry=metrics.registry).set_function(lambda: len(self.connections))
        self.refused_connections = Counter(
            "gramstyle_http_connections_refused",
            "HTTP connections answered 503 for being over --http-max-connections.",
            registry=metrics.registry)
        self.timeouts = Counter(
            "gramstyle_http_timeouts",
            "HTTP connections or calls cut for slowness: phase=idle (nothing sent within "
            "--http-header-timeout), head (a partial request line or headers), body "
            "(--http-body-timeout).", ["phase"], registry=metrics.registry)
        self.max_message_bytes = max_message_bytes
        self.max_body_bytes = body_limit(max_message_bytes)
        self.tokens, self.public_reflection = tokens, public_reflection
        self._tls = None if tls is None else _TlsContext(tls)
        self.draining = False
        self._calls: set[asyncio.Task] = set()
        self._socket: socket.socket | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.port: int | None = None
        self.app = Starlette(routes=self.routes(), exception_handlers={
            HTTPException: self._http_error})

    # -------------------------------------------------------------- routes

    def routes(self) -> list[Route]:
        def rpc(path: str, method: str, handler: Callable, request_type: type | None,
                public: bool = False, stream: bool = False) -> Route:
            return Route(path, _Rpc(self, f"{method} {path}", handler, request_type,
                                    public=public, stream=stream), methods=[method])

        def health(path: str, service: str) -> Route:
            return Route(path, _Rpc(self, f"GET {path}", self._health(service), None,
                                    public=True, health=True, ok=health_status),
                         methods=["GET"])

        def health_status(message: Message) -> int:
            return 200 if message.status == health_pb2.HealthCheckResponse.SERVING else 503

        return [
            Route("/", self._page, methods=["GET"]),
            rpc("/v1/stylize", "POST", self._stylize, pb.StylizeRequest, stream=True),
            rpc("/v1/losses", "POST", self.service.ComputeLosses, pb.ComputeLossesRequest),
            rpc("/v1/info", "GET", self.service.GetServerInfo, pb.GetServerInfoRequest,
                public=self.public_reflection),
            health("/healthz", ""),
            health("/readyz", SERVICE_NAME),
        ]

    async def _stylize(self, request: pb.StylizeRequest, context: HttpContext
                       ) -> AsyncIterator[Message]:
        """The servicer's Stylize stream with a chunked result reassembled: the ``result``
        event always carries the whole image (an event stream has no message limit)."""
        assembly = codec.ResultAssembly()
        async for message in self.service.Stylize(request, context):
            kind = message.WhichOneof("kind")
            if kind == "result_chunk":
                assembly.add(message.result_chunk)
            elif kind == "result":
                yield pb.StylizeResponse(result=assembly.complete(message.result))
            else:
                yield message

    def _health(self, service: str) -> Callable:
        async def check(_request: Any, context: HttpContext) -> Message:
            return await self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                           context)
        return check

    async def _page(self, _request: Request) -> Response:
        page = resources.files("gramstyle.server").joinpath("http_page.html").read_bytes()
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; "
                                       "style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            "cache-control": "no-cache"})

    async def _http_error(self, _request: Request, exc: Exception) -> Response:
        """Starlette's own refusals (unknown path 404, wrong method 405) as error objects."""
        status = getattr(exc, "status_code", 500)
        code = _STATUS_OF_HTTP.get(status, grpc.StatusCode.UNKNOWN)
        return JSONResponse(error_object(code, str(getattr(exc, "detail", "")), None, status),
                            status_code=status, headers=getattr(exc, "headers", None))

    # -------------------------------------------------------------- checks

    async def admit(self, context: HttpContext, public: bool, health: bool) -> None:
        """Refuse a call without an accepted token (unless ``public``), or any call but
        health while draining."""
        if not public and self.tokens is not None:
            values = context.request.headers.getlist("authorization")
            if len(values) != 1 or not self.tokens.accepts(values[0]):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        if self.draining and not health:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN_MESSAGE)
        if context.timeout_problem is not None:
            await _abort_invalid(context, context.timeout_problem)

    @contextlib.asynccontextmanager
    async def body_budget(self, context: HttpContext) -> AsyncIterator[Callable[[int], None]]:
        """The one place a call's request-body bytes are accounted, held for the whole call
        (its message lives that long): yields ``charge(nbytes)``, called with each chunk as
        it arrives, which raises :class:`BodyTooLarge` past this call's limit. A total
        in-flight budget shared with gRPC would be charged in ``charge`` (refusing or
        waiting) and released on exit here."""
        seen = 0

        def charge(nbytes: int) -> None:
            nonlocal seen
            seen += nbytes
            if seen > self.max_body_bytes:
                raise BodyTooLarge(f"over {self.max_body_bytes}")
        yield charge

    async def read(self, context: HttpContext, message: Message,
                   charge: Callable[[int], None]) -> Message:
        """Fill ``message`` from the body (JSON, or multipart/form-data), refusing a body over
        the limit before reading it (Content-Length) or as soon as it passes it (``charge``,
        from :meth:`body_budget`), and one that takes over ``body_timeout_s`` to arrive
        (408)."""
        request = context.request
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(context, int(length))
        charged = _charged(request, charge)
        name = message.DESCRIPTOR.full_name
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                # One file over the image limit, so that the service says what is over it;
                # plus the empty parts that skip a style's mask (no images: at most two per
                # style, the styles being at most max_images).
                form = await asyncio.wait_for(
                    _awaited(charged.form(max_files=3 * self.service.max_images + 1,
                                          max_fields=200)), self.body_timeout_s)
                try:
                    await _message_from_form(form, message)
                finally:
                    await form.close()
            else:
                body = await asyncio.wait_for(charged.body(), self.body_timeout_s)
                context.body_read.set()
                value = json.loads(body) if body.strip() else {}
                if not isinstance(value, dict):
                    raise ValueError(f"request body: expected a JSON object ({name}), got "
                                     f"{type(value).__name__}")
                json_format.ParseDict(value, message)
        except ClientDisconnect:  # the caller left while sending: as a gRPC cancel
            await context.abort(grpc.StatusCode.CANCELLED,
                                "request body: the client disconnected before sending it all")
        except TimeoutError:  # asyncio.wait_for raises the builtin from Python 3.11
            self.timeouts.labels(phase="body").inc()
            context.http_status, context.close_connection = 408, True
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request body: not received in full within "
                                f"{self.body_timeout_s:g} s (--http-body-timeout)")
        except BodyTooLarge:
            await self._too_large(context, None)
        except json_format.ParseError as exc:
            await _abort_invalid(context, *_parse_problem(exc, message))
        except SystemError as exc:
            # protobuf's upb looks an unknown key up as UTF-8: a key with an unpaired UTF-16
            # surrogate ("\\ud800", valid JSON) fails inside it.
            if not isinstance(exc.__cause__, UnicodeError):
                raise
            await _abort_invalid(context, "request body: a field name is not valid Unicode "
                                          "(an unpaired surrogate)")
        except (MultiPartException, HTTPException) as exc:
            detail = getattr(exc, "detail", None) or getattr(exc, "message", str(exc))
            await _abort_invalid(context, f"request body: not valid multipart/form-data "
                                          f"({detail})")
        except RecursionError:
            await _abort_invalid(context, "request body: the JSON is nested too deeply")
        except json.JSONDecodeError as exc:
            await _abort_invalid(context, f"request body: not valid JSON ({exc})")
        except UnicodeDecodeError as exc:
            await _abort_invalid(context, f"request body: not UTF-8 ({exc.reason} at byte "
                                          f"{exc.start})")
        except ValueError as exc:
            await _abort_invalid(context, str(exc), getattr(exc, "field", None))
        finally:
            context.body_read.set()
        size = message.ByteSize()
        if size > self.max_message_bytes:
            context.http_status = 413
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"request: the message is {size} bytes, over this server's "
                                f"limit of {self.max_message_bytes} bytes")
        return message

    async def _too_large(self, context: HttpContext, length: int | None) -> None:
        context.http_status = 413
        context.close_connection = True  # the rest of the body is not read
        size = f"{length} bytes, " if length is not None else ""
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"request body: {size}over this server's limit of "
                            f"{self.max_body_bytes} bytes (the message limit of "
                            f"{self.max_message_bytes} bytes in base64, plus the JSON)")

    # -------------------------------------------------------------- life cycle

    def bind(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port. Raises OSError naming the
        port when it is taken."""
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        return self.port

    async def start(self) -> None:
        """Serve on the bound socket, on the running event loop."""
        assert self._socket is not None, "bind() first"
        _fit_descriptor_limit(self.max_connections + _SPARE_DESCRIPTORS)
        protocol = type("GuardedH11", (_GuardedH11,), {"front": self})
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                log_level="warning", server_header=False, ws="none",
                                http=protocol, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                                timeout_keep_alive=5, timeout_graceful_shutdown=None)
        config.load()
        if self._tls is not None:
            config.ssl = self._tls.context  # uvicorn takes files only; this follows reloads
        self._uvicorn = uvicorn.Server(config)
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[self._socket]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped at start-up")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float | None) -> None:
        """Drain: new calls get UNAVAILABLE (health answers, NOT_SERVING), calls in flight may
        finish within ``grace`` seconds (None: cancelled now), then the listener closes."""
        self.draining = True
        if self._calls and grace:
            await asyncio.wait(set(self._calls), timeout=grace)
        self.cancel_calls()
        if self._uvicorn is not None and self._task is not None:
            self._uvicorn.config.timeout_graceful_shutdown = int(_CLOSE_TIMEOUT_S)
            self._uvicorn.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        elif self._socket is not None:
            self._socket.close()

    async def over_capacity(self, _scope: dict, _receive: Callable, send: Callable) -> None:
        """The ASGI app of a connection beyond ``max_connections``: 503, then close."""
        error = error_object(grpc.StatusCode.UNAVAILABLE,
                             f"too many HTTP connections (--http-max-connections "
                             f"{self.max_connections}); retry later")
        await _send_json(send, 503, error, {"connection": "close"})

    def cancel_calls(self) -> None:
        """Cancel every compute call in flight (the end of the grace period, or a second
        signal)."""
        self.draining = True
        for task in list(self._calls):
            task.cancel()


class _Rpc:
    """One RPC route (an ASGI app): admit, read the body, call the servicer through the
    request log (:func:`observe`), and answer JSON, or a stream of server-sent events; a
    client that disconnects cancels the call."""

    def __init__(self, front: HttpFront, rpc: str, handler: Callable,
                 request_type: type | None, *, public: bool = False, stream: bool = False,
                 health: bool = False, ok: Callable[[Message], int] | None = None):
        self.front, self.rpc, self.handler = front, rpc, handler
        self.request_type, self.public, self.stream = request_type, public, stream
        #: Health answers while the server drains, and is not a call the drain waits for.
        self.health = health
        #: The HTTP status of a successful answer.
        self.ok = ok or (lambda _message: 200)

    async def behavior(self, _request: None, context: HttpContext) -> AsyncIterator[Message]:
        await self.front.admit(context, self.public, self.health)
        async with self.front.body_budget(context) as charge:
            request = None
            if self.request_type is not None:
                if context.request.method == "GET":
                    request = self.request_type()
                else:
                    request = await self.front.read(context, self.request_type(), charge)
            context.body_read.set()
            if self.stream:
                async for message in self.handler(request, context):
                    yield message
            else:
                yield await self.handler(request, context)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        context = HttpContext(Request(scope, receive))
        call = observe(self.behavior, self.rpc, context.invocation_metadata(),
                       self.front.metrics)
        answer = asyncio.create_task(self._answer(call, context, send))
        compute = not self.health
        if compute:
            self.front._calls.add(answer)
        gone = asyncio.create_task(_wait_disconnect(context, receive))
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=context.time_remaining(),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():  # the client left, or the deadline passed: cancel the
                context.expired = not done  # call (that stops the job), as gRPC does
                answer.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientDisconnect, OSError):
                await answer
            if context.expired and not context.finished:
                with contextlib.suppress(ClientDisconnect, OSError):
                    await _send_deadline_exceeded(context, send)
        finally:
            gone.cancel()
            if compute:
                self.front._calls.discard(answer)

    async def _answer(self, call: Callable, context: HttpContext, send: Callable) -> None:
        started = False
        messages: list[Message] = []
        try:
            async for message in call(None, context):
                if not self.stream:
                    messages.append(message)
                    continue
                if not started:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
                        *_raw(context.headers())]})
                    started = context.started = True
                kind = message.WhichOneof("kind") or "message"
                await send({"type": "http.response.body", "body": _sse(kind, to_json(message)),
                            "more_body": True})
        except grpc.aio.AbortError:
            if started:
                await send({"type": "http.response.body",
                            "body": _sse("error", context.error()), "more_body": False})
            else:
                error = context.error()
                await _send_json(send, error["error"]["code"], error, context.headers())
            context.finished = True
            return
        except asyncio.CancelledError:
            if started and self.front.draining and not context.expired:  # the grace
                # period ended: say so
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "more_body": False,
                                "body": _sse("error", error_object(
                                    grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN_MESSAGE))})
            raise
        if self.stream:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            message = messages[-1]
            await _send_json(send, self.ok(message), to_json(message), context.headers())
        context.finished = True


async def _send_deadline_exceeded(context: HttpContext, send: Callable) -> None:
    """End a call whose deadline passed: 504 DEADLINE_EXCEEDED, or an ``error`` event when
    its stream had begun."""
    timeout = context.request.headers.get(TIMEOUT_HEADER, "")
    error = error_object(grpc.StatusCode.DEADLINE_EXCEEDED,
                         f"deadline exceeded: the call took longer than its "
                         f"{TIMEOUT_HEADER} of {timeout.strip()}")
    if context.started:
        await send({"type": "http.response.body", "body": _sse("error", error),
                    "more_body": False})
    else:
        context.close_connection = True  # its body may be unread
        await _send_json(send, 504, error, context.headers())
    context.finished = True


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _send_json(send: Callable, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
        *_raw(headers)]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


__all__ = ["HTTP_STATUS", "MAX_HEAD_BYTES", "MAX_TIMEOUT_S", "TIMEOUT_HEADER", "BodyTooLarge",
           "HttpContext", "HttpFront", "body_limit", "error_object", "parse_timeout",
           "to_json"]
