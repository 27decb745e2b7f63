"""What the sync and async clients share: channel set-up, request building, reading the
answers, errors. Only the calls themselves differ (blocking vs awaited), in
:mod:`gramstyle.client.client` and :mod:`gramstyle.client.aio`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from gramstyle import codec
from gramstyle.client.channel import DEFAULT_MAX_MESSAGE_BYTES, normalize_target
from gramstyle.client.channel import channel_options as make_channel_options
from gramstyle.client.errors import ServiceError
from gramstyle.results import Progress, StylizeResult
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

#: Sentinel: use the client's default timeout.
DEFAULT: Any = object()


class ClientBase:
    """A connection to one or several gramstyle servers (shared by Client and AsyncClient).

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

    #: grpc or grpc.aio: where the channel constructors come from.
    _grpc: Any = grpc

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 retries: int = 4, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 metadata: Sequence[tuple[str, str]] = ()):
        self.target = normalize_target(target)
        self.timeout = timeout
        self.metadata = tuple(metadata)
        opts = [*make_channel_options(max_message_bytes, retries), *channel_options]
        self.channel = (self._grpc.secure_channel(self.target, credentials, opts) if credentials
                        else self._grpc.insecure_channel(self.target, opts))
        self.stub = pb_grpc.StyleTransferServiceStub(self.channel)

    def _call_options(self, timeout: Any) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is DEFAULT else timeout,
                "metadata": self.metadata}

    def _stylize(self, content: Any, style: Any, options: Any, timeout: Any, kwargs: dict):
        """Start the Stylize call (sync or aio, as the stub is)."""
        request = codec.stylize_request(content, style, options=options, **kwargs)
        return self.stub.Stylize(request, **self._call_options(timeout))

    def _compute_losses(self, candidate: Any, content: Any, style: Any, options: Any,
                        timeout: Any, kwargs: dict):
        request = codec.losses_request(candidate, content, style, options=options, **kwargs)
        return self.stub.ComputeLosses(request, **self._call_options(timeout))

    def _server_info(self, timeout: Any):
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), **self._call_options(timeout))


class StreamBase:
    """A running Stylize call: progress messages as they come, then :attr:`result`."""

    def __init__(self, call: Any):
        self._call = call
        self.result: StylizeResult | None = None

    def _accept(self, message: pb.StylizeResponse) -> Progress | None:
        """A progress message, or None after storing the result."""
        if message.HasField("progress"):
            return codec.progress_from(message.progress)
        self.result = codec.result_from(message.result)
        return None

    def _finished(self) -> None:
        if self.result is None:
            raise ServiceError(grpc.StatusCode.INTERNAL,
                               "the server ended the stream without a result")

    def cancel(self) -> None:
        """Stop the call; the server stops the optimisation within one iteration."""
        self._call.cancel()
