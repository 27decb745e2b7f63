"""Per-request observability and input hygiene, for every RPC of the (asyncio) server.

:class:`RequestLogInterceptor` wraps every handler -- ours, health and reflection -- and:

- **parses requests itself**: each handler's request deserializer is replaced by one that
  never raises. Bytes that are not a valid message (or not valid UTF-8 in a string field)
  end the call with INVALID_ARGUMENT "request is not a valid gramstyle.v1.StylizeRequest",
  counted and logged like any other call, where grpcio would answer INTERNAL "Exception
  deserializing request!" and log a traceback per call;
- **turns unexpected exceptions into INTERNAL** (with the traceback logged once): a handler
  bug never reaches the caller as UNKNOWN;
- **logs one line per call** when it ends -- ``request_id rpc code duration_ms peer`` plus,
  for a failed call, its status message -- as ``key=value`` text or as one JSON object per
  line (``gramstyle serve --log-format json``, :class:`JsonFormatter`). Values that are not
  plain tokens are quoted and escaped, so no client-controlled text can forge a field;
- **counts** ``gramstyle_requests_total{rpc,code}`` and the duration histogram.

The request id is the caller's ``x-request-id`` metadata when it is 1 to 64 characters of
``[A-Za-z0-9._:-]`` (so ids follow a request across services), otherwise a fresh one, and
the rejected value is logged, escaped, as ``rejected_request_id``. It is sent back as initial
metadata and is available to handlers through :func:`current_request_id`.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gramstyle.errors import MalformedRequest  # re-exported here
from gramstyle.server.metrics import Metrics

log = logging.getLogger("gramstyle.server.requests")

REQUEST_ID_KEY = "x-request-id"
#: What a caller's request id may look like; anything else is replaced.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Longest status message or rejected id written to the log (characters).
_LOG_PREVIEW = 1024

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_PLAIN = re.compile(r"[A-Za-z0-9._:/@\[\]+%-]+")


#: A call cancelled this close to its deadline (s) ended because of the deadline: the
#: caller's own timer fires first and cancels the stream a moment before the server's does.
DEADLINE_SLACK_S = 0.5


def deadline_passed(context: Any) -> bool:
    """Whether a call that ended early did so because of its deadline (else: a cancel)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def current_request_id() -> str:
    """The id of the request being handled in this task ('-' outside a request)."""
    return _request_id.get()


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None
                       ) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message.full_name if message is not None else "request message"

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 -- DecodeError, RecursionError, ...: the caller's bytes
            return MalformedRequest(f"request is not a valid {name} ({len(raw)} bytes)")
    return parse


def _token(value: Any) -> str:
    """A log value: as it is when it is a plain token, else quoted and escaped (JSON)."""
    text = value if isinstance(value, str) else str(value)
    if _PLAIN.fullmatch(text):
        return text
    if len(text) > _LOG_PREVIEW:
        text = f"{text[:_LOG_PREVIEW]}… ({len(text)} chars)"
    return json.dumps(text)


def format_fields(fields: dict[str, Any]) -> str:
    """``key=value`` pairs, each value a plain token or a quoted, escaped string."""
    return " ".join(f"{key}={_token(value)}" for key, value in fields.items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, and either the request's fields or
    ``message`` (plus ``exception`` with the traceback, escaped into the one line)."""

    def format(self, record: logging.LogRecord) -> str:
        utc = datetime.timezone.utc  # noqa: UP017 -- datetime.UTC is Python 3.11+
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _code(context: Any) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return _CODES.get(int(code), grpc.StatusCode.UNKNOWN)


class _Call:
    """One call's request id, clock and end-of-call bookkeeping."""

    def __init__(self, interceptor: RequestLogInterceptor, rpc: str, metadata: Any):
        sent = None
        for key, value in metadata or ():
            if key == REQUEST_ID_KEY:
                sent = value if isinstance(value, str) else repr(value)
        self.rejected = None
        if sent is not None and REQUEST_ID_PATTERN.fullmatch(sent):
            self.request_id = sent
        else:
            self.request_id = uuid.uuid4().hex[:16]
            self.rejected = sent
        self.interceptor, self.rpc = interceptor, rpc
        self.start = time.perf_counter()
        self.peer = ""
        self.token: contextvars.Token | None = None

    async def begin(self, context: Any) -> None:
        self.start = time.perf_counter()
        # Read now: once a cancelled call is torn down, grpc.aio's peer() dereferences a
        # freed call (a segfault in grpcio 1.85).
        self.peer = context.peer()
        self.token = _request_id.set(self.request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))

    def end(self, context: Any, cancelled: bool) -> None:
        if self.token is not None:
            try:
                _request_id.reset(self.token)
            except ValueError:  # finalised in another context (an abandoned stream)
                pass
            self.token = None
        seconds = time.perf_counter() - self.start
        code = _code(context)
        if cancelled:
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context)
                    else grpc.StatusCode.CANCELLED)
        code = code or grpc.StatusCode.OK
        fields: dict[str, Any] = {"request_id": self.request_id, "rpc": self.rpc,
                                  "code": code.name, "duration_ms": round(seconds * 1000, 1),
                                  "peer": self.peer}
        if self.rejected is not None:
            fields["rejected_request_id"] = self.rejected
        if code is not grpc.StatusCode.OK and not cancelled and context.details():
            fields["message"] = context.details()
        log.info(format_fields(fields), extra={"fields": fields})
        if self.interceptor.metrics is not None:
            self.interceptor.metrics.observe_request(self.rpc, code.name, seconds)


