"""The server's logs: to stderr, as text lines or one JSON object per line, and the event
loop's unexpected errors."""

from __future__ import annotations

import asyncio
import logging
import sys

from gramstyle.server.interceptors import JsonFormatter

log = logging.getLogger("gramstyle.server.serve")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Logs to stderr: ``fmt`` 'text' (one line each; request lines as key=value) or 'json'
    (one JSON object per line)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Unexpected errors on the server's loop: one log line, with the traceback if any
    (an ``asyncio`` exception handler)."""
    exc = context.get("exception")
    log.error("event loop: %s", context.get("message", "error"),
              exc_info=exc if isinstance(exc, BaseException) else None)


__all__ = ["configure_logging", "log_loop_error"]
