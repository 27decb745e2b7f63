"""The client's error type: a gRPC status code, the server's message, and the fields it
names (from the ``google.rpc.BadRequest`` details the server attaches)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from gramstyle.errors import GramstyleError

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

#: The trailing-metadata key of the binary google.rpc.Status (gRPC's richer error model).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: ``field`` is the request field path (``style_layers``,
    ``content[1]``), ``description`` the server's explanation."""

    field: str
    description: str


def field_violations(trailing_metadata) -> tuple[FieldViolation, ...]:
    """The BadRequest field violations in a call's trailing metadata (empty when none)."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            violations = []
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    violations += [FieldViolation(v.field, v.description)
                                   for v in bad.field_violations]
            return tuple(violations)
    return ()


class ServiceError(GramstyleError):
    """A call to the gramstyle service failed.

    Attributes:
        code: the ``grpc.StatusCode`` (e.g. ``INVALID_ARGUMENT``).
        message: the server's message; for bad input it starts with the request field name.
        request_id: the server's request id (for its log), when the server sent one.
        violations: the request fields the server rejected (``FieldViolation``), so a program
            can tell which field was wrong without parsing ``message``.
        attempts: how many times the client tried the call (1 + the retries it spent on
            UNAVAILABLE; see the client's ``retries``).
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None,
                 violations: tuple[FieldViolation, ...] = (), attempts: int = 1):
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{code.name}: {message}{tries}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.violations = violations
        self.attempts = attempts

    @property
    def caller_mistake(self) -> bool:
        """True when retrying the same request cannot help: the request itself is wrong."""
        return self.code in CALLER_MISTAKES

    @property
    def fields(self) -> list[str]:
        """The names of the rejected request fields."""
        return [v.field for v in self.violations]

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, attempts: int = 1) -> ServiceError:
        """Wrap a ``grpc.RpcError`` (sync or aio) that carries a status; ``attempts``: how
        many times the call was tried."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        request_id, violations = None, ()
        # aio errors raised before the call started carry no metadata.
        if hasattr(error, "initial_metadata"):
            request_id = dict(error.initial_metadata() or ()).get("x-request-id")
        if hasattr(error, "trailing_metadata"):
            violations = field_violations(error.trailing_metadata())
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", request_id, violations,
                   attempts)