async def _malformed_abort(context: Any, request: MalformedRequest) -> None:
    # The code from the one table (status imports this module, hence the late import).
    from gramstyle.server.status import code_of

    await context.abort(code_of(request), str(request))


async def _internal(context: Any, call: _Call, exc: BaseException) -> None:
    log.error("request_id=%s rpc=%s internal error", call.request_id, call.rpc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error (request id {call.request_id}); see the server log")


def _forgotten(exc: grpc.aio.AbortError) -> grpc.aio.AbortError:
    """``exc`` without its traceback and the exception it was raised during. grpc.aio keeps
    an abort's exception on the call's state, and the call's context is a local of the
    frames in that traceback: a cycle that kept each refused request (up to the message
    limit) alive until a full garbage collection. Without the frames -- and the handler's
    own ImageError, whose traceback holds the closure that read the request -- nothing of
    the request is reachable from the call."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


async def _checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """A request stream whose malformed messages end the call."""
    async for request in requests:
        if isinstance(request, MalformedRequest):
            await _malformed_abort(context, request)
        yield request


def _wrap(behavior: Callable, call_of: Callable[[], _Call], streaming_request: bool
          ) -> Callable:
    """``behavior`` (a coroutine function or an async generator function) with the request
    checks, the error mapping and the end-of-call log around it."""

    def first(request: Any, context: Any) -> Any:
        return _checked(request, context) if streaming_request else request

    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            call = call_of()
            await call.begin(context)
            cancelled = False
            try:
                if isinstance(request, MalformedRequest):
                    await _malformed_abort(context, request)
                async for response in behavior(first(request, context), context):
                    yield response
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: the stream was closed at a `yield` because the caller left
                # (deadline or cancel) -- not a success.
                cancelled = True
                raise
            except grpc.aio.AbortError as exc:
                request = None  # this frame is in the abort's traceback
                raise _forgotten(exc) from None
            except Exception as exc:  # noqa: BLE001 -- a bug: INTERNAL, logged once
                await _internal(context, call, exc)
            finally:
                call.end(context, cancelled)
        return stream

    async def unary(request: Any, context: Any) -> Any:
        call = call_of()
        await call.begin(context)
        cancelled = False
        try:
            if isinstance(request, MalformedRequest):
                await _malformed_abort(context, request)
            result = behavior(first(request, context), context)
            return await result if isinstance(result, Awaitable) else result
        except asyncio.CancelledError:
            cancelled = True
            raise
        except grpc.aio.AbortError as exc:
            request = None  # this frame is in the abort's traceback
            raise _forgotten(exc) from None
        except Exception as exc:  # noqa: BLE001 -- a bug: INTERNAL, logged once
            await _internal(context, call, exc)
        finally:
            call.end(context, cancelled)
    return unary


def observe(behavior: Callable, rpc: str, metadata: Any, metrics: Metrics | None
            ) -> Callable:
    """``behavior`` (a handler: a coroutine or async generator function of (request,
    context)) with what :class:`RequestLogInterceptor` adds to every RPC -- request id, one
    log line, metrics under ``rpc``, INTERNAL for a bug -- for calls that do not come through
    gRPC (the HTTP front, :mod:`gramstyle.server.http`). ``context`` must implement the part
    of ``grpc.aio.ServicerContext`` used here: abort, code, details, peer,
    send_initial_metadata and time_remaining."""
    interceptor = RequestLogInterceptor(metrics)
    return _wrap(behavior, lambda: _Call(interceptor, rpc, metadata), False)


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    """Log, count and guard every RPC (see the module docstring). ``metrics`` may be None
    (logging only)."""

    def __init__(self, metrics: Metrics | None = None):
        self.metrics = metrics

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        rpc = (method.decode() if isinstance(method, bytes) else method).lstrip("/")
        metadata = handler_call_details.invocation_metadata

        def call_of() -> _Call:
            return _Call(self, rpc, metadata)

        replaced: dict[str, Any] = {
            "request_deserializer": _safe_deserializer(handler.request_deserializer)}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                replaced[kind] = _wrap(behavior, call_of, kind.startswith("stream"))
        return handler._replace(**replaced)


__all__ = ["DEADLINE_SLACK_S", "REQUEST_ID_KEY", "REQUEST_ID_PATTERN", "JsonFormatter",
           "MalformedRequest", "RequestLogInterceptor", "current_request_id", "deadline_passed",
           "format_fields", "observe"]
