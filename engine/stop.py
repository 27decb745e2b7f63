"""Stopping work part-way: the ``Cancelled`` error and the polling of a caller's ``should_stop``.

Long work (a network pass over a big image, an optimisation step) announces its estimated
seconds to a :data:`Check` before it starts; :class:`StopCheck` polls the caller's
``should_stop`` only once that work adds up to :data:`POLL_SECONDS`, so small images are
polled once per optimisation step and large ones every fraction of a second.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from gramstyle.errors import Cancelled  # defined with the other errors; re-exported here

#: Work between two polls of ``should_stop``.
POLL_SECONDS = 0.05

#: ``check(seconds)``: the estimated seconds of the work about to start; may raise to stop.
Check = Callable[[float], None]


class StopCheck:
    """A :data:`Check` over a caller's ``should_stop``: polls it once the work announced
    since the last poll adds up to ``interval`` seconds, and raises ``error()`` when it says
    stop. :meth:`poll` polls at once (and starts a new interval)."""

    def __init__(self, should_stop: Callable[[], bool], error: Callable[[], BaseException],
                 interval: float = POLL_SECONDS):
        self._should_stop, self._error, self._interval = should_stop, error, interval
        self._pending = 0.0

    def poll(self) -> bool:
        """``should_stop()``, starting a new interval."""
        self._pending = 0.0
        return bool(self._should_stop())

    def __call__(self, seconds: float = math.inf) -> None:
        self._pending += seconds
        if self._pending >= self._interval and self.poll():
            raise self._error()


__all__ = ["POLL_SECONDS", "Cancelled", "Check", "StopCheck"]
