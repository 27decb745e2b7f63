"""A budget for the request messages in flight: bytes being received, and the parsed
requests of every call until it ends (issue 18, item 1).

Why: grpc.aio reads a unary request's whole message (up to ``grpc.max_receive_message_length``)
and parses it *before* the handler runs -- before the token, the memory estimate or the
queue is looked at. Forty callers sending 60 MiB each, or withholding the last byte, held
gigabytes, with no limit in time.

How: :class:`MessageBudgetInterceptor` turns every method with a single request message into
a *request-streaming* one (the client does not notice: it sends one message and half-closes,
as before). For such a method grpc.aio reads nothing until the handler asks, and HTTP/2 flow
control stops the client after the stream's window (measured: about 5 MiB per stream on
loopback with BDP probing). The handler then:

1. reserves ``max_message_bytes * RECEIVE_FACTOR`` of the budget (the largest message the
   server accepts, while gRPC's slices, the assembled bytes and the parse all exist), waiting in
   arrival order -- a small message is read in milliseconds, so a burst only queues briefly;
2. reads the message, which must have arrived within ``arrival_timeout_s`` of the call's start
   (waiting for the budget included): a caller that withholds its last byte is cut off with
   DEADLINE_EXCEEDED "request message did not arrive within N s", and one that cannot get
   budget in that time is refused with RESOURCE_EXHAUSTED;
3. shrinks the reservation to ``RECEIVE_FACTOR`` times the parsed request's size (the request,
   and the copies of its images the header probe and the job take), held until the call
   ends -- while it waits in the work queue or runs -- so queued requests' messages count
   too. When a large one ends, the freed heap is given back to the system
   (:func:`gramstyle.server.allocator.trim_soon`).

An unauthenticated call is refused before step 1 (see security._abort_handler): its message
is never read.

Bound: request messages hold at most ``budget`` bytes, plus about one HTTP/2 stream window
per open stream not yet reading (flow control), plus nothing for compressed requests, which the
server refuses (``grpc.compression_enabled_algorithms_bitset``: identity only) before reading
them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gramstyle.errors import FieldError
from gramstyle.server.allocator import trim_soon

#: Bytes a message costs while it is received, per byte of the largest accepted message:
#: gRPC's received slices and the assembled bytes (1.7 x measured on grpcio 1.85), then the
#: bytes and the parsed message, whose arena grows by doubling.
RECEIVE_FACTOR = 3
#: A call that held this many bytes or more asks for the freed heap to be trimmed.
TRIM_BYTES = 8 * 2**20
#: Default seconds a request message may take to arrive (from the start of the call).
DEFAULT_ARRIVAL_TIMEOUT_S = 30.0
#: Default share of the memory budget that request messages in flight may hold besides it
#: (``--message-budget``; at least two of the largest messages).
MESSAGE_BUDGET_SHARE = 0.25


def default_message_budget(memory_budget: int, max_message_bytes: int) -> int:
    """The default ``--message-budget``: ``MESSAGE_BUDGET_SHARE`` of the memory budget, and
    room to receive at least two of the largest messages at once."""
    return max(int(MESSAGE_BUDGET_SHARE * memory_budget),
               2 * RECEIVE_FACTOR * max_message_bytes)


class MessageBudget:
    """Bytes of request messages in flight, shared by every call on one event loop.

    Args:
        limit: bytes the reservations may add up to (> 0).
        max_message_bytes: the largest message the server accepts; a receipt reserves
            ``RECEIVE_FACTOR`` times it (at most ``limit``).
        arrival_timeout_s: seconds from a call's start within which its message must have
            arrived, the wait for budget included.
        on_change: called with the bytes reserved after every change (a metrics gauge).
    """

    def __init__(self, limit: int, max_message_bytes: int,
                 arrival_timeout_s: float = DEFAULT_ARRIVAL_TIMEOUT_S,
                 on_change: Callable[[int], None] | None = None):
        if limit <= 0:
            raise FieldError("message_budget", f"must be > 0 bytes, got {limit}")
        if not arrival_timeout_s > 0:
            raise FieldError("message_timeout", f"must be > 0 s, got {arrival_timeout_s}")
        self.limit = limit
        self.receipt = min(limit, RECEIVE_FACTOR * max_message_bytes)
        self.arrival_timeout_s = arrival_timeout_s
        self._on_change = on_change
        self.reserved = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    def _fits(self) -> bool:
        return self.reserved + self.receipt <= self.limit

    def _change(self, delta: int) -> None:
        self.reserved += delta
        if self._on_change is not None:
            self._on_change(self.reserved)
        if delta < 0:
            self._wake()

    def _wake(self) -> None:
        """Hand free room to the waiters, first come first served (reserved for them here,
        so that nobody can take it between the wake-up and the waiter's resumption)."""
        while self._waiters and self._fits():
            waiter = self._waiters.popleft()
            if waiter.done():  # it left: timed out or cancelled
                continue
            self._change(self.receipt)
            waiter.set_result(None)

    async def _acquire(self) -> None:
        """Reserve one receipt, in arrival order (wait while the budget is full)."""
        if not self._waiters and self._fits():
            self._change(self.receipt)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # woken, then cancelled: give back
                self._change(-self.receipt)
            raise

    async def _end_of_stream(self, requests: AsyncIterator[Any], context: Any,
                             deadline: float) -> None:
        """Read the caller's half-close after its one message (a unary client sends it with
        the message). Why: grpc.aio's request iterator is a generator suspended at the
        ``yield`` of the message it handed out, and it keeps that message -- up to the
        message limit -- alive from C-level call state long after the call ended (measured:
        16 refused 60 MiB requests held +1.2 GiB for over 30 s). Run to its end, the
        generator drops it. A second message is a protocol violation."""
        try:
            extra = await asyncio.wait_for(
                anext(requests), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:  # noqa: UP041 -- Python 3.10
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request stream not closed within {self.arrival_timeout_s:g} s of its start "
                f"(the server's --message-timeout); a unary call sends one message")
        del extra
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            "request: a unary call carries exactly one request message")

    @contextlib.asynccontextmanager
    async def receive(self, requests: AsyncIterator[Any], context: Any
                      ) -> AsyncIterator[Any]:
        """Read the one request of ``requests`` within the budget and the arrival time;
        yields it, holding its size until the block ends. Aborts the call (RESOURCE_EXHAUSTED,
        DEADLINE_EXCEEDED) when the budget or the time runs out."""
        deadline = time.monotonic() + self.arrival_timeout_s
        try:
            await asyncio.wait_for(self._acquire(), self.arrival_timeout_s)
        except asyncio.TimeoutError:  # noqa: UP041 -- Python 3.10
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: request messages in flight fill the message budget of "
                f"{self.limit / 2**20:.0f} MiB for {self.arrival_timeout_s:g} s; retry later")
        held = self.receipt
        try:
            try:
                request = await asyncio.wait_for(
                    anext(requests), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                request = None
            except asyncio.TimeoutError:  # noqa: UP041 -- Python 3.10
                request = None
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"request message did not arrive within {self.arrival_timeout_s:g} s "
                    f"(the server's --message-timeout)")
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "request: the call ended before its request message")
            await self._end_of_stream(requests, context, deadline)
            size = RECEIVE_FACTOR * request.ByteSize() if hasattr(request, "ByteSize") else 0
            self._change(size - held)  # the receipt's buffers are gone; the request stays
            held = size
            yield request
        finally:
            self._change(-held)
            if held >= TRIM_BYTES:
                trim_soon()


