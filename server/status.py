"""Exceptions to gRPC statuses: the one place that decides what a failure is called.

Bad input is INVALID_ARGUMENT (FAILED_PRECONDITION for a model the server did not load), never
INTERNAL. The status also carries a ``google.rpc.BadRequest`` with the field the message
names, so programs can read which field was wrong without parsing the message (the client's
``ServiceError.violations``).
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError
from typing import NoReturn

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gramstyle.codec import error_field
from gramstyle.server.admission import QueueFull
from gramstyle.server.engine import Cancelled
from gramstyle.server.interceptors import current_request_id

log = logging.getLogger(__name__)


class ModelNotLoaded(Exception):
    """The request names an arch/weights pair this server did not load."""


def status_of(exc: BaseException, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failure ends the call with."""
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, ModelNotLoaded):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (Cancelled, CancelledError)):
        remaining = context.time_remaining()
        code = (grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED)
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
    and the code blames the request."""
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


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status that fits ``exc``."""
    context.abort_with_status(rich_status(*status_of(exc, context)))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover
