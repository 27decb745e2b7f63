"""The error types of gramstyle: one hierarchy, torch-free and gRPC-free.

Every error that gramstyle raises on purpose is a :class:`GramstyleError`::

    GramstyleError
    ├── FieldError (also a ValueError)     a bad value of one named input; .field, .value
    │   ├── ImageError                     a bad image (gramstyle.images)
    │   ├── WeightsError                   the weights option cannot be loaded (the engine)
    │   └── ModelNotLoaded                 a request names a model the server did not load
    ├── Cancelled                          should_stop() said stop; .iterations
    ├── QueueFull                          every worker busy and the wait queue full
    ├── ShuttingDown                       the server no longer accepts work
    ├── MalformedRequest                   the request bytes are not a valid message
    ├── CLIError (gramstyle.cli.flags)     a command-line error; .code is the exit status
    └── ServiceError (gramstyle.client)    a call to the service failed; .code, .violations

A :class:`FieldError` carries the field it is about, so nothing reads a field out of a
message: the server turns ``.field`` into a ``google.rpc.BadRequest`` violation
(:mod:`gramstyle.server.status`, which maps every type here to its gRPC code from one table),
and the CLI turns it into its flag (``style[1]`` -> ``--style #2``). The message still
starts with the field, ``"iterations: must be between 1 and 10000, got 0"``.

Each class keeps its old import path too (``gramstyle.engine.Cancelled``,
``gramstyle.images.ImageError``, ``gramstyle.server.admission.QueueFull``, ...): those
modules re-export the class defined here.
"""

from __future__ import annotations

import warnings
from typing import Any


def _restore(cls: type, args: tuple, state: dict[str, Any]) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class GramstyleError(Exception):
    """The base of every error gramstyle raises on purpose."""

    def __reduce__(self) -> tuple:
        # Keeps the attributes (.field, .iterations ...) across pickling, e.g. from a worker
        # process, whatever the subclass's __init__ takes.
        return _restore, (type(self), self.args, dict(self.__dict__))


class FieldError(GramstyleError, ValueError):
    """A bad value of one input field (an option, a request field, a setting).

    Attributes:
        field: the field's name or path as the caller wrote it: ``iterations``,
            ``style[1]``, ``content_layer_weights[0]``, ``content/style`` (either of two).
        problem: what is wrong, without the field: ``must be between 1 and 10000, got 0``.
        value: the bad value, when the error is about one value (else None).

    ``str(error)`` is ``f"{field}: {problem}"``. A ``ValueError``, so ``except ValueError``
    keeps working.
    """

    def __init__(self, field: str, problem: str, value: Any = None):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.value = value


class ImageError(FieldError):
    """A bad image input (unreadable, undecodable, too large ...): ``field`` names the
    option or request field it came from (``content[0]``, ``init_image``, ``output``)."""


class WeightsError(FieldError):
    """The ``weights`` option cannot be satisfied (missing file, wrong keys or shapes)."""

    def __init__(self, problem: str, value: Any = None):
        super().__init__("weights", problem, value)


class ModelNotLoaded(FieldError):
    """The request names an arch/weights pair this server did not load (``field``: arch or
    weights)."""


class Cancelled(GramstyleError):
    """Raised by :func:`gramstyle.engine.optimise.optimise` (and ``StyleTransfer.stylize``)
    when ``should_stop()`` returned True. ``iterations``: the steps that had run, over all
    scales."""

    stop_reason = "cancelled"

    def __init__(self, message: str, iterations: int = 0):
        super().__init__(message)
        self.iterations = iterations


class QueueFull(GramstyleError):
    """Every worker is busy and the wait queue is full."""


class ShuttingDown(GramstyleError):
    """The queue no longer accepts jobs: the server is shutting down."""


class MalformedRequest(GramstyleError):
    """The request bytes are not a valid message of the method's request type. The safe
    deserializers return (not raise) an instance, and the interceptor ends the call."""


class FieldWarning(UserWarning):
    """A warning about one input field (``token: sent in plaintext ...``); ``field`` as in
    :class:`FieldError`, so the CLI can name its flag instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def warn_field(field: str, problem: str, stacklevel: int = 2) -> None:
    """Issue a :class:`FieldWarning`."""
    warnings.warn(FieldWarning(field, problem), stacklevel=stacklevel + 1)


__all__ = ["Cancelled", "FieldError", "FieldWarning", "GramstyleError", "ImageError",
           "MalformedRequest", "ModelNotLoaded", "QueueFull", "ShuttingDown", "WeightsError",
           "warn_field"]
