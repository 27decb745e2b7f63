"""Exceptions to gRPC statuses: the one place that decides what a failure is called.

:data:`STATUS_CODES` maps each error type (:mod:`gramstyle.errors`) to its status code; an
exception takes the entry of the nearest class in its MRO, so a subclass needs no entry of
its own. Bad input is INVALID_ARGUMENT (FAILED_PRECONDITION for a model the server did not
load), never INTERNAL. A :class:`~gramstyle.errors.FieldError`'s status also carries a
``google.rpc.BadRequest`` with its ``field``, so programs can read which field was wrong
without parsing the message (the client's ``ServiceError.violations``); no message is parsed
for its field.

No status message is longer than :data:`MAX_STATUS_BYTES` (UTF-8): values echoed from the
request are already cut to a preview where the message is made (``options.preview``), and
:func:`cap_message` cuts whatever is left. A longer message would push the status and its
details past gRPC's 16 KiB metadata limit, and the client would see RESOURCE_EXHAUSTED
instead of the real code.
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError
from typing import Any, NoReturn

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gramstyle.errors import (
    Cancelled,
    FieldError,
    MalformedRequest,
    ModelNotLoaded,  # re-exported here (its old home)
    QueueFull,
    ShuttingDown,
)
from gramstyle.server.interceptors import current_request_id, deadline_passed

log = logging.getLogger(__name__)

#: Longest status message, in UTF-8 bytes.
MAX_STATUS_BYTES = 1024

_OUT_OF_MEMORY = "out of memory on the server; lower size or the style image scale"

#: The status code of each error type (the nearest class in an exception's MRO decides).
#: Cancelled is CANCELLED, or DEADLINE_EXCEEDED when the call's deadline has passed. Any
#: other exception is INTERNAL, logged with its traceback.
STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    FieldError: grpc.StatusCode.INVALID_ARGUMENT,  # ImageError, WeightsError, ...
    ModelNotLoaded: grpc.StatusCode.FAILED_PRECONDITION,
    MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    Cancelled: grpc.StatusCode.CANCELLED,
    CancelledError: grpc.StatusCode.CANCELLED,  # a queued job taken out of the queue
    # Any other ValueError reaching a handler came from the request's data (Pillow, numpy).
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
    torch.OutOfMemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    MemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: Codes whose BadRequest details name the request field (they blame the request).
_BLAMES_REQUEST = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    """The :data:`STATUS_CODES` entry of ``exc``'s nearest class, or None (INTERNAL)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return None


def cap_message(message: str, limit: int = MAX_STATUS_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes, ending "… (N chars)" when cut."""
    if len(message.encode()) <= limit:
        return message
    tail = f"… ({len(message)} chars)"
    room = limit - len(tail.encode())
    head = message.encode()[:room].decode("utf-8", errors="ignore")
    return head + tail


def status_of(exc: BaseException, context: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failure ends the call with."""
    code = code_of(exc)
    if code is None:
        log.error("request_id=%s internal error", current_request_id(), exc_info=exc)
        return (grpc.StatusCode.INTERNAL,
                f"internal error (request id {current_request_id()}); see the server log")
    if code == grpc.StatusCode.CANCELLED:
        code = (grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context)
                else grpc.StatusCode.CANCELLED)
        return code, f"stopped: {exc}" if str(exc) else "stopped"
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        log.warning("request_id=%s out of memory: %s", current_request_id(), exc)
        return code, _OUT_OF_MEMORY
    return code, str(exc)


def rich_status(code: grpc.StatusCode, message: str, field: str | None = None) -> grpc.Status:
    """A status; when ``field`` is given and the code blames the request, its details hold a
    BadRequest naming ``field``, described by the message after "field: ". The message is
    capped (:func:`cap_message`)."""
    message = cap_message(message)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if field is not None and code in _BLAMES_REQUEST:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field, description=message.removeprefix(f"{field}: "))]))
        status.details.append(detail)
    return rpc_status.to_status(status)


def status_for(exc: BaseException, context: Any) -> grpc.Status:
    """The whole status a failure ends the call with (code, message, BadRequest)."""
    field = exc.field if isinstance(exc, FieldError) else None
    return rich_status(*status_of(exc, context), field)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status that fits ``exc`` (raises grpc.aio.AbortError)."""
    status = status_for(exc, context)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


__all__ = ["MAX_STATUS_BYTES", "STATUS_CODES", "ModelNotLoaded", "abort", "cap_message",
           "code_of", "rich_status", "status_for", "status_of"]