def _single(behavior: Callable, budget: MessageBudget, streaming_response: bool) -> Callable:
    """A request-streaming behavior that reads one message within ``budget`` and hands it
    to the unary-request ``behavior``."""
    if streaming_response and inspect.isasyncgenfunction(behavior):
        async def stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async with budget.receive(requests, context) as request:
                async for response in behavior(request, context):
                    yield response
        return stream

    # A unary response, or a streaming one written with context.write (health's Watch).
    async def unary(requests: AsyncIterator[Any], context: Any) -> Any:
        async with budget.receive(requests, context) as request:
            result = behavior(request, context)
            return await result if isinstance(result, Awaitable) else result
    return unary


#: Methods read within the separate health budget: probes must not wait for large uploads.
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class MessageBudgetInterceptor(grpc.aio.ServerInterceptor):
    """Receive every single-message request within a :class:`MessageBudget` (see the
    module docstring). Put it last (innermost), after the token check.

    Health checks use ``health_budget`` (default: ``budget``), so that large uploads filling
    the main budget never hold up a probe; their own legitimate messages are a few bytes."""

    def __init__(self, budget: MessageBudget, health_budget: MessageBudget | None = None):
        self.budget = budget
        self.health_budget = health_budget or budget

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler | None]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        budget = self.health_budget if method.startswith(HEALTH_PREFIX) else self.budget
        if handler.unary_stream is not None:
            return handler._replace(
                request_streaming=True, unary_stream=None,
                stream_stream=_single(handler.unary_stream, budget, True))
        return handler._replace(
            request_streaming=True, unary_unary=None,
            stream_unary=_single(handler.unary_unary, budget, False))


__all__ = ["DEFAULT_ARRIVAL_TIMEOUT_S", "MESSAGE_BUDGET_SHARE", "RECEIVE_FACTOR", "MessageBudget",
           "MessageBudgetInterceptor", "default_message_budget"]
