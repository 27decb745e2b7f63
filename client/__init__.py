"""The torch-free client library for the gramstyle gRPC service, and the ``gramstyle`` CLI.

    from gramstyle.client import Client
    with Client("localhost:50051") as client:
        result = client.stylize("cat.png", "starry.jpg", size=256, iterations=100)
        result.save("out.png")

- :class:`Client` (sync) and :class:`AsyncClient` (grpc.aio): ``stylize``,
  ``stylize_stream``, ``compute_losses``, ``server_info``;
- results: :class:`StylizeResult`, :class:`Progress`, :class:`LossReport`,
  :class:`ServerInfo` (plain dataclasses, mirroring the engine's types);
- errors: :class:`ServiceError` (``.code`` is a ``grpc.StatusCode``, ``.message`` the
  server's message naming the bad field).

Needs only the base install (grpcio, protobuf, pillow, tqdm): no torch.
"""

from gramstyle.client.aio import AsyncClient, AsyncStylizeStream
from gramstyle.client.client import Client, StylizeStream
from gramstyle.client.errors import CALLER_MISTAKES, ServiceError
from gramstyle.client.types import (
    Losses,
    LossReport,
    ModelInfo,
    Progress,
    ServerInfo,
    StylizeResult,
)

__all__ = [
    "CALLER_MISTAKES",
    "AsyncClient",
    "AsyncStylizeStream",
    "Client",
    "LossReport",
    "Losses",
    "ModelInfo",
    "Progress",
    "ServerInfo",
    "ServiceError",
    "StylizeResult",
    "StylizeStream",
]
