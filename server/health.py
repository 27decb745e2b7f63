"""The grpc.health.v1 servicer: grpc_health's asyncio one, with ``Watch`` fixed for many
watchers."""

from __future__ import annotations

import collections
from typing import Any

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    """grpc_health's asyncio servicer, with ``Watch`` fixed for many watchers.

    Upstream's Watch forgets a service's condition when *any* of its watchers leaves, so the
    others never hear of a later change (NOT_SERVING at shutdown), and it writes while
    holding the condition's lock, so one watcher that does not read blocks every status
    change. Here the condition lives while anyone watches, and writes happen outside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watching: collections.Counter[str] = collections.Counter()

    def _status(self, service: str) -> int:
        return self._server_status.get(service,
                                       health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        condition = self._server_watchers[service]
        self._watching[service] += 1
        last = None
        try:
            while True:
                status = self._status(service)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                async with condition:
                    if self._status(service) == last:
                        await condition.wait()
        finally:
            self._watching[service] -= 1
            if self._watching[service] <= 0:
                del self._watching[service]
                self._server_watchers.pop(service, None)


__all__ = ["HealthServicer"]
