"""Decoding images in child processes that are killed when their caller stops waiting.

One decode is one Pillow call that cannot be interrupted: a 4096 x 4096 progressive JPEG
with the most scans :func:`gramstyle.images.check_structure` allows takes seconds, and a
decoder that crashes takes its process with it. :class:`DecodePool` runs
:func:`gramstyle.images.load_image` -- the same checks and messages -- in a bounded set of
long-lived child processes:

- a child is a fresh interpreter (``python -m gramstyle.decode_process``: fork and exec, safe
  in a process with gRPC threads), reading one job at a time from its stdin pipe and writing
  the RGB pixels back on its stdout pipe (length-prefixed frames; the replies are JSON and
  raw bytes, never pickles, so a decoder subverted by a hostile file cannot run code in the
  server);
- the caller's thread waits for the reply, calling ``check`` every :data:`POLL_SECONDS`;
  when ``check`` raises (the caller's deadline passed, or it left) the child is killed at
  once and a replacement started, so a worker is free within a poll of its deadline
  whatever the file holds;
- at most ``processes`` children exist (one per worker thread is enough: a worker decodes
  one image at a time); a caller that finds them all busy waits, polling ``check`` too;
- an image whose header says it has at most ``in_process_pixels`` pixels is decoded in the
  caller's process: its worst case is bounded by its size (see
  :data:`DEFAULT_IN_PROCESS_PIXELS`) and it saves the round trip.

:meth:`DecodePool.probe_image` runs :func:`gramstyle.images.probe_image` (the container walk
and Pillow's header parsing, Python code that holds the interpreter) in a child the same way:
the server reads every header there, so no header can hold up its event loop.

The core stays torch-free: this module imports only :mod:`gramstyle.images`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from PIL import Image

from gramstyle.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageHeader,
    ImageSource,
    load_image,
    probe_image,
)

log = logging.getLogger(__name__)

#: Seconds between two calls of ``check`` while a child decodes (or none is free).
POLL_SECONDS = 0.05
#: Images of at most this many pixels (from the header) are decoded in the caller's process.
#: Their worst case is bounded: measured on a shared 2-core Xeon (bench/image_bombs.py
#: --decode), a 1024 x 1024 noise JPEG with the 32 scans allowed decodes in 0.23 s, a noise
#: PNG or WebP of that size in 0.12 s -- well within a second of any deadline.
DEFAULT_IN_PROCESS_PIXELS = 1024 * 1024


class _Child:
    """One decoding process and the two ends of its pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gramstyle.decode_process"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, close_fds=True)
        # Connection frames messages (a 4-byte length, then the bytes) over the raw pipes.
        self.send = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        for end in (self.send, self.recv):
            end.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class DecodePool:
    """A bounded set of decoding processes; :meth:`load_image` is a drop-in
    :func:`gramstyle.images.load_image` whose decode honours ``check``.

    Args:
        processes: most child processes at once (>= 1); started on first use and kept.
        in_process_pixels: images with at most this many pixels (by header) are decoded in
            the calling process (0: every image goes to a child).
    """

    def __init__(self, processes: int, in_process_pixels: int = DEFAULT_IN_PROCESS_PIXELS):
        if processes < 1:
            raise ValueError(f"processes: must be >= 1, got {processes}")
        self.processes = processes
        self.in_process_pixels = in_process_pixels
        self._lock = threading.Condition()
        self._idle: list[_Child] = []
        self._alive = 0
        self._closed = False
        #: Children killed because their caller stopped waiting, or because they died.
        self.killed = 0

    # ----------------------------------------------------------------- children

    def _acquire(self, check: Callable[[float], None]) -> _Child:
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("the decode pool is closed")
                while self._idle:
                    child = self._idle.pop()
                    if child.proc.poll() is None:
                        return child
                    # Died while idle (killed from outside, out of memory): replace it.
                    self._alive -= 1
                    self.killed += 1
                    child.kill()
                if self._alive < self.processes:
                    self._alive += 1
                    break
                self._lock.wait(POLL_SECONDS)
                check(POLL_SECONDS)
        try:
            return _Child()
        except BaseException:
            with self._lock:
                self._alive -= 1
                self._lock.notify()
            raise

    def _release(self, child: _Child) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                self._lock.notify()
                return
            self._alive -= 1
        child.kill()

    def _discard(self, child: _Child) -> None:
        """Kill a child whose job was abandoned (or that died) and start its replacement, so
        that the next caller does not pay for the interpreter's start."""
        child.kill()
        replacement = None
        with self._lock:
            self.killed += 1
            if self._closed:
                self._alive -= 1
                return
        try:
            replacement = _Child()
        except OSError:
            log.exception("could not restart a decoding process")
        with self._lock:
            if replacement is None:
                self._alive -= 1
            elif self._closed:
                self._alive -= 1
            else:
                self._idle.append(replacement)
                replacement = None
            self._lock.notify()
        if replacement is not None:
            replacement.kill()

    def start(self) -> DecodePool:
        """Start every child now (their interpreters load in the background), so that the
        first calls do not wait for them."""
        with self._lock:
            while not self._closed and self._alive < self.processes:
                self._idle.append(_Child())
                self._alive += 1
        return self

    @property
    def pids(self) -> list[int]:
        """The process ids of the idle children (for tests and metrics)."""
        with self._lock:
            return [child.pid for child in self._idle]

    def close(self) -> None:
        """Kill the idle children; busy ones are killed when their job ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._alive -= len(idle)
            self._lock.notify_all()
        for child in idle:
            child.kill()

    # ------------------------------------------------------------------ decoding

    def load_image(self, source: ImageSource, field: str = "image",
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, *, max_side: int | None = None,
                   check: Callable[[float], None] | None = None) -> Image.Image:
        """:func:`gramstyle.images.load_image`, decoded in a child process unless the header
        says the image is small. ``check(seconds)`` is called every :data:`POLL_SECONDS`
        while the child works; when it raises, the child is killed and the error goes on
        to the caller within that poll."""
        if isinstance(source, Image.Image):
            return load_image(source, field, max_pixels, max_side=max_side, check=check)
        # The header and container checks here (cheap, bounded by check_structure): a bad
        # file is refused with the same message without costing a child.
        header = probe_image(source, field, max_pixels, max_side=max_side)
        if header.pixels <= self.in_process_pixels:
            return load_image(source, field, max_pixels, max_side=max_side, check=check)
        data = source if isinstance(source, (bytes, bytearray, memoryview)) else None
        if data is None:
            with open(os.fspath(source), "rb") as f:
                data = f.read()
        check = check or (lambda seconds: None)
        check(0.0)
        reply, pixels = self._run({"op": "decode", "field": field, "max_pixels": max_pixels,
                                   "max_side": max_side}, data, check, 3 * header.pixels)
        width, height = reply["size"]
        if width * height * 3 != len(pixels) or width * height != header.pixels:
            raise ImageError(field, "the decoder returned pixels of the wrong size")
        return Image.frombytes("RGB", (width, height), pixels)

    def probe_image(self, source: bytes | bytearray | memoryview, field: str = "image",
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, max_side: int | None = None,
                    check: Callable[[float], None] | None = None) -> ImageHeader:
        """:func:`gramstyle.images.probe_image` of encoded bytes, in a child process: the
        container walk and Pillow's header parsing (Python code, holding the interpreter)
        run there, so that no header can hold up the caller's process, and a probe stops
        (its child killed) as soon as ``check`` raises."""
        check = check or (lambda seconds: None)
        check(0.0)
        reply, _ = self._run({"op": "probe", "field": field, "max_pixels": max_pixels,
                              "max_side": max_side}, source, check, 0)
        fmt, mode, width, height, metadata = reply["header"]
        return ImageHeader(str(fmt), str(mode), int(width), int(height), int(metadata))

    def _run(self, job: dict, data: bytes | bytearray | memoryview,
             check: Callable[[float], None], expected: int) -> tuple[dict, bytes]:
        """One job on a child: (reply, pixels); the child's ImageError raised here."""
        child = self._acquire(check)
        try:
            reply, pixels = self._ask(child, job, data, check, expected)
        except BaseException:
            self._discard(child)
            raise
        self._release(child)
        if "error" in reply:
            raise ImageError(reply.get("field", job["field"]), reply["error"])
        return reply, pixels

    @staticmethod
    def _ask(child: _Child, job: dict, data: bytes | bytearray | memoryview,
             check: Callable[[float], None], expected: int) -> tuple[dict, bytes]:
        """Send one job, wait for its reply (calling ``check``); (reply, pixels). A reply
        of more than ``expected`` bytes of pixels is refused unread."""
        started = time.monotonic()
        field = job["field"]
        try:
            child.send.send_bytes(json.dumps(job).encode())
            child.send.send_bytes(data)
            _wait(child, check)
            reply = json.loads(child.recv.recv_bytes(1 << 16))
            pixels = b""
            if "size" in reply:
                _wait(child, check)
                pixels = child.recv.recv_bytes(expected + 1)
        except (OSError, EOFError, ValueError) as exc:
            try:  # the pipe closed: the child is exiting (or exited)
                code = child.proc.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            raise ImageError(field, f"the image decoder failed on this image (exit code "
                                    f"{code}, after {time.monotonic() - started:.1f} s)"
                             ) from exc
        return reply, pixels


