"""Admission control: a fixed pool of worker threads behind a bounded queue.

Why not gRPC's ``maximum_concurrent_rpcs``: it counts *every* RPC, so health probes and
GetServerInfo would be refused exactly when the server is busy, and a busy pod would be
restarted by its liveness probe. Here only compute work (Stylize, ComputeLosses) is admitted
or refused; cheap RPCs never touch the queue.

A job is admitted when fewer than ``workers + queue_size`` jobs are running or waiting;
otherwise :meth:`WorkQueue.submit` raises :class:`QueueFull` at once, and the service
answers RESOURCE_EXHAUSTED. A slot is held until the job's function has returned, so a
"free" worker really is free (a cancelled optimisation stops within one iteration).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every worker is busy and the wait queue is full."""


class WorkQueue:
    """Run jobs on ``workers`` threads with at most ``queue_size`` jobs waiting.

    Args:
        workers: number of compute threads (>= 1).
        queue_size: jobs allowed to wait for a worker (>= 0).
        on_change: called with ``(busy, queued)`` after every change, e.g. to update a
            Prometheus gauge. Called under no lock; it must be quick and thread-safe.
    """

    def __init__(self, workers: int, queue_size: int,
                 on_change: Callable[[int, int], None] | None = None):
        if workers < 1:
            raise ValueError(f"workers: must be >= 1, got {workers}")
        if queue_size < 0:
            raise ValueError(f"queue_size: must be >= 0, got {queue_size}")
        self.workers = workers
        self.queue_size = queue_size
        self._on_change = on_change
        self._lock = threading.Lock()
        self._pending = 0  # admitted and not finished: running + waiting
        self._busy = 0  # running
        self._idle = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gramstyle-worker")

    @property
    def busy(self) -> int:
        """Jobs running now."""
        with self._lock:
            return self._busy

    @property
    def queued(self) -> int:
        """Jobs admitted and waiting for a worker."""
        with self._lock:
            return self._pending - self._busy

    def submit(self, fn: Callable[[], T], should_run: Callable[[], bool] | None = None
               ) -> Future[T]:
        """Admit ``fn`` or raise :class:`QueueFull` at once.

        ``should_run`` is checked when a worker picks the job up: a job whose caller has
        gone away while it waited is dropped (its future raises ``CancelledError``)
        instead of wasting a worker.
        """
        with self._lock:
            if self._pending >= self.workers + self.queue_size:
                raise QueueFull(
                    f"server busy: {self._busy} of {self.workers} worker(s) running and "
                    f"{self._pending - self._busy} of {self.queue_size} queue slot(s) taken")
            self._pending += 1
        self._notify()
        try:
            return self._pool.submit(self._run, fn, should_run)
        except BaseException:  # pool shut down: give the slot back
            self._finish(started=False)
            raise

    def _run(self, fn: Callable[[], T], should_run: Callable[[], bool] | None) -> T:
        if should_run is not None and not should_run():
            self._finish(started=False)
            raise CancelledError("the caller went away while the job was queued")
        with self._lock:
            self._busy += 1
        self._notify()
        try:
            return fn()
        finally:
            self._finish(started=True)

    def _finish(self, started: bool) -> None:
        with self._lock:
            self._pending -= 1
            if started:
                self._busy -= 1
            if self._pending == 0:
                self._idle.notify_all()
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            with self._lock:
                busy, queued = self._busy, self._pending - self._busy
            self._on_change(busy, queued)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is running or waiting; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting jobs; with ``wait``, block until running ones finish."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
