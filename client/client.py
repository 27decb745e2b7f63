"""The synchronous client.

    from gramstyle.client import Client

    with Client("localhost:50051", timeout=600) as client:
        result = client.stylize("cat.png", "starry.jpg", size=256, iterations=100,
                                progress=lambda p: print(p.iteration, p.losses.total))
        result.save("out.png")

        # or as an iterator of progress messages:
        stream = client.stylize_stream("cat.png", "starry.jpg", size=256)
        for p in stream:
            print(p.iteration, p.losses.total)
        stream.result.image.show()

Every failed call raises :class:`~gramstyle.client.errors.ServiceError` (status code, the
server's message and the rejected fields); a bad local argument (missing file, unknown
option) raises ``ValueError`` or ``TypeError`` before anything is sent.

A call that fails with UNAVAILABLE (its server died, restarted or drained) is repeated from
the start, on another replica when there is one, up to ``retries`` times (default 2). A
restarted Stylize stream begins again at iteration 0, and its progress messages say so with
``Progress.attempt`` (2, 3, ...):

    for p in client.stylize_stream("cat.png", "starry.jpg", size=256):
        if p.restarted and p.iteration == 0:
            bar.reset()          # the server died mid-run; the run starts again
        bar.update(p.iteration - bar.n)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from gramstyle import codec
from gramstyle.client.base import DEFAULT, Attempts, ClientBase, StreamBase
from gramstyle.client.errors import ServiceError
from gramstyle.results import LossReport, Progress, ServerInfo, StylizeResult


class StylizeStream(StreamBase):
    """A running Stylize call: iterate it for :class:`Progress` messages; afterwards
    :attr:`result` holds the :class:`StylizeResult`. :meth:`cancel` stops the server's
    optimisation within one iteration. If the server fails mid-stream with UNAVAILABLE the
    call restarts from the beginning (:attr:`attempt` and ``Progress.attempt`` count up)."""

    def __iter__(self) -> Iterator[Progress]:
        while True:
            try:
                for message in self._call:
                    progress = self._accept(message)
                    if progress is not None:
                        yield progress
                break
            except grpc.RpcError as exc:
                if self.result is not None:
                    break  # the whole result arrived; only the status was lost
                delay = self._attempts.after_failure(exc)  # raises when it must fail
            time.sleep(delay)
            self._restart()
        self._finished()

    def wait(self) -> StylizeResult:
        """Consume the remaining progress messages and return the result."""
        for _ in self:
            pass
        return self.result

    def __enter__(self) -> StylizeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


class Client(ClientBase):
    __doc__ = ClientBase.__doc__

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; ServiceError(UNAVAILABLE) after ``timeout``."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"no server answered at {self.target} within {timeout} s"
                               ) from None

    def stylize_stream(self, content: Any, style: Any = (), options: Any = None, *,
                       timeout: Any = DEFAULT, **kwargs: Any) -> StylizeStream:
        """Start a Stylize call; iterate the returned stream for progress.

        Args:
            content, style: one image or a sequence (paths, bytes or PIL images).
            options: a ``StyleOptions`` (or any object with its fields) to start from.
            timeout: deadline in seconds for the whole stream (default: the client's, else
                ``DEFAULT_TIMEOUTS["Stylize"]``, 30 min; None: no deadline).
            **kwargs: any ``StyleOptions`` field (size=256, iterations=100,
                style_layers=[...], ...; None leaves the server default), the other image
                inputs of Stylize by name (see :mod:`gramstyle.inputs`; init_image: the
                start image), preview (progress carries the current image), output_format
                ('png', 'jpeg' or 'webp'), arch and weights (one of the server's loaded
                models; default: its default).
        """
        return StylizeStream(self._stylize(content, style, options, timeout, kwargs))

    @staticmethod
    def _unary(attempts: Attempts) -> Any:
        """Run a unary call, repeating it on UNAVAILABLE within the retry budget."""
        while True:
            try:
                return attempts.start()
            except grpc.RpcError as exc:
                time.sleep(attempts.after_failure(exc))  # raises when it must fail

    def stylize(self, content: Any, style: Any = (), options: Any = None, *,
                progress: Callable[[Progress], None] | None = None, **kwargs: Any
                ) -> StylizeResult:
        """Run Stylize to the end and return the result; ``progress`` gets each message.

        Takes the same arguments as :meth:`stylize_stream`. If ``progress`` raises, the call
        is cancelled (the server stops) and the exception propagates.
        """
        with self.stylize_stream(content, style, options, **kwargs) as stream:
            for message in stream:
                if progress is not None:
                    progress(message)
            return stream.result

    def compute_losses(self, candidate: Any, content: Any = (), style: Any = (),
                       options: Any = None, *, timeout: Any = DEFAULT, **kwargs: Any
                       ) -> LossReport:
        """Loss terms of ``candidate`` (and d total / d pixels with ``gradient=True``).

        Keywords: the loss options of ``StyleOptions`` (layers and their weights, blend
        weights, loss weights, style image scale, precision), gradient, arch, weights.
        """
        attempts = self._compute_losses(candidate, content, style, options, timeout, kwargs)
        return codec.loss_report_from(self._unary(attempts))

    def server_info(self, *, timeout: Any = DEFAULT) -> ServerInfo:
        """The server's models, layer names, backend, device, limits and version."""
        return codec.server_info_from(self._unary(self._server_info(timeout)))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
