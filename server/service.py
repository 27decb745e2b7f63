"""The gramstyle.v1.StyleTransferService gRPC servicer.

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
rejects oversized images from the header before decoding. Messages are read and built by
:mod:`gramstyle.codec`; failures become statuses in :mod:`gramstyle.server.status`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import grpc

import gramstyle
from gramstyle import codec
from gramstyle.options import MAX_ITERATIONS
from gramstyle.results import ModelInfo, ServerInfo
from gramstyle.server.admission import QueueFull, WorkQueue
from gramstyle.server.engine import Cancelled, StyleTransfer
from gramstyle.server.status import ModelNotLoaded, abort
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StyleTransferService"].full_name

#: How often a handler waiting for its job re-checks that the caller is still there.
_POLL_S = 0.1


class StyleTransferService(pb_grpc.StyleTransferServiceServicer):
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

    def select(self, arch: str, weights: str) -> StyleTransfer:
        """The loaded engine for (arch, weights); empty strings match anything."""
        for engine in self.engines:
            if (not arch or arch == engine.arch) and (
                    not weights or weights in (engine.weights, engine.weights_name)):
                return engine
        loaded = ", ".join(f"{e.arch}/{e.weights_name}" for e in self.engines)
        asked = f"{arch or '*'}/{weights or '*'}"
        field = "weights" if weights else "arch"
        raise ModelNotLoaded(f"{field}: model {asked} is not loaded on this server; "
                             f"loaded: {loaded}")

    def _admit(self, context: grpc.ServicerContext, request: Any, read_options: Callable
               ) -> tuple[StyleTransfer, Any]:
        """The engine and validated options of a request; aborts on a caller's mistake."""
        try:
            engine = self.select(request.arch, request.weights)
            return engine, engine.validate(read_options(request), self.max_iterations)
        except (ModelNotLoaded, ValueError) as exc:
            abort(context, exc)

    def _submit(self, context: grpc.ServicerContext, job: Callable[[], object]) -> Future:
        try:
            return self.work.submit(job, should_run=context.is_active)
        except QueueFull as exc:
            abort(context, exc)

    def Stylize(self, request: pb.StylizeRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.StylizeResponse]:
        engine, options = self._admit(context, request, codec.stylize_options)
        fmt = codec.output_format(request.output_format)
        # The worker puts progress messages here; None marks the end of the job.
        events: queue.SimpleQueue[pb.StylizeResponse | None] = queue.SimpleQueue()
        stop = threading.Event()
        context.add_callback(stop.set)  # fires when the call ends for any reason

        def job():
            return engine.stylize(
                [image.data for image in request.content], [image.data for image in request.style],
                options, init_image=request.init_image or None, preview=request.preview,
                progress=lambda p: events.put(codec.progress_message(p, fmt)),
                should_stop=lambda: stop.is_set() or not context.is_active())

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
            abort(context, exc)
        if self._on_iterations is not None:
            self._on_iterations(result.iterations)
        yield codec.result_message(result, fmt)

    def ComputeLosses(self, request: pb.ComputeLossesRequest, context: grpc.ServicerContext
                      ) -> pb.ComputeLossesResponse:
        engine, options = self._admit(context, request, codec.losses_options)

        def job():
            return engine.compute_losses(
                request.candidate, [image.data for image in request.content],
                [image.data for image in request.style], options, gradient=request.gradient)

        future = self._submit(context, job)
        try:
            report = _wait(future, context)
        except BaseException as exc:  # noqa: BLE001 -- mapped to a status code
            abort(context, exc)
        return codec.loss_report_message(report)

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
                      ) -> pb.GetServerInfoResponse:
        default = self.engines[0]
        return codec.server_info_message(ServerInfo(
            version=gramstyle.__version__,
            models=[ModelInfo(arch=e.arch, weights=e.weights_name, pooling=e.pooling,
                              layer_names=e.layer_names, is_default=e is default)
                    for e in self.engines],
            backend=default.backend,
            device=str(default.device),
            limits={"max_pixels": default.max_pixels, "max_size": default.max_size,
                    "max_iterations": self.max_iterations,
                    "max_message_bytes": self.max_message_bytes,
                    "workers": self.work.workers, "queue_size": self.work.queue_size},
            busy_workers=self.work.busy,
            queued=self.work.queued,
        ))


def _wait(future: Future, context: grpc.ServicerContext):
    """``future.result()``, but give up (the job then gets dropped) if the caller goes away."""
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except TimeoutError:
            if not context.is_active():
                future.cancel()  # drops it if still queued; a running one finishes
                raise Cancelled("the caller went away") from None


__all__ = ["SERVICE_NAME", "StyleTransferService"]
