"""The synchronous client.

    from gramstyle.client import Client

    with Client("localhost:50051", timeout=600) as client:
        result = client.stylize("cat.png", "starry.jpg", size=256, iterations=100,
                                progress=lambda p: print(p.iteration, p.losses.total))
        result.save("out.png")

        # or as an iterator of progress messages:
        stream = client.stylize_stream("cat.png", "starry.jpg", size=256)
        for p in stream:
            print(p.iteration, p.losses.total)
        stream.result.image.show()

Every failed call raises :class:`~gramstyle.client.errors.ServiceError` (status code, the
server's message and the rejected fields); a bad local argument (missing file, unknown
option) raises ``ValueError`` or ``TypeError`` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gramstyle import codec
from gramstyle.client.base import DEFAULT, ClientBase, StreamBase
from gramstyle.client.errors import ServiceError
from gramstyle.results import LossReport, Progress, ServerInfo, StylizeResult


class StylizeStream(StreamBase):
    """A running Stylize call: iterate it for :class:`Progress` messages; afterwards
    :attr:`result` holds the :class:`StylizeResult`. :meth:`cancel` stops the server's
    optimisation within one iteration."""

    def __iter__(self) -> Iterator[Progress]:
        try:
            for message in self._call:
                progress = self._accept(message)
                if progress is not None:
                    yield progress
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        self._finished()

    def wait(self) -> StylizeResult:
        """Consume the remaining progress messages and return the result."""
        for _ in self:
            pass
        return self.result

    def __enter__(self) -> StylizeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


class Client(ClientBase):
    __doc__ = ClientBase.__doc__

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; ServiceError(UNAVAILABLE) after ``timeout``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"no server answered at {self.target} within {timeout} s"
                               ) from None

    def stylize_stream(self, content: Any, style: Any = (), options: Any = None, *,
                       timeout: Any = DEFAULT, **kwargs: Any) -> StylizeStream:
        """Start a Stylize call; iterate the returned stream for progress.

        Args:
            content, style: one image or a sequence (paths, bytes or PIL images).
            options: a ``StyleOptions`` (or any object with its fields) to start from.
            timeout: deadline in seconds for the whole stream (default: the client's).
            **kwargs: any ``StyleOptions`` field (size=256, iterations=100,
                style_layers=[...], ...; None leaves the server default), and
                init_image (the start image), preview (progress carries the current image),
                output_format ('png', 'jpeg' or 'webp'), arch and weights (one of the
                server's loaded models; default: its default).
        """
        return StylizeStream(self._stylize(content, style, options, timeout, kwargs))

    def stylize(self, content: Any, style: Any = (), options: Any = None, *,
                progress: Callable[[Progress], None] | None = None, **kwargs: Any
                ) -> StylizeResult:
        """Run Stylize to the end and return the result; ``progress`` gets each message.

        Takes the same arguments as :meth:`stylize_stream`. If ``progress`` raises, the call
        is cancelled (the server stops) and the exception propagates.
        """
        with self.stylize_stream(content, style, options, **kwargs) as stream:
            for message in stream:
                if progress is not None:
                    progress(message)
            return stream.result

    def compute_losses(self, candidate: Any, content: Any = (), style: Any = (),
                       options: Any = None, *, timeout: Any = DEFAULT, **kwargs: Any
                       ) -> LossReport:
        """Loss terms of ``candidate`` (and d total / d pixels with ``gradient=True``).

        Keywords: the loss options of ``StyleOptions`` (layers and their weights, blend
        weights, loss weights, style image scale, precision), gradient, arch, weights.
        """
        try:
            response = self._compute_losses(candidate, content, style, options, timeout,
                                            kwargs)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        return codec.loss_report_from(response)

    def server_info(self, *, timeout: Any = DEFAULT) -> ServerInfo:
        """The server's models, layer names, backend, device, limits and version."""
        try:
            return codec.server_info_from(self._server_info(timeout))
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
