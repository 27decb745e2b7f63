"""The asyncio client (grpc.aio), with the same methods as the sync :class:`Client`.

    from gramstyle.client import AsyncClient

    async with AsyncClient("localhost:50051") as client:
        result = await client.stylize("cat.png", "starry.jpg", size=256)

        stream = client.stylize_stream("cat.png", "starry.jpg", size=256)
        async for p in stream:
            print(p.iteration, p.losses.total)
        print(stream.result.width, stream.result.height)

The channel is created in the running event loop, so construct the client inside it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from gramstyle.client import requests
from gramstyle.client.channel import DEFAULT_MAX_MESSAGE_BYTES, normalize_target
from gramstyle.client.channel import channel_options as make_channel_options
from gramstyle.client.client import DEFAULT
from gramstyle.client.errors import ServiceError
from gramstyle.client.types import LossReport, Progress, ServerInfo, StylizeResult
from gramstyle.images import ImageSource
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc


class AsyncStylizeStream:
    """A running Stylize call: ``async for`` it for :class:`Progress`; afterwards
    :attr:`result` holds the :class:`StylizeResult`."""

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        self._call = call
        self.result: StylizeResult | None = None

    async def __aiter__(self) -> AsyncIterator[Progress]:
        try:
            async for message in self._call:
                if message.HasField("progress"):
                    yield Progress.from_proto(message.progress)
                elif message.HasField("result"):
                    self.result = StylizeResult.from_proto(message.result)
        except grpc.aio.AioRpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        if self.result is None:
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               "the server ended the stream without a result")

    async def wait(self) -> StylizeResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncStylizeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


class AsyncClient:
    """Asyncio twin of :class:`gramstyle.client.Client`; same arguments."""

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 retries: int = 4, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = ()):
        self.target = normalize_target(target)
        self.timeout = timeout
        self.metadata = tuple(metadata)
        opts = [*make_channel_options(max_message_bytes, retries), *channel_options]
        self.channel = (grpc.aio.secure_channel(self.target, credentials, opts) if credentials
                        else grpc.aio.insecure_channel(self.target, opts))
        self.stub = pb_grpc.StyleTransferStub(self.channel)

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    def stylize_stream(self, content: Sequence[ImageSource] | ImageSource,
                       style: Sequence[ImageSource] | ImageSource = (),
                       options: Any = None, *, init_image: ImageSource | None = None,
                       preview: bool = False, output_format: str = "png", arch: str = "",
                       weights: str = "", timeout: Any = DEFAULT, **option_values: Any
                       ) -> AsyncStylizeStream:
        """Start a Stylize call (see ``Client.stylize_stream``)."""
        request = requests.stylize_request(
            content, style, options=options, init_image=init_image, preview=preview,
            output_format=output_format, arch=arch, weights=weights, **option_values)
        call = self.stub.Stylize(request, timeout=self._timeout(timeout),
                                 metadata=self.metadata)
        return AsyncStylizeStream(call)

    async def stylize(self, content: Sequence[ImageSource] | ImageSource,
                      style: Sequence[ImageSource] | ImageSource = (), options: Any = None,
                      *, progress: Callable[[Progress], Awaitable[None] | None] | None = None,
                      **kwargs: Any) -> StylizeResult:
        """Run Stylize to the end; ``progress`` (sync or async) gets each message."""
        async with self.stylize_stream(content, style, options, **kwargs) as stream:
            async for message in stream:
                if progress is not None:
                    outcome = progress(message)
                    if inspect.isawaitable(outcome):
                        await outcome
            assert stream.result is not None
            return stream.result

    async def compute_losses(self, candidate: ImageSource,
                             content: Sequence[ImageSource] | ImageSource = (),
                             style: Sequence[ImageSource] | ImageSource = (),
                             options: Any = None, *, gradient: bool = False, arch: str = "",
                             weights: str = "", timeout: Any = DEFAULT, **option_values: Any
                             ) -> LossReport:
        """Loss terms of ``candidate`` (see ``Client.compute_losses``)."""
        request = requests.losses_request(candidate, content, style, options=options,
                                          gradient=gradient, arch=arch, weights=weights,
                                          **option_values)
        try:
            response = await self.stub.ComputeLosses(request, timeout=self._timeout(timeout),
                                                     metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        return LossReport.from_proto(response)

    async def server_info(self, *, timeout: Any = DEFAULT) -> ServerInfo:
        try:
            response = await self.stub.GetServerInfo(pb.GetServerInfoRequest(),
                                                     timeout=self._timeout(timeout),
                                                     metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        return ServerInfo.from_proto(response)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
