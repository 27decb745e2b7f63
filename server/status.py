"""Exceptions to gRPC statuses: the one place that decides what a failure is called.

Bad input is INVALID_ARGUMENT (FAILED_PRECONDITION for a model the server did not load), never
INTERNAL. The status also carries a ``google.rpc.BadRequest`` with the field the message
names, so programs can read which field was wrong without parsing the message (the client's
``ServiceError.violations``).

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

from gramstyle.codec import error_field
from gramstyle.engine.stop import Cancelled
from gramstyle.server.admission import QueueFull, ShuttingDown
from gramstyle.server.interceptors import (
    MalformedRequest,
    current_request_id,
    deadline_passed,
)

log = logging.getLogger(__name__)

#: Longest status message, in UTF-8 bytes.
MAX_STATUS_BYTES = 1024


class ModelNotLoaded(Exception):
    """The request names an arch/weights pair this server did not load."""


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
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, ShuttingDown):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, ModelNotLoaded):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, MalformedRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (Cancelled, CancelledError)):
        code = (grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context)
                else grpc.StatusCode.CANCELLED)
        return code, f"stopped: {exc}" if str(exc) else "stopped"
    if isinstance(exc, ValueError):  # includes images.ImageError and WeightsError
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        log.warning("request_id=%s out of memory: %s", current_request_id(), exc)
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                "out of memory on the server; lower size or the style image scale")
    log.error("request_id=%s internal error", current_request_id(), exc_info=exc)
    return (grpc.StatusCode.INTERNAL,
            f"internal error (request id {current_request_id()}); see the server log")


def rich_status(code: grpc.StatusCode, message: str) -> grpc.Status:
    """A status whose details hold a BadRequest naming the field, when the message names one
    and the code blames the request. The message is capped (:func:`cap_message`)."""
    message = cap_message(message)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    field = error_field(message)
    if field is not None and code in (grpc.StatusCode.INVALID_ARGUMENT,
                                      grpc.StatusCode.FAILED_PRECONDITION):
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field, description=message.split(": ", 1)[-1])]))
        status.details.append(detail)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status that fits ``exc`` (raises grpc.aio.AbortError)."""
    status = rich_status(*status_of(exc, context))
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


__all__ = ["MAX_STATUS_BYTES", "ModelNotLoaded", "abort", "cap_message", "rich_status",
           "status_of"]
