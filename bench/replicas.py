"""No request lost when a replica dies: local ``gramstyle serve`` replicas under load while
replicas are killed (SIGKILL: a crash) or stopped (SIGTERM: a rolling restart) mid-run.

Every client thread has its own ``Client([...every replica's address])`` (round_robin) and
loops small Stylize calls. A call whose replica dies mid-stream is repeated from the start
on another replica by the client library (``retries``, default 2). The script prints, per
scenario, the calls that succeeded, failed and had to restart.

    python bench/replicas.py                       # crash + rolling restart, 60 s each
    python bench/replicas.py --duration 120 --retries 0   # without client retries, to compare

Scenarios:

- crash: every ``duration / 5`` s, SIGKILL a replica while it is running a call, then start
  it again on the same port;
- rolling: SIGTERM each replica in turn while it is running a call (it drains), wait for it
  to exit, start it again, wait until it answers, and go on to the next.

tests/server/test_replicas.py uses the same harness (:class:`Replica`, :class:`Load`) for a short
run in the test suite.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from gramstyle.client import Client, ServiceError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One ``gramstyle serve`` subprocess on 127.0.0.1 with random VGG19 weights.

    Args:
        log_dir: where its stdout/stderr go (``replica-PORT.log``).
        port: its port (a free one when None); kept across :meth:`start` calls.
        extra: further ``serve`` flags.
    """

    def __init__(self, log_dir: Path, port: int | None = None, extra: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"replica-{self.port}.log"
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        # One thread per replica: several share this machine's cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gramstyle.cli", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port), "--weights", "random", "--workers", "1",
                 "--queue-size", "8", "--grace", "30", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until GetServerInfo answers (RuntimeError if the process exits first)."""
        deadline = time.monotonic() + timeout
        with Client(self.address, retries=0, timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.address} exited with "
                                       f"{self.proc.returncode}:\n{self.log_tail()}")
                try:
                    client.server_info()
                    return
                except ServiceError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica {self.address} not ready after "
                                           f"{timeout} s:\n{self.log_tail()}") from None
                    time.sleep(0.2)

    def wait_busy(self, timeout: float = 60.0) -> bool:
        """Wait until the replica is running a call (GetServerInfo's busy_workers)."""
        deadline = time.monotonic() + timeout
        with Client(self.address, retries=0, timeout=2.0) as client:
            while time.monotonic() < deadline:
                try:
                    if client.server_info().busy_workers > 0:
                        return True
                except ServiceError:
                    pass
                time.sleep(0.02)
        return False

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill it if it still runs (clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Counts:
    """What the clients saw: calls ``ok``, ``failed`` (with their errors), ``restarted``
    (succeeded after the stream started again), and each result's total loss."""

    ok: int = 0
    failed: int = 0
    restarted: int = 0
    errors: Counter = field(default_factory=Counter)
    totals: list[float] = field(default_factory=list)


class Load:
    """``clients`` threads, each with its own Client over ``addresses``, looping Stylize
    with ``request`` (keyword arguments of ``Client.stylize_stream``) until :meth:`stop`."""

    def __init__(self, addresses: list[str], request: dict, clients: int = 4,
                 retries: int = 2, timeout: float = 120.0):
        self.addresses, self.request = addresses, request
        self.retries, self.timeout = retries, timeout
        self.counts = Counts()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"load-{i}", daemon=True)
                         for i in range(clients)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _loop(self) -> None:
        with Client(self.addresses, retries=self.retries, timeout=self.timeout) as client:
            while not self._stop.is_set():
                stream = client.stylize_stream(**self.request)
                try:
                    for _ in stream:
                        pass
                except ServiceError as error:
                    with self._cond:
                        self.counts.failed += 1
                        self.counts.errors[f"{error.code.name}: {error.message}"] += 1
                        self._cond.notify_all()
                    self._stop.wait(0.2)  # a caller would back off too; no busy loop
                    continue
                with self._cond:
                    self.counts.ok += 1
                    self.counts.restarted += stream.attempt > 1
                    self.counts.totals.append(stream.result.losses.total)
                    self._cond.notify_all()

    def wait_ok(self, more: int, timeout: float = 120.0) -> bool:
        """Wait until ``more`` further calls have succeeded."""
        with self._cond:
            target = self.counts.ok + more
            return self._cond.wait_for(lambda: self.counts.ok >= target, timeout)

    def stop(self, timeout: float = 120.0) -> Counts:
        """Let every thread finish its current call, and return the counts."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        return self.counts


def request_images(size: int = 64) -> dict:
    """Small PNG content and style images from the shared test images."""
    from PIL import Image

    shared = Path(os.environ.get("GRAMSTYLE_SHARED", REPO.parent / "shared"))
    out = {}
    for key, path in (("content", shared / "images/content/chelsea.png"),
                      ("style", shared / "images/style/starry_night.jpg")):
        image = Image.open(path).convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out[key] = buffer.getvalue()
    return out


def crash(replicas: list[Replica], load: Load, duration: float) -> None:
    """SIGKILL a busy replica every ``duration / 5`` s and start it again."""
    end = time.monotonic() + duration
    for i in range(5):
        time.sleep(max(0.0, min(duration / 5, end - time.monotonic())))
        replica = replicas[i % len(replicas)]
        replica.wait_busy()
        replica.signal(signal.SIGKILL)
        replica.wait_exit()
        replica.start().wait_ready()
    time.sleep(max(0.0, end - time.monotonic()))


def rolling(replicas: list[Replica], load: Load, duration: float) -> None:
    """SIGTERM each busy replica in turn, wait for its exit, start it again."""
    end = time.monotonic() + duration
    for replica in replicas:
        time.sleep(max(0.0, min(duration / (len(replicas) + 1), end - time.monotonic())))
        replica.wait_busy()
        replica.signal(signal.SIGTERM)
        code = replica.wait_exit()
        if code != 0:
            print(f"  replica {replica.address} exited with {code}", file=sys.stderr)
        replica.start().wait_ready()
    time.sleep(max(0.0, end - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds per scenario (default 60)")
    parser.add_argument("--retries", type=int, default=2,
                        help="the clients' retries (default 2, the library's default)")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--scenarios", nargs="+", default=["crash", "rolling"],
                        choices=["crash", "rolling"])
    args = parser.parse_args()

    images = request_images()
    request = {**images, "size": args.size, "iterations": args.iterations,
               "progress_every": 1}
    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), platform.processor())
    print(f"# {date.today()}, {cpu}, {os.cpu_count()} cores; {args.replicas} replicas "
          f"(1 thread each), {args.clients} clients, retries={args.retries}, Stylize "
          f"{args.size} px x {args.iterations} iterations\n")
    print("| scenario | seconds | ok | failed | restarted | calls/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="gramstyle-replicas-") as log_dir:
        for name in args.scenarios:
            replicas = [Replica(Path(log_dir)).start() for _ in range(args.replicas)]
            try:
                for replica in replicas:
                    replica.wait_ready()
                started = time.monotonic()
                load = Load([r.address for r in replicas], request, args.clients,
                            args.retries).start()
                load.wait_ok(args.clients)  # warm: the replicas have answered calls
                {"crash": crash, "rolling": rolling}[name](replicas, load, args.duration)
                counts = load.stop()
                seconds = time.monotonic() - started
            finally:
                for replica in replicas:
                    replica.stop()
            print(f"| {name} | {seconds:.0f} | {counts.ok} | {counts.failed} | "
                  f"{counts.restarted} | {counts.ok / seconds:.1f} |", flush=True)
            for error, n in counts.errors.most_common():
                print(f"|   {n} x {error} | | | | | |")


if __name__ == "__main__":
    main()
