"""The gramstyle.v1.StyleTransferService servicer (asyncio).

Threading model: the gRPC server runs on one asyncio event loop
(:class:`gramstyle.server.serve.GramstyleServer`); handlers are coroutines, so an open stream
-- a Stylize being relayed, an idle reflection or health Watch stream -- holds no thread, and
no number of them can stop a health check or GetServerInfo from answering. The compute runs
on the :class:`~gramstyle.server.admission.WorkQueue`'s worker threads:

1. **Checks, before anything is decoded** (in the handler): the model, the options (read and
   validated once, by the codec, within this server's limits; the layer names by the
   engine, which then trusts them), the number of images (``max_images``), then each
   image's header
   (:func:`gramstyle.images.probe_image`: allowed format, pixel limit, a ComputeLosses
   candidate's size) and the request's peak-memory estimate
   (:mod:`gramstyle.server.memory`), which must fit ``max_request_memory`` (``tile``
   "auto" is resolved here: off when the untiled run fits, else the largest tile that
   does; refused only when even the smallest tile does not). A caller's
   mistake is INVALID_ARGUMENT even while the server is saturated, and never costs a slot.
   Header parsing runs on a small thread pool, off the event loop, each thread handing
   the bytes to a child process (:meth:`gramstyle.decode_process.DecodePool.probe_image`):
   no header holds the interpreter, and a probe is killed at the caller's deadline.
2. **Admission**: the job is queued by count and by memory, or refused at once with
   RESOURCE_EXHAUSTED.
3. **The job** decodes, computes and encodes the answer on a worker thread (an image of
   over a megapixel is decoded in a child process of a bounded pool, killed when the call
   ends: :mod:`gramstyle.decode_process`); progress
   messages reach the handler through a bounded relay (a caller that reads more slowly than
   the job reports loses intermediate progress messages, never the result, and never
   blocks the worker).
4. **The end of the call** -- deadline, cancel, shutdown or a normal end -- sets the job's
   stop flag: a waiting job leaves the queue at once, a running one stops within a second
   (``should_stop`` is polled at every stage, see the engine).

Messages are read and built by :mod:`gramstyle.codec`; failures become statuses in
:mod:`gramstyle.server.status`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc

import gramstyle
from gramstyle import codec
from gramstyle.decode_process import DecodePool
from gramstyle.engine import footprint
from gramstyle.engine.optimise import LBFGS_HISTORY
from gramstyle.engine.stop import Cancelled
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.errors import FieldError, ModelNotLoaded, QueueFull, ShuttingDown
from gramstyle.images import ImageHeader
from gramstyle.inputs import check_order, input_named, skipped
from gramstyle.options import MAX_ITERATIONS, StyleOptions, default_within, preview
from gramstyle.results import ModelInfo, ServerInfo
from gramstyle.server import memory
from gramstyle.server.admission import WorkQueue
from gramstyle.server.config import DEFAULT_MAX_IMAGES
from gramstyle.server.status import abort
from gramstyle.sizes import format_size
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StyleTransferService"].full_name

#: Bytes of a ComputeLosses gradient per candidate pixel: 3 float32 values.
GRADIENT_BYTES_PER_PIXEL = 12
#: Room in a response message for what is not the gradient (losses, per-layer maps, names).
RESPONSE_MARGIN_BYTES = 64 * 2**10

#: Threads (and child processes) that read image headers.
PROBE_THREADS = 2
#: Progress messages held for a caller that reads slowly; older ones are dropped.
RELAY_LIMIT = 16


def _encoded(images: dict[str, list[bytes]]) -> int:
    """The bytes of a request's encoded images."""
    return sum(len(data) for each in images.values() for data in each)


