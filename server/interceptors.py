"""Per-request observability: one log line and one metrics sample for every RPC.

The interceptor wraps every handler (ours, health and reflection) and, when the call ends,
logs ``request_id rpc code duration`` and records ``gramstyle_requests_total{rpc,code}`` and
the duration histogram. The request id is the caller's ``x-request-id`` metadata when it sent
one (so ids follow a request across services), or a fresh one; it is sent back as initial
metadata and is available to handlers through :func:`current_request_id`.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gramstyle.server.metrics import Metrics

log = logging.getLogger("gramstyle.server.requests")

REQUEST_ID_KEY = "x-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    """The id of the request being handled on this thread ('-' outside a request)."""
    return _request_id.get()


def _final_code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    """The status the call ends with, as far as the server can tell."""
    code = context.code()
    if code is not None:
        return code
    if not context.is_active():
        # The handler returned because the caller went away (see service.py).
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _reset(token: contextvars.Token) -> None:
    try:
        _request_id.reset(token)
    except ValueError:  # a stream closed from another thread (garbage collection)
        pass


class RequestLogInterceptor(grpc.ServerInterceptor):
    """Log and count every RPC. ``metrics`` may be None (logging only)."""

    def __init__(self, metrics: Metrics | None = None):
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        rpc = handler_call_details.method.lstrip("/")
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = str(metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex[:16])[:64]

        def done(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            seconds = time.perf_counter() - start
            code = _final_code(context, failed).name
            log.info("request_id=%s rpc=%s code=%s duration_ms=%.1f peer=%s",
                     request_id, rpc, code, seconds * 1000, context.peer())
            if self._metrics is not None:
                self._metrics.observe_request(rpc, code, seconds)

        def begin(context: grpc.ServicerContext) -> tuple[float, contextvars.Token]:
            context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            return time.perf_counter(), _request_id.set(request_id)

        def unary_response(behavior: Callable) -> Callable:
            def wrapper(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                start, token = begin(context)
                failed = True
                try:
                    response = behavior(request_or_iterator, context)
                    failed = False
                    return response
                finally:
                    _reset(token)
                    done(context, start, failed)
            return wrapper

        def stream_response(behavior: Callable) -> Callable:
            def wrapper(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator:
                start, token = begin(context)
                failed = True
                try:
                    # Iterate here, not by returning the generator, so that the log line is
                    # written when the stream ends rather than when it starts.
                    yield from behavior(request_or_iterator, context)
                    failed = False
                except GeneratorExit:  # gRPC closed the stream: the caller went away
                    failed = False
                    raise
                finally:
                    _reset(token)
                    done(context, start, failed)
            return wrapper

        def non_blocking(behavior: Callable) -> Callable:
            # Health's Watch answers through a callback instead of a generator, so that an
            # open Watch stream holds no thread of the server's pool. Keep it that way: pass
            # the callback on, copy the markers gRPC looks for, and log when the call ends.
            def wrapper(request: Any, context: grpc.ServicerContext,
                        send_response_callback: Callable | None = None) -> Any:
                start, token = begin(context)
                context.add_callback(lambda: done(context, start, False))
                try:
                    return behavior(request, context,
                                    send_response_callback=send_response_callback)
                finally:
                    _reset(token)
            wrapper.experimental_non_blocking = True  # type: ignore[attr-defined]
            wrapper.experimental_thread_pool = getattr(  # type: ignore[attr-defined]
                behavior, "experimental_thread_pool", None)
            return wrapper

        if handler.unary_stream and getattr(handler.unary_stream, "experimental_non_blocking",
                                            False):
            return handler._replace(unary_stream=non_blocking(handler.unary_stream))
        if handler.unary_unary:
            return handler._replace(unary_unary=unary_response(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary_response(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=stream_response(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=stream_response(handler.stream_stream))
        return handler
