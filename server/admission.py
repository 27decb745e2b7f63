"""Admission control: a fixed pool of worker threads behind a bounded queue, admitted by
count and by memory.

Why not gRPC's ``maximum_concurrent_rpcs``: it counts *every* RPC, so health probes and
GetServerInfo would be refused exactly when the server is busy, and a busy pod would be
restarted by its liveness probe. Here only compute work (Stylize, ComputeLosses) is admitted
or refused; cheap RPCs never touch the queue.

- **By count.** A job is admitted when fewer than ``workers + queue_size`` jobs are running
  or waiting; otherwise :meth:`WorkQueue.submit` raises :class:`QueueFull` at once, and the
  service answers RESOURCE_EXHAUSTED.
- **By memory.** Each job carries an estimate of its peak memory (bytes,
  :mod:`gramstyle.server.memory`). A waiting job starts only when a worker is free *and* the
  estimates of the running jobs plus its own fit in ``memory_budget``; jobs start in
  arrival order (the first waiting job is never overtaken, so a large one cannot starve).
- **Leaving the queue.** Cancelling a waiting job's future (the caller's deadline passed or
  it cancelled) removes it from the queue at once and frees its slot. A running job keeps
  its slot, and its reservation, until its function has returned, so a "free" worker really
  is free (a cancelled job stops within a second, see ``should_stop`` in the engine).
- **The default budget** (:func:`default_memory_budget`) is a share of the memory this
  process may use, :func:`machine_memory` (the machine's, or its container's cgroup limit),
  less what the process already holds (:func:`process_rss`: the loaded models).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, TypeVar

from gramstyle.errors import FieldError, QueueFull, ShuttingDown  # the last two: re-exported

# Re-exported: they moved to the core so that the engine can read them too.
from gramstyle.host_memory import machine_memory, process_rss

T = TypeVar("T")

#: Share of the machine's (or the container's) memory the default memory budget may use.
MEMORY_BUDGET_SHARE = 0.8
#: The smallest default memory budget, bytes.
MIN_DEFAULT_MEMORY_BUDGET = 256 * 2**20


@dataclass(eq=False)
class _Job:
    future: Future
    fn: Callable[[], Any]
    should_run: Callable[[], bool] | None
    memory: int


class WorkQueue:
    """Run jobs on ``workers`` threads with at most ``queue_size`` jobs waiting.

    Args:
        workers: number of compute threads (>= 1).
        queue_size: jobs allowed to wait for a worker (>= 0).
        memory_budget: bytes the running jobs' estimates may add up to (None: no limit). A
            job estimated above the whole budget still runs, alone; the service refuses
            such requests before they get here.
        on_change: called with ``(busy, queued, reserved_bytes)`` after every change, e.g.
            to update Prometheus gauges. Called under no lock; it must be quick and
            thread-safe.
    """

    def __init__(self, workers: int, queue_size: int, memory_budget: int | None = None,
                 on_change: Callable[[int, int, int], None] | None = None):
        if workers < 1:
            raise FieldError("workers", f"must be >= 1, got {workers}")
        if queue_size < 0:
            raise FieldError("queue_size", f"must be >= 0, got {queue_size}")
        if memory_budget is not None and memory_budget <= 0:
            raise FieldError("memory_budget", f"must be > 0 bytes, got {memory_budget}")
        self.workers = workers
        self.queue_size = queue_size
        self.memory_budget = memory_budget
        self._on_change = on_change
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiting: collections.deque[_Job] = collections.deque()
        self._busy = 0  # running
        self._reserved = 0  # bytes: the running jobs' estimates
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"gramstyle-worker-{i}",
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def busy(self) -> int:
        """Jobs running now."""
        with self._lock:
            return self._busy

    @property
    def queued(self) -> int:
        """Jobs admitted and waiting for a worker (or for memory)."""
        with self._lock:
            return len(self._waiting)

    @property
    def reserved(self) -> int:
        """Bytes reserved by the running jobs' estimates."""
        with self._lock:
            return self._reserved

    def submit(self, fn: Callable[[], T], should_run: Callable[[], bool] | None = None,
               memory: int = 0) -> Future[T]:
        """Admit ``fn`` or raise :class:`QueueFull` at once.

        ``memory`` is the job's estimated peak (bytes). ``should_run`` is checked when a
        worker picks the job up: a job whose caller has gone away is dropped (its future
        raises ``CancelledError``) instead of wasting a worker. Cancelling the returned
        future while the job waits removes it from the queue at once.
        """
        future: Future[T] = Future()
        job = _Job(future, fn, should_run, max(0, int(memory)))
        with self._lock:
            if self._closed:
                raise ShuttingDown("server is shutting down; retry on another replica")
            pending = self._busy + len(self._waiting)
            if pending >= self.workers + self.queue_size:
                raise QueueFull(
                    f"server busy: {self._busy} of {self.workers} worker(s) running and "
                    f"{len(self._waiting)} of {self.queue_size} queue slot(s) taken")
            self._waiting.append(job)
            self._changed.notify_all()
        # A bound method, not a closure over the job: the job holds the future, and a cycle
        # through it would keep a failed job's traceback (and its tensors) alive until the
        # garbage collector runs.
        future.add_done_callback(self._dropped)
        self._notify()
        return future

    def _dropped(self, future: Future) -> None:
        """A waiting job's future was cancelled: give its slot back now."""
        if not future.cancelled():
            return
        with self._lock:
            job = next((j for j in self._waiting if j.future is future), None)
            if job is None:  # a worker took it already (and will skip it)
                return
            self._waiting.remove(job)
            self._changed.notify_all()
        self._notify()

    def _startable(self) -> bool:
        """Whether the first waiting job may start now (call with the lock held)."""
        if not self._waiting or self._busy >= self.workers:
            return False
        if self.memory_budget is None or self._busy == 0:
            return True
        return self._reserved + self._waiting[0].memory <= self.memory_budget

    def _work(self) -> None:
        while True:
            with self._lock:
                self._changed.wait_for(lambda: self._closed or self._startable())
                if not self._startable():  # closed, nothing to run
                    return
                job = self._waiting.popleft()
                self._busy += 1
                self._reserved += job.memory
            self._notify()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._reserved -= job.memory
                    self._changed.notify_all()
                self._notify()
                # A failed job's traceback refers to this frame (through the frames it ran):
                # drop the job so that the future, the exception and its tensors go now.
                job = None

    @staticmethod
    def _run(job: _Job) -> None:
        if job.should_run is not None and not job.should_run():
            job.future.cancel()
            return
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while it was being picked up
        try:
            result = job.fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller
            job.future.set_exception(exc)
            job = None  # break the cycle future -> exception -> this frame -> job -> future
        else:
            job.future.set_result(result)

    def _notify(self) -> None:
        if self._on_change is not None:
            with self._lock:
                state = self._busy, len(self._waiting), self._reserved
            self._on_change(*state)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is running or waiting; False if ``timeout`` passed first."""
        with self._lock:
            return self._changed.wait_for(lambda: self._busy == 0 and not self._waiting,
                                          timeout)

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting jobs and cancel the waiting ones; with ``wait``, block until the
        running ones finish."""
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
            self._changed.notify_all()
        for job in waiting:
            job.future.cancel()  # each removes itself (_dropped)
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()


# ---------------------------------------------------------------------------- the budget


def default_memory_budget(reserved: int = 0) -> int:
    """The default ``--memory-budget``, bytes: ``MEMORY_BUDGET_SHARE`` of
    :func:`machine_memory`, less what this process already holds (the loaded models) and
    ``reserved`` bytes (the target cache), and at least ``MIN_DEFAULT_MEMORY_BUDGET``."""
    budget = int(MEMORY_BUDGET_SHARE * machine_memory()) - process_rss() - reserved
    return max(MIN_DEFAULT_MEMORY_BUDGET, budget)


__all__ = ["MEMORY_BUDGET_SHARE", "CancelledError", "QueueFull", "ShuttingDown", "WorkQueue",
           "default_memory_budget"]
