"""The gramstyle.v1.StyleTransfer gRPC servicer.

Threading model: gRPC's own thread pool runs the handlers; the optimisation runs on the
:class:`~gramstyle.server.admission.WorkQueue`'s worker threads. A Stylize handler admits a
job, then relays the job's progress messages from a local queue to the response stream. So:

- cheap RPCs (GetServerInfo, health, reflection) never wait for compute;
- a full queue is answered RESOURCE_EXHAUSTED at once;
- when the caller's deadline passes or it cancels, ``context.is_active()`` turns False, the
  engine's ``should_stop`` sees it before the next iteration and the worker is freed.

Requests are checked (model, options, layers) *before* admission, so a caller's mistake is
reported as INVALID_ARGUMENT even while the server is saturated, and never costs a slot.
Image bytes are decoded on the worker by the engine (gramstyle.images.load_image), which
rejects oversized images from the header before decoding.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from typing import NoReturn

import grpc
import torch
from PIL import Image

import gramstyle
from gramstyle.images import encode_image
from gramstyle.server import convert
from gramstyle.server.admission import QueueFull, WorkQueue
from gramstyle.server.engine import Cancelled, Progress, StyleTransfer
from gramstyle.server.interceptors import current_request_id
from gramstyle.server.options import MAX_ITERATIONS, StyleOptions
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StyleTransfer"].full_name

_EXIF_ORIENTATION = 0x0112

#: How often a handler waiting for its job re-checks that the caller is still there.
_POLL_S = 0.1


class ModelNotLoaded(Exception):
    """The request names an arch/weights pair this server did not load."""


def weights_name(engine: StyleTransfer) -> str:
    """The name requests use for an engine's weights: the file name for a path."""
    if engine.weights in ("imagenet", "random"):
        return engine.weights
    return os.path.basename(engine.weights)


def _matches(engine: StyleTransfer, arch: str, weights: str) -> bool:
    if arch and arch != engine.arch:
        return False
    return not weights or weights in (engine.weights, weights_name(engine))


