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

Every failed call raises :class:`~gramstyle.client.errors.ServiceError` (status code plus the
server's message); a bad local argument (missing file, unknown option) raises ``ValueError``
or ``TypeError`` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from gramstyle.client import requests
from gramstyle.client.channel import DEFAULT_MAX_MESSAGE_BYTES, normalize_target
from gramstyle.client.channel import channel_options as make_channel_options
from gramstyle.client.errors import ServiceError
from gramstyle.client.types import LossReport, Progress, ServerInfo, StylizeResult
from gramstyle.images import ImageSource
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

#: Sentinel: use the client's default timeout.
DEFAULT = object()


class StylizeStream:
    """A running Stylize call: iterate it for :class:`Progress` messages; afterwards
    :attr:`result` holds the :class:`StylizeResult`. :meth:`cancel` stops the server's
    optimisation within one iteration."""

    def __init__(self, call: Any):
        self._call = call
        self.result: StylizeResult | None = None

    def __iter__(self) -> Iterator[Progress]:
        try:
            for message in self._call:
                if message.HasField("progress"):
                    yield Progress.from_proto(message.progress)
                elif message.HasField("result"):
                    self.result = StylizeResult.from_proto(message.result)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        if self.result is None:
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               "the server ended the stream without a result")

    def wait(self) -> StylizeResult:
        """Consume the remaining progress messages and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> StylizeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


class Client:
    """A connection to one or several gramstyle servers.

    Args:
        target: ``"host:port"``, a gRPC target URI (``"dns:///svc:50051"``), or several
            addresses (a list or comma-separated) balanced round_robin; see
            :mod:`gramstyle.client.channel`.
        timeout: default deadline of each call in seconds (None: no deadline).
        retries: attempts per call on UNAVAILABLE (1 = no retries; at most 5).
        max_message_bytes: send/receive size limit (the server has its own; keep them equal).
        credentials: ``grpc.ChannelCredentials`` for TLS; None for plaintext.
        channel_options: extra gRPC channel arguments.
        metadata: extra metadata sent with each call (e.g. ``[("x-request-id", "...")]``).
    """

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 retries: int = 4, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = ()):
        self.target = normalize_target(target)
        self.timeout = timeout
        self.metadata = tuple(metadata)
        opts = [*make_channel_options(max_message_bytes, retries), *channel_options]
        self.channel = (grpc.secure_channel(self.target, credentials, opts) if credentials
                        else grpc.insecure_channel(self.target, opts))
        self.stub = pb_grpc.StyleTransferStub(self.channel)

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; ServiceError(UNAVAILABLE) after ``timeout``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"no server answered at {self.target} within {timeout} s"
                               ) from None

    def stylize_stream(self, content: Sequence[ImageSource] | ImageSource,
                       style: Sequence[ImageSource] | ImageSource = (),
                       options: Any = None, *, init_image: ImageSource | None = None,
                       preview: bool = False, output_format: str = "png", arch: str = "",
                       weights: str = "", timeout: Any = DEFAULT, **option_values: Any
                       ) -> StylizeStream:
        """Start a Stylize call; iterate the returned stream for progress.

        Args:
            content, style: one image or a sequence (paths, bytes or PIL images).
            options: a ``StyleOptions`` (or any object with its fields) to start from.
            init_image: the start image (implies init='image' unless init is given).
            preview: progress messages carry the current image (``Progress.image``).
            output_format: 'png', 'jpeg' or 'webp' for the result and previews.
            arch, weights: pick one of the server's loaded models (default: its default).
            timeout: deadline in seconds for the whole stream (default: the client's).
            **option_values: any ``StyleOptions`` field (size=256, iterations=100,
                style_layers=[...], ...); None leaves the server default.
        """
        request = requests.stylize_request(
            content, style, options=options, init_image=init_image, preview=preview,
            output_format=output_format, arch=arch, weights=weights, **option_values)
        call = self.stub.Stylize(request, timeout=self._timeout(timeout),
                                 metadata=self.metadata)
        return StylizeStream(call)

    def stylize(self, content: Sequence[ImageSource] | ImageSource,
                style: Sequence[ImageSource] | ImageSource = (), options: Any = None, *,
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
            assert stream.result is not None
            return stream.result

    def compute_losses(self, candidate: ImageSource,
                       content: Sequence[ImageSource] | ImageSource = (),
                       style: Sequence[ImageSource] | ImageSource = (), options: Any = None,
                       *, gradient: bool = False, arch: str = "",
                       weights: str = "", timeout: Any = DEFAULT, **option_values: Any
                       ) -> LossReport:
        """Loss terms of ``candidate`` (and d total / d pixels with ``gradient=True``).

        Option keywords: the loss-related ``StyleOptions`` fields (layers and their weights,
        blend weights, content/style/tv weights, style_scale, precision).
        """
        request = requests.losses_request(candidate, content, style, options=options,
                                          gradient=gradient, arch=arch, weights=weights,
                                          **option_values)
        try:
            response = self.stub.ComputeLosses(request, timeout=self._timeout(timeout),
                                               metadata=self.metadata)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        return LossReport.from_proto(response)

    def server_info(self, *, timeout: Any = DEFAULT) -> ServerInfo:
        """The server's models, layer names, backend, device, limits and version."""
        try:
            response = self.stub.GetServerInfo(pb.GetServerInfoRequest(),
                                               timeout=self._timeout(timeout),
                                               metadata=self.metadata)
        except grpc.RpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
        return ServerInfo.from_proto(response)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

