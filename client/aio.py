"""The asyncio client (grpc.aio), with the same methods as the sync :class:`Client`.

    from gramstyle.client import AsyncClient

    async with AsyncClient("localhost:50051") as client:
        result = await client.stylize("cat.png", "starry.jpg", size=256)

        stream = client.stylize_stream("cat.png", "starry.jpg", size=256)
        async for p in stream:
            print(p.iteration, p.losses.total)
        print(stream.result.width, stream.result.height)

The channel is created in the running event loop, so construct the client inside it.
Request building, answers and errors are shared with the sync client
(:mod:`gramstyle.client.base`).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from gramstyle import codec
from gramstyle.client.base import DEFAULT, Attempts, ClientBase, StreamBase
from gramstyle.results import LossReport, Progress, ServerInfo, StylizeResult


class AsyncStylizeStream(StreamBase):
    """A running Stylize call: ``async for`` it for :class:`Progress`; afterwards
    :attr:`result` holds the :class:`StylizeResult`."""

    async def __aiter__(self) -> AsyncIterator[Progress]:
        while True:
            try:
                async for message in self._call:
                    progress = self._accept(message)
                    if progress is not None:
                        yield progress
                break
            except grpc.RpcError as exc:
                if self.result is not None:
                    break  # the whole result arrived; only the status was lost
                delay = self._attempts.after_failure(exc)  # raises when it must fail
            await asyncio.sleep(delay)
            self._restart()
        self._finished()

    async def wait(self) -> StylizeResult:
        async for _ in self:
            pass
        return self.result

    async def __aenter__(self) -> AsyncStylizeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


class AsyncClient(ClientBase):
    """Asyncio twin of :class:`gramstyle.client.Client`; same arguments and methods.

    Create it inside the running event loop (in an async function run by ``asyncio.run``),
    and use it in that loop only: its grpc.aio channel belongs to the loop that creates it.
    Elsewhere it raises ``RuntimeError`` saying so, instead of grpc's "Future ... attached to
    a different loop"."""

    _grpc = grpc.aio

    def __init__(self, *args: Any, **kwargs: Any):
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncClient: create it inside the running event loop, e.g. `async with "
                "AsyncClient(...) as client:` in an async function run by asyncio.run(); its "
                "grpc.aio channel belongs to the loop that creates it") from None
        super().__init__(*args, **kwargs)

    def _check_loop(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError(
                "AsyncClient: called outside the event loop it was created in (a second "
                "asyncio.run(), another thread's loop); its grpc.aio channel belongs to that "
                "loop: create one client in each loop")

    def stylize_stream(self, content: Any, style: Any = (), options: Any = None, *,
                       timeout: Any = DEFAULT, **kwargs: Any) -> AsyncStylizeStream:
        """Start a Stylize call (see ``Client.stylize_stream``)."""
        self._check_loop()
        return AsyncStylizeStream(self._stylize(content, style, options, timeout, kwargs))

    @staticmethod
    async def _unary(attempts: Attempts) -> Any:
        """Run a unary call, repeating it on UNAVAILABLE within the retry budget."""
        while True:
            try:
                return await attempts.start()
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.after_failure(exc))  # raises when it must fail

    async def stylize(self, content: Any, style: Any = (), options: Any = None, *,
                      progress: Callable[[Progress], Awaitable[None] | None] | None = None,
                      **kwargs: Any) -> StylizeResult:
        """Run Stylize to the end; ``progress`` (sync or async) gets each message."""
        async with self.stylize_stream(content, style, options, **kwargs) as stream:
            async for message in stream:
                if progress is not None:
                    outcome = progress(message)
                    if inspect.isawaitable(outcome):
                        await outcome
            return stream.result

    async def compute_losses(self, candidate: Any, content: Any = (), style: Any = (),
                             options: Any = None, *, timeout: Any = DEFAULT, **kwargs: Any
                             ) -> LossReport:
        """Loss terms of ``candidate`` (see ``Client.compute_losses``)."""
        self._check_loop()
        attempts = self._compute_losses(candidate, content, style, options, timeout, kwargs)
        return codec.loss_report_from(await self._unary(attempts))

    async def server_info(self, *, timeout: Any = DEFAULT) -> ServerInfo:
        """The server's models, layer names, backend, device, limits and version."""
        self._check_loop()
        return codec.server_info_from(await self._unary(self._server_info(timeout)))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