class StyleTransferService(pb_grpc.StyleTransferServicer):
    """Serves one or more loaded engines; the first is the default model.

    Args:
        engines: loaded models (distinct arch/weights pairs).
        work: the bounded worker queue that runs Stylize and ComputeLosses.
        max_iterations: per-request iteration limit (<= options.MAX_ITERATIONS).
        max_message_bytes: reported in GetServerInfo; the server applies it.
        on_iterations: called with the number of iterations each Stylize ran (metrics).
    """

    def __init__(self, engines: Sequence[StyleTransfer], work: WorkQueue, *,
                 max_iterations: int = MAX_ITERATIONS, max_message_bytes: int = 0,
                 on_iterations: Callable[[int], None] | None = None):
        if not engines:
            raise ValueError("engines: at least one loaded model is needed")
        self.engines = list(engines)
        self.work = work
        self.max_iterations = min(max_iterations, MAX_ITERATIONS)
        self.max_message_bytes = max_message_bytes
        self._on_iterations = on_iterations

    # ------------------------------------------------------------------ helpers

    def select(self, arch: str, weights: str) -> StyleTransfer:
        """The loaded engine for (arch, weights); empty strings match anything."""
        for engine in self.engines:
            if _matches(engine, arch, weights):
                return engine
        loaded = ", ".join(f"{e.arch}/{weights_name(e)}" for e in self.engines)
        asked = f"{arch or '*'}/{weights or '*'}"
        field = "weights" if weights else "arch"
        raise ModelNotLoaded(f"{field}: model {asked} is not loaded on this server; "
                             f"loaded: {loaded}")

    def _checked(self, engine: StyleTransfer, options: StyleOptions) -> StyleOptions:
        """Validate options and layer names up front (the engine re-checks them)."""
        options.validated(max_size=engine.max_size, max_iterations=self.max_iterations)
        for field in ("content_layers", "style_layers"):
            engine.extractor.resolve_all(getattr(options, field), field)
        return options

    def _abort(self, context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
        """End the call with the status that fits ``exc``; never INTERNAL for bad input."""
        if isinstance(exc, QueueFull):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(exc, ModelNotLoaded):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if isinstance(exc, (Cancelled, CancelledError)):
            remaining = context.time_remaining()
            code = (grpc.StatusCode.DEADLINE_EXCEEDED
                    if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED)
            context.abort(code, f"stopped: {exc}" if str(exc) else "stopped")
        if isinstance(exc, ValueError):  # includes images.ImageError and WeightsError
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            log.warning("request_id=%s out of memory: %s", current_request_id(), exc)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "out of memory on the server; lower size or style_scale")
        log.error("request_id=%s internal error", current_request_id(), exc_info=exc)
        context.abort(grpc.StatusCode.INTERNAL,
                      f"internal error (request id {current_request_id()}); see the server log")

    def _submit(self, context: grpc.ServicerContext, job: Callable[[], object]) -> Future:
        try:
            return self.work.submit(job, should_run=context.is_active)
        except QueueFull as exc:
            self._abort(context, exc)

    # ------------------------------------------------------------------ RPCs

    def Stylize(self, request: pb.StylizeRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.StylizeResponse]:
        try:
            engine = self.select(request.arch, request.weights)
            options = self._checked(engine, convert.stylize_options(request))
            fmt = convert.output_format(request.output_format)
            fmt_enum = convert.FORMAT_ENUMS[fmt]
        except (ModelNotLoaded, ValueError) as exc:
            self._abort(context, exc)

        # The worker puts progress messages here; None marks the end of the job.
        events: queue.SimpleQueue[pb.StylizeResponse | None] = queue.SimpleQueue()
        stop = threading.Event()
        context.add_callback(stop.set)  # fires when the call ends for any reason

        def should_stop() -> bool:
            return stop.is_set() or not context.is_active()

        def on_progress(p: Progress) -> None:
            message = pb.Progress(iteration=p.iteration, iterations=p.iterations,
                                  losses=convert.losses_message(p.losses), elapsed_s=p.elapsed_s)
            if p.image is not None:
                message.preview.CopyFrom(pb.Image(data=encode_image(p.image, fmt),
                                                  format=fmt_enum, width=p.image.width,
                                                  height=p.image.height))
            events.put(pb.StylizeResponse(progress=message))

        def job():
            return engine.stylize(
                [image.data for image in request.content], [image.data for image in request.style],
                options, init_image=request.init_image or None, progress=on_progress,
                preview=request.preview, should_stop=should_stop)

        future = self._submit(context, job)
        future.add_done_callback(lambda _: events.put(None))
        while True:
            try:
                event = events.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    stop.set()  # the worker stops before its next iteration
                continue
            if event is None:
                break
            yield event
        try:
            result = future.result()
        except BaseException as exc:  # noqa: BLE001 -- mapped to a status code
            self._abort(context, exc)
        if self._on_iterations is not None:
            self._on_iterations(result.iterations)
        data = encode_image(result.image, fmt)
        yield pb.StylizeResponse(result=pb.Result(
            image=pb.Image(data=data, format=fmt_enum, width=result.image.width,
                           height=result.image.height),
            stats=pb.Stats(iterations=result.iterations,
                           losses=convert.losses_message(result.losses),
                           elapsed_s=result.elapsed_s, backend=result.backend,
                           device=result.device, arch=engine.arch,
                           weights=weights_name(engine)),
        ))

    def ComputeLosses(self, request: pb.ComputeLossesRequest, context: grpc.ServicerContext
                      ) -> pb.ComputeLossesResponse:
        try:
            engine = self.select(request.arch, request.weights)
            options = self._checked(engine, convert.losses_options(request))
        except (ModelNotLoaded, ValueError) as exc:
            self._abort(context, exc)

        def job():
            started = time.perf_counter()
            report = engine.compute_losses(
                request.candidate, [image.data for image in request.content],
                [image.data for image in request.style], options, gradient=request.gradient)
            return report, time.perf_counter() - started

        future = self._submit(context, job)
        try:
            report, elapsed = _wait(future, context)
        except BaseException as exc:  # noqa: BLE001 -- mapped to a status code
            self._abort(context, exc)
        response = pb.ComputeLossesResponse(
            losses=convert.losses_message(report.losses), backend=engine.backend,
            device=str(engine.device), elapsed_s=elapsed)
        # The engine decoded and validated the candidate; reading its header again is cheap.
        with Image.open(io.BytesIO(request.candidate)) as candidate:
            width, height = candidate.size
            if candidate.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated 90
                width, height = height, width
        response.width, response.height = width, height
        if report.gradient is not None:
            response.gradient.CopyFrom(convert.tensor_message(report.gradient))
        return response

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
                      ) -> pb.ServerInfo:
        default = self.engines[0]
        return pb.ServerInfo(
            version=gramstyle.__version__,
            models=[pb.ModelInfo(arch=e.arch, weights=weights_name(e), pooling=e.pooling,
                                 layer_names=e.layer_names, is_default=e is default)
                    for e in self.engines],
            backend=default.backend,
            device=str(default.device),
            limits=pb.Limits(max_pixels=default.max_pixels, max_size=default.max_size,
                             max_iterations=self.max_iterations,
                             max_message_bytes=self.max_message_bytes,
                             workers=self.work.workers, queue_size=self.work.queue_size),
            busy_workers=self.work.busy,
            queued=self.work.queued,
        )


def _wait(future: Future, context: grpc.ServicerContext):
    """``future.result()``, but give up (the job then gets dropped) if the caller goes away."""
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except TimeoutError:
            if not context.is_active():
                future.cancel()  # drops it if still queued; a running one finishes
                raise Cancelled("the caller went away") from None


__all__ = ["SERVICE_NAME", "ModelNotLoaded", "StyleTransferService", "weights_name"]
