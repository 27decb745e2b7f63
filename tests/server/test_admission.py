"""The work queue (gramstyle.server.admission): admission by memory, in order."""

from __future__ import annotations

import threading
import time

from gramstyle.server.admission import WorkQueue


def test_work_queue_admits_by_memory_in_order():
    queue_ = WorkQueue(workers=3, queue_size=3, memory_budget=100)
    release = {name: threading.Event() for name in "abcd"}
    started: list[str] = []

    def job(name: str):
        def run() -> str:
            started.append(name)
            release[name].wait(30)
            return name
        return run

    try:
        a = queue_.submit(job("a"), memory=60)
        b = queue_.submit(job("b"), memory=60)  # does not fit next to a: waits
        c = queue_.submit(job("c"), memory=10)  # fits, but must not overtake b
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert started == ["a"] and queue_.busy == 1 and queue_.queued == 2
        assert queue_.reserved == 60
        release["a"].set()
        assert a.result(10) == "a"
        deadline = time.monotonic() + 10
        while len(started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started == ["a", "b", "c"] and queue_.reserved == 70
        # A job larger than the whole budget still runs, alone.
        d = queue_.submit(job("d"), memory=1000)
        time.sleep(0.2)
        assert "d" not in started
        release["b"].set()
        release["c"].set()
        release["d"].set()
        assert d.result(10) == "d" and b.result(10) == "b" and c.result(10) == "c"
        assert queue_.wait_idle(10) and queue_.reserved == 0
    finally:
        for event in release.values():
            event.set()
        queue_.shutdown()