class _Relay:
    """Messages from a worker thread to the handler coroutine, at most ``limit`` held: when
    the caller reads more slowly than the job reports, the oldest are dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int = RELAY_LIMIT):
        self._loop, self._limit = loop, limit
        self._items: collections.deque[Any] = collections.deque()
        self._closed = False
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, item: Any) -> None:
        """Hand a message over (any thread)."""
        self._call(self._put, item)

    def close(self) -> None:
        """No more messages (any thread)."""
        self._call(self._close)

    def _call(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    def _put(self, item: Any) -> None:
        self._items.append(item)
        if len(self._items) > self._limit:
            self._items.popleft()
            self.dropped += 1
        self._ready.set()

    def _close(self) -> None:
        self._closed = True
        self._ready.set()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class StyleTransferService(pb_grpc.StyleTransferServiceServicer):
    """Serves one or more loaded engines; the first is the default model.

    Args:
        engines: loaded models (distinct arch/weights pairs).
        work: the bounded worker queue that runs Stylize and ComputeLosses; its
            ``memory_budget`` is the most the running jobs' estimates may add up to.
        max_iterations: per-request iteration limit (<= options.MAX_ITERATIONS).
        max_message_bytes: reported in GetServerInfo; the server applies it. A
            ComputeLosses whose gradient could not fit it is refused before the work, and
            result chunks are at most a quarter of it.
        result_chunk_bytes: a Stylize result image whose encoding is longer is sent as
            ResultChunk messages of at most this many bytes (:func:`codec.result_messages`).
        max_images: images per request (content, style, init image, candidate together).
        max_request_memory: the largest peak-memory estimate (bytes) a request may have
            (None: the queue's memory budget, or no limit).
        on_iterations: called with the number of iterations each Stylize ran (metrics).
        decoder: decodes the jobs' images; default: a :class:`DecodePool` with one process
            per worker, so a large decode is killed when its call ends (deadline, cancel).
    """

    def __init__(self, engines: Sequence[StyleTransfer], work: WorkQueue, *,
                 max_iterations: int = MAX_ITERATIONS, max_message_bytes: int = 0,
                 result_chunk_bytes: int = codec.RESULT_CHUNK_BYTES,
                 max_images: int = DEFAULT_MAX_IMAGES, max_request_memory: int | None = None,
                 on_iterations: Callable[[int], None] | None = None,
                 decoder: DecodePool | None = None):
        if not engines:
            raise FieldError("engines", "at least one loaded model is needed")
        if max_images < 1:
            raise FieldError("max_images", f"must be >= 1, got {max_images}", max_images)
        self.engines = list(engines)
        self.work = work
        self.max_iterations = min(max_iterations, MAX_ITERATIONS)
        self.max_message_bytes = max_message_bytes
        if result_chunk_bytes < 1:
            raise FieldError("result_chunk_bytes", f"must be >= 1, got {result_chunk_bytes}",
                             result_chunk_bytes)
        # A chunk and its message's few bytes of framing stay far inside the send limit.
        self.result_chunk_bytes = (min(result_chunk_bytes, max(1, max_message_bytes // 4))
                                   if max_message_bytes else result_chunk_bytes)
        self.max_images = max_images
        limits = [n for n in (max_request_memory, work.memory_budget) if n is not None]
        self.max_request_memory = min(limits) if limits else None
        self._on_iterations = on_iterations
        # Header parsing is quick but proportional to the message (up to its size limit of
        # metadata chunks): off the event loop, on a pool small enough not to compete with
        # the workers.
        self._headers = ThreadPoolExecutor(max_workers=PROBE_THREADS,
                                           thread_name_prefix="gramstyle-headers")
        # A worker decodes one image at a time: one process each is enough.
        self.decoder = (decoder or DecodePool(work.workers)).start()
        # The headers are parsed in child processes too, one per header thread: Pillow parses
        # PNG chunks in Python, and a probe in this process would hold the interpreter (and
        # so the event loop, health included) for as long as it runs.
        self.prober = DecodePool(PROBE_THREADS, in_process_pixels=0).start()

    def close(self) -> None:
        self._headers.shutdown(wait=False, cancel_futures=True)
        self.decoder.close()
        self.prober.close()

    def select(self, arch: str, weights: str) -> StyleTransfer:
        """The loaded engine for (arch, weights); empty strings match anything."""
        for engine in self.engines:
            if (not arch or arch == engine.arch) and (
                    not weights or weights in (engine.weights, engine.weights_name)):
                return engine
        loaded = ", ".join(f"{e.arch}/{e.weights_name}" for e in self.engines)
        asked = f"{preview(arch or '*', quoted=False)}/{preview(weights or '*', quoted=False)}"
        field, value = ("weights", weights) if weights else ("arch", arch)
        raise ModelNotLoaded(field, f"model {asked} is not loaded on this server; "
                             f"loaded: {loaded}", value)

    # ------------------------------------------------------------------ checks

    def _count(self, images: dict[str, list[bytes]]) -> None:
        """Refuse more than ``max_images`` images (of the inputs declared to count, see
        :mod:`gramstyle.inputs`), before anything is decoded."""
        # A skipped entry (an empty one of a per-style mask: that style has none) is no image.
        counts = {name: sum(not skipped(input_named(name), d) for d in data)
                  for name, data in images.items() if input_named(name).counts}
        total = sum(counts.values())
        if total > self.max_images:
            listed = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            raise FieldError("content/style", f"the request has {total} images ({listed}), "
                             f"over this server's limit of {self.max_images} images per "
                             f"request", total)

    def _admit(self, estimate_of: Callable[[StyleOptions], memory.Estimate],
               options: StyleOptions, sides: Callable[[], list[int]], losses: bool
               ) -> tuple[memory.Estimate, StyleOptions]:
        """The estimate of a request and the options it runs with: ``tile`` "auto" resolved
        to "off" when the untiled run fits the per-request limit, else to the largest tile of
        ``sides()`` (ascending) whose estimate fits. Refuses (:meth:`_fits`) a request that
        does not fit even so. ``estimate_of(options)``: the request's estimate with these
        options."""
        estimate, chosen, fits = footprint.choose_tile(estimate_of, options, sides,
                                                       self.max_request_memory)
        if not fits:
            self._fits(estimate, chosen, losses, auto=options.tile == "auto")
        return estimate, chosen

    def _fits(self, estimate: memory.Estimate, options: StyleOptions, losses: bool,
              auto: bool = False) -> None:
        """Refuse a request whose estimated peak memory is over the per-request limit,
        naming what to lower (``auto``: even the smallest tile "auto" could choose is over)."""
        limit = self.max_request_memory
        if limit is None or estimate.total <= limit:
            return
        largest = estimate.largest
        if largest == "images":
            field, advice = "content/style", "send fewer or smaller images"
        elif losses:
            field, advice = "candidate", "send a smaller candidate, or lower style_scale"
        elif largest == "targets" and options.style_scale > 1:
            field, advice = "style_scale", "lower style_scale or size"
        elif largest == "optimiser":
            field, advice = "size", (f"lower size, or use optimizer adam (L-BFGS keeps up "
                                     f"to {2 * LBFGS_HISTORY} copies of the image)")
        elif options.tile == "off":
            field, advice = "size", ("lower size or style_scale, use fewer loss layers, or "
                                     "set tile to auto or a side in pixels (docs/tiling.md)")
        elif auto:
            field, advice = "size", "lower size or style_scale, or use fewer loss layers"
        else:
            field, advice = "tile", "lower tile, size or style_scale, or use fewer loss layers"
        tiled = (f" even with tile {options.tile}, the smallest tile auto could choose,"
                 if auto else "")
        raise FieldError(field, f"the request needs {estimate.describe()},{tiled} over this "
                         f"server's limit of {format_size(limit)} per request; {advice}")

    def _check_gradient(self, candidate: ImageHeader) -> None:
        """Refuse a ComputeLosses whose gradient (float32, 3 x height x width) could not fit
        this server's message limit -- before the work, not with RESOURCE_EXHAUSTED after."""
        if not self.max_message_bytes:
            return
        needed = GRADIENT_BYTES_PER_PIXEL * candidate.width * candidate.height
        if needed + RESPONSE_MARGIN_BYTES <= self.max_message_bytes:
            return
        most = (self.max_message_bytes - RESPONSE_MARGIN_BYTES) // GRADIENT_BYTES_PER_PIXEL
        raise FieldError("gradient", f"the gradient of a {candidate.width}x{candidate.height} "
                         f"candidate is {format_size(needed)} of float32 (3 x width x "
                         f"height x 4 bytes), over this server's message limit of "
                         f"{format_size(self.max_message_bytes)}; send a candidate of at "
                         f"most {most} pixels, or leave gradient unset", True)

    async def _headers_of(self, fn: Callable[[Callable[[], bool]], Any], context: Any) -> Any:
        """``fn(stopped)`` (which reads image headers) on the header pool, off the event loop.
        ``stopped()`` turns true at the caller's deadline or when it leaves, so that a probe
        of many images stops there (one image's probe is killed in its child process);
        a probe still waiting for a pool thread then never starts."""
        gone = threading.Event()
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining

        def stopped() -> bool:
            return gone.is_set() or (deadline is not None and time.monotonic() > deadline)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._headers, fn, stopped)
        except asyncio.CancelledError:
            gone.set()
            raise

    def _probe(self, rpc: str, images: dict[str, list[bytes]], engine: StyleTransfer,
               stopped: Callable[[], bool]) -> dict[str, list[ImageHeader]]:
        """The headers of the inputs declared to be probed, by input name, in the order they
        are checked (:func:`gramstyle.inputs.check_order`): allowed format, pixel limit, and
        for the input that sets the output size (the candidate) ``max_size``. A skipped
        entry (:func:`gramstyle.inputs.skipped`: a style without a mask) has no header.
        Raises Cancelled once ``stopped()`` (the caller's deadline passed, or it left)."""
        headers: dict[str, list[ImageHeader]] = {}

        def check(_: float) -> None:
            if stopped():
                raise Cancelled("the call ended while its image headers were read")
        for entry in check_order(rpc):
            if not entry.probed or entry.name not in images:
                continue
            headers[entry.name] = []
            for i, data in enumerate(images[entry.name]):
                if skipped(entry, data):  # no mask for this style: nothing to read
                    continue
                if stopped():
                    raise Cancelled("the call ended while its image headers were read")
                headers[entry.name].append(self.prober.probe_image(
                    data, entry.error_field(i), engine.max_pixels,
                    max_side=engine.max_size if entry.sets_size else None, check=check))
        return headers

    def _submit(self, job: Callable[[], Any], estimate: memory.Estimate) -> Future:
        return self.work.submit(job, memory=estimate.total)

    # ------------------------------------------------------------------ RPCs

    async def Stylize(self, request: pb.StylizeRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.StylizeResponse]:
        try:
            engine = self.select(request.arch, request.weights)
            # The edge: read and validated once, then checked against the network once; the
            # engine uses these options as they are.
            options = engine.validate(codec.stylize_options(
                request, engine.max_size, self.max_iterations), self.max_iterations)
            fmt = codec.output_format(request.output_format)
            images = codec.request_images(request)
            self._count(images)

            def plan(stopped: Callable[[], bool]) -> tuple[memory.Estimate, StyleOptions]:
                headers = self._probe("Stylize", images, engine, stopped)
                contents, styles = headers.pop("content"), headers.pop("style")

                def estimate_of(checked: StyleOptions) -> memory.Estimate:
                    return memory.estimate_stylize(
                        engine.extractor, checked, contents, styles, headers,
                        _encoded(images), message=request.ByteSize())
                return self._admit(estimate_of, options, lambda: memory.tile_sides(
                    engine.extractor, options, bool(contents), bool(styles), options.size),
                    losses=False)

            estimate, options = await self._headers_of(plan, context)
        except (ValueError, Cancelled) as exc:  # FieldError (ModelNotLoaded, ImageError ...)
            await abort(context, exc)

        relay = _Relay(asyncio.get_running_loop())
        stop = threading.Event()

        def job() -> list[pb.StylizeResponse]:
            result = engine.stylize(
                **codec.engine_images(request), options=options, preview=request.preview,
                progress=lambda p: relay.put(codec.progress_message(p, fmt)),
                should_stop=stop.is_set, decode=self.decoder.load_image)
            if self._on_iterations is not None:
                self._on_iterations(result.iterations)
            # Encoded (and cut into chunks when large) here, off the event loop.
            return codec.result_messages(result, fmt, self.result_chunk_bytes)

        try:
            future = self._submit(job, estimate)
        except (QueueFull, ShuttingDown) as exc:
            await abort(context, exc)
        future.add_done_callback(lambda _: relay.close())
        try:
            async for message in relay:
                yield message
            try:
                results = future.result()
            except Exception as exc:  # noqa: BLE001 -- mapped to a status code
                await abort(context, exc)
            if relay.dropped:
                log.info("%d progress message(s) dropped: the caller read slowly",
                         relay.dropped)
            for message in results:  # the result's chunks, then the Result
                yield message
        finally:
            stop.set()  # the call ended (for any reason): stop the job ...
            future.cancel()  # ... or take it out of the queue at once

    async def ComputeLosses(self, request: pb.ComputeLossesRequest,
                            context: grpc.aio.ServicerContext) -> pb.ComputeLossesResponse:
        try:
            engine = self.select(request.arch, request.weights)
            images = codec.request_images(request)
            self._count(images)

            def plan(stopped: Callable[[], bool]) -> tuple[memory.Estimate, StyleOptions]:
                headers = self._probe("ComputeLosses", images, engine, stopped)
                (candidate,) = headers.pop("candidate")
                if request.gradient:
                    self._check_gradient(candidate)
                # The edge, once the candidate's header is read: its long side stands in for
                # `size` (ComputeLosses runs no iterations, so no iteration limit applies).
                checked = engine.validate(codec.losses_options(
                    request, max(16, candidate.width, candidate.height), engine.max_size),
                    MAX_ITERATIONS)
                contents, styles = headers.pop("content"), headers.pop("style")

                def estimate_of(tiled: StyleOptions) -> memory.Estimate:
                    return memory.estimate_losses(
                        engine.extractor, tiled, candidate, contents, styles,
                        request.gradient, _encoded(images), others=headers,
                        message=request.ByteSize())
                return self._admit(estimate_of, checked, lambda: memory.tile_sides(
                    engine.extractor, checked, bool(contents), bool(styles), checked.size),
                    losses=True)

            estimate, options = await self._headers_of(plan, context)
        except (ValueError, Cancelled) as exc:  # FieldError (ModelNotLoaded, ImageError ...)
            await abort(context, exc)

        stop = threading.Event()

        def job() -> pb.ComputeLossesResponse:
            report = engine.compute_losses(
                **codec.engine_images(request), options=options, gradient=request.gradient,
                should_stop=stop.is_set, decode=self.decoder.load_image)
            return codec.loss_report_message(report)

        try:
            future = self._submit(job, estimate)
        except (QueueFull, ShuttingDown) as exc:
            await abort(context, exc)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- mapped to a status code
            await abort(context, exc)
        finally:
            stop.set()
            future.cancel()

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        default = self.engines[0]
        extra = {}
        if hasattr(default, "auto_precision"):
            extra["precision"] = default.auto_precision
        return codec.server_info_message(ServerInfo(
            version=gramstyle.__version__,
            models=[ModelInfo(arch=e.arch, weights=e.weights_name, pooling=e.pooling,
                              layer_names=e.layer_names, is_default=e is default)
                    for e in self.engines],
            backend=default.backend,
            device=str(default.device),
            limits=self.limits(),
            busy_workers=self.work.busy,
            queued=self.work.queued,
            **extra,
        ))

    def limits(self) -> dict[str, int]:
        """The limits GetServerInfo reports (the fields of the Limits message)."""
        default = self.engines[0]
        defaults = default_within(default.max_size, self.max_iterations)
        return {"max_pixels": default.max_pixels, "max_size": default.max_size,
                "max_iterations": self.max_iterations,
                "default_size": defaults["size"], "default_iterations": defaults["iterations"],
                "max_message_bytes": self.max_message_bytes,
                "workers": self.work.workers, "queue_size": self.work.queue_size,
                "max_images": self.max_images,
                "max_request_memory_bytes": self.max_request_memory or 0,
                "memory_budget_bytes": self.work.memory_budget or 0}


__all__ = ["DEFAULT_MAX_IMAGES", "SERVICE_NAME", "StyleTransferService"]