def _wait(child: _Child, check: Callable[[float], None]) -> None:
    """Until the child has written something (or died), calling ``check`` meanwhile."""
    while not child.recv.poll(POLL_SECONDS):
        check(POLL_SECONDS)


# ---------------------------------------------------------------------- the child


def _serve(requests: Connection, replies: Connection) -> None:
    """The child's loop: decode each job with :func:`load_image`, reply, until EOF."""
    while True:
        try:
            job = json.loads(requests.recv_bytes())
            data = requests.recv_bytes()
        except EOFError:
            return
        field = job["field"]
        try:
            if job["op"] == "probe":
                h = probe_image(data, field, job["max_pixels"], max_side=job["max_side"])
                replies.send_bytes(json.dumps(
                    {"header": [h.format, h.mode, h.width, h.height, h.metadata_bytes]}
                ).encode())
                continue
            image = load_image(data, field, job["max_pixels"], max_side=job["max_side"])
        except ImageError as exc:
            replies.send_bytes(json.dumps({"field": exc.field, "error": exc.problem}).encode())
            continue
        except MemoryError:
            replies.send_bytes(json.dumps(
                {"field": field, "error": "image too large to decode"}).encode())
            continue
        del data
        replies.send_bytes(json.dumps({"size": list(image.size)}).encode())
        replies.send_bytes(image.tobytes())
        del image


def main() -> None:
    # The server handles these for its process group; a child just goes on (or is killed).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _serve(Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False))


if __name__ == "__main__":
    main()
