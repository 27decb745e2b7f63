"""SIGTERM, SIGINT and SIGHUP for ``gramstyle serve``, from the first moment of start-up.

The handlers are installed before the heavy imports and the model load, so that a signal
during start-up never kills the process with the default action (SIGHUP: exit 129, SIGTERM:
143):

- **Stop (SIGTERM, SIGINT) during start-up** raises :class:`StartupCancelled` in the main
  thread, at the next Python step of whatever is loading; ``gramstyle serve`` logs it and
  exits 0. (It derives from BaseException, so no ``except Exception`` in a loader swallows
  it.)
- **Stop while serving:** the first asks for the drain (:attr:`Signals.stop_requested`), a
  second cancels what is left at once.
- **SIGHUP** re-reads the certificate, key, client CA and tokens, on a thread of its own (off
  the handler, so that file reads and logging are safe). One during start-up is kept and
  applied as soon as the server exists.

Torch- and gRPC-free: the CLI installs it before importing the server.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("gramstyle.server.serve")

_STOP = (signal.SIGTERM, signal.SIGINT)


class StartupCancelled(BaseException):
    """A stop signal arrived before the server was serving."""


class _Server(Protocol):
    def stop(self, grace: float | None = ...) -> None: ...

    def reload(self) -> None: ...


class Signals:
    """The serve command's signal handlers; use as a context manager (installed on entry,
    the previous ones restored on exit) from the main thread.

    Attributes:
        stop_requested: set by the first stop signal.
        grace_s: the drain the log line announces (seconds), set once the config is known.
    """

    def __init__(self) -> None:
        self.stop_requested = threading.Event()
        self.grace_s: float | None = None
        self._server: _Server | None = None
        self._stops = 0
        self._reload_pending = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for signum in _STOP:
            self._previous[signum] = signal.signal(signum, self._on_stop)
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def serving(self, server: _Server) -> None:
        """From now on a stop drains ``server`` and SIGHUP reloads it (a SIGHUP received
        during start-up is applied now)."""
        self._server = server
        if self._reload_pending:
            self._reload_pending = False
            self._reload(server)

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stops += 1
        name = signal.Signals(signum).name
        self.stop_requested.set()
        server = self._server
        if server is None:
            if self._stops == 1:
                log.info("received %s during start-up; exiting", name)
                raise StartupCancelled(name)
            return
        grace = "" if self.grace_s is None else f" (grace {self.grace_s:.0f} s)"
        log.info("received %s; shutting down%s", name, grace)
        if self._stops > 1:
            server.stop(None)  # the drain is under way: cancel what is left

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        server = self._server
        if server is None:
            log.info("received SIGHUP during start-up; the files are read again once the "
                     "server is up")
            self._reload_pending = True
            return
        self._reload(server)

    @staticmethod
    def _reload(server: _Server) -> None:
        threading.Thread(target=server.reload, name="gramstyle-reload", daemon=True).start()


__all__ = ["Signals", "StartupCancelled"]
