"""The client's error type: a gRPC status code plus the server's message."""

from __future__ import annotations

import grpc

#: Codes that mean the caller asked for something wrong (the CLI exits 2 for these); every
#: other code means the server or the network failed (exit 1).
CALLER_MISTAKES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
})


class ServiceError(Exception):
    """A call to the gramstyle service failed.

    Attributes:
        code: the ``grpc.StatusCode`` (e.g. ``INVALID_ARGUMENT``).
        message: the server's message; for bad input it starts with the request field name.
        request_id: the server's request id (for its log), when the server sent one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def caller_mistake(self) -> bool:
        """True when retrying the same request cannot help: the request itself is wrong."""
        return self.code in CALLER_MISTAKES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ServiceError:
        """Wrap a ``grpc.RpcError`` (sync or aio) that carries a status."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        request_id = None
        try:
            metadata = error.initial_metadata() if hasattr(error, "initial_metadata") else None
            request_id = dict(metadata or ()).get("x-request-id")
        except Exception:  # noqa: BLE001 -- aio errors may not carry metadata; it is optional
            request_id = None
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", request_id)
