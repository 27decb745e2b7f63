"""The torch-free client library for the gramstyle gRPC service (the CLI is :mod:`gramstyle.cli`).

    from gramstyle.client import Client
    with Client("localhost:50051") as client:
        result = client.stylize("cat.png", "starry.jpg", size=256, iterations=100)
        result.save("out.png")

- :class:`Client` (sync) and :class:`AsyncClient` (grpc.aio): ``stylize``,
  ``stylize_stream``, ``compute_losses``, ``server_info``;
- results: :class:`StylizeResult`, :class:`Progress`, :class:`LossReport`,
  :class:`ServerInfo` -- the same types the in-process engine returns (gramstyle.results);
- errors: :class:`ServiceError` (``.code`` is a ``grpc.StatusCode``, ``.message`` the
  server's message naming the bad field, ``.violations`` the rejected fields);
- production: ``tls=True`` / ``tls_ca=`` / ``tls_cert=`` + ``tls_key=`` (mutual TLS),
  ``token=`` (bearer), and ``retries=`` (default 2): a call whose server fails with
  UNAVAILABLE, even mid-stream, is repeated from the start on another replica, and
  ``Progress.attempt`` says so (docs/deploy.md);
- deadlines: every call has one, ``timeout=`` seconds on the client or the call; unset, a
  deadline per RPC that fits a CPU run (:data:`DEFAULT_TIMEOUTS`: Stylize 30 min,
  ComputeLosses 10 min, GetServerInfo 30 s); ``timeout=None``: none.

Needs only the base install (grpcio, protobuf, pillow, tqdm): no torch, no numpy.
"""

from gramstyle.client.aio import AsyncClient, AsyncStylizeStream
from gramstyle.client.base import DEFAULT_TIMEOUTS
from gramstyle.client.client import Client, StylizeStream
from gramstyle.client.errors import CALLER_MISTAKES, FieldViolation, ServiceError
from gramstyle.options import StyleOptions
from gramstyle.results import (
    Losses,
    LossReport,
    ModelInfo,
    Progress,
    ServerInfo,
    StylizeResult,
)

__all__ = [
    "CALLER_MISTAKES",
    "DEFAULT_TIMEOUTS",
    "AsyncClient",
    "AsyncStylizeStream",
    "Client",
    "FieldViolation",
    "LossReport",
    "Losses",
    "ModelInfo",
    "Progress",
    "ServerInfo",
    "ServiceError",
    "StyleOptions",
    "StylizeResult",
    "StylizeStream",
]
