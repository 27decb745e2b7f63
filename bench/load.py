"""Load and soak test of a gramstyle server: concurrent clients, a mix of good and bad calls.

N client threads send, until T seconds have passed or R requests have been sent (whichever
comes first), a mix of:

- valid Stylize (tiny images, 2-3 iterations) and ComputeLosses (with and without gradient),
  and GetServerInfo;
- invalid calls: an unknown layer, a corrupt image, zero iterations, malformed protobuf;
- cancelled calls: a long Stylize cancelled after its first progress message, and one whose
  deadline passes mid-run.

A client that is refused with RESOURCE_EXHAUSTED waits 0.2-0.6 s before its next call, as a
well-behaved client would. A separate process (so that the clients' threads do not delay
it) probes health (grpc.health.v1 Check) every 50 ms on its own connection. It prints the
throughput, p50/p99 latency per RPC, counts per status code, the health probe's p99, and
the server's RSS at the start, after the warm-up (the first ``--warmup`` requests) and at
the end, with the growth after warm-up (target: under 5% over 1,000 requests).

    python bench/load.py --serve --clients 4 --requests 1200 --warmup 200   # starts a server
    python bench/load.py --target localhost:50051 --pid 1234 --seconds 300  # a running one

The images come from a fixed pool, so the server's target cache fills during the warm-up
and its (bounded) growth does not count as a leak.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [_png(48, 36, seed) for seed in range(6)]


@dataclass
class Stats:
    """Results shared by the client threads (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    sent: int = 0

    def add(self, rpc: str, kind: str, code: str, seconds: float) -> int:
        with self.lock:
            self.latency[rpc].append(seconds)
            self.codes[code] += 1
            self.kinds[(kind, code)] += 1
            self.sent += 1
            return self.sent


def _image(rng: random.Random) -> pb.WeightedImage:
    return pb.WeightedImage(data=rng.choice(IMAGES))


def one_call(stub: pb_grpc.StyleTransferServiceStub, channel: grpc.Channel,
             rng: random.Random) -> tuple[str, str, str]:
    """Send one call of the mix; (rpc, kind, status code name)."""
    kind = rng.choices(
        ["stylize", "losses", "info", "bad_layer", "corrupt", "bad_iterations", "malformed",
         "cancel", "deadline"],
        weights=[25, 20, 10, 8, 8, 6, 6, 9, 8])[0]
    request = pb.StylizeRequest(content=[_image(rng)], style=[_image(rng)],
                                size=rng.choice([32, 40, 48]), iterations=rng.choice([2, 3]),
                                progress_every=1)
    try:
        if kind == "stylize":
            list(stub.Stylize(request, timeout=120))
            return "Stylize", kind, "OK"
        if kind == "losses":
            stub.ComputeLosses(pb.ComputeLossesRequest(
                candidate=rng.choice(IMAGES), content=[_image(rng)], style=[_image(rng)],
                gradient=rng.random() < 0.5), timeout=120)
            return "ComputeLosses", kind, "OK"
        if kind == "info":
            stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            return "GetServerInfo", kind, "OK"
        if kind == "bad_layer":
            request.style_layers.layers.add(name="relu9_9")
        elif kind == "corrupt":
            request.content[0].data = request.content[0].data[:100]
        elif kind == "bad_iterations":
            request.iterations = 0
        elif kind == "malformed":
            channel.unary_unary("/gramstyle.v1.StyleTransferService/ComputeLosses")(
                b"\xff\xfe" + bytes(rng.randrange(256) for _ in range(30)), timeout=30)
            return "ComputeLosses", kind, "OK"
        elif kind in ("cancel", "deadline"):
            request.iterations, request.tolerance = 10_000, 0.0
            call = stub.Stylize(request, timeout=120 if kind == "cancel" else 0.5)
            for _ in call:
                if kind == "cancel":
                    call.cancel()
            return "Stylize", kind, "OK"
        list(stub.Stylize(request, timeout=60))
        return "Stylize", kind, "OK"
    except grpc.RpcError as exc:
        rpc = "ComputeLosses" if kind in ("losses", "malformed") else \
            "GetServerInfo" if kind == "info" else "Stylize"
        return rpc, kind, exc.code().name


def prober(target: str, stop, results) -> None:
    """Health Check every 50 ms until ``stop``; puts (latencies, failures by code)."""
    latency, failures = [], Counter()
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]
                               ) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            start = time.perf_counter()
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latency.append(time.perf_counter() - start)
            except grpc.RpcError as exc:
                failures[exc.code().name] += 1
            stop.wait(0.05)
    results.put((latency, dict(failures)))


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux)."""
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--arch", "vgg19",
         "--weights", "random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
         "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ready = process.stdout.readline()
    if "ready on port" not in ready:
        process.kill()
        raise SystemExit(f"the server did not start: {ready!r}")
    print(ready.strip())
    return process, f"127.0.0.1:{int(ready.split('ready on port ')[1].split(':')[0])}"


def run(target: str, pid: int | None, clients: int, seconds: float, requests: int,
        warmup: int, seed: int) -> int:
    stats = Stats()
    stop = threading.Event()
    warmed = threading.Event()
    marks: dict[str, int] = {"start": rss(pid) if pid else 0}
    series: list[tuple[int, int]] = []  # (requests sent, server RSS) every 500 requests
    health_failures: Counter = Counter()

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per client
        with grpc.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            while not stop.is_set():
                start = time.perf_counter()
                rpc, kind, code = one_call(stub, channel, rng)
                sent = stats.add(rpc, kind, code, time.perf_counter() - start)
                if code == "RESOURCE_EXHAUSTED":
                    stop.wait(rng.uniform(0.2, 0.6))  # back off, as a polite client does
                if sent == warmup:
                    if pid:
                        marks["warm"] = rss(pid)
                    warmed.set()
                if pid and sent % 500 == 0:
                    series.append((sent, rss(pid)))
                if sent >= requests:
                    stop.set()

    context = multiprocessing.get_context("spawn")
    probe_stop, results = context.Event(), context.Queue()
    probe = context.Process(target=prober, args=(target, probe_stop, results), daemon=True)
    probe.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    took = time.monotonic() - started
    probe_stop.set()
    health_latency, failures = results.get(timeout=60)
    health_failures.update(failures)
    probe.join(timeout=30)
    if pid:
        time.sleep(1.0)  # let the last cancelled jobs end
        marks["end"] = rss(pid)

    total = stats.sent
    print(f"\n{total} requests from {clients} clients in {took:.0f} s: "
          f"{total / took:.1f} requests/s")
    print("latency per RPC (s):")
    for rpc, values in sorted(stats.latency.items()):
        print(f"  {rpc:<15} n={len(values):<5} p50 {percentile(values, 0.5):7.3f}   "
              f"p99 {percentile(values, 0.99):7.3f}")
    print("status codes:", ", ".join(f"{c} {n}" for c, n in stats.codes.most_common()))
    print("by kind:", ", ".join(f"{k}/{c} {n}" for (k, c), n in sorted(stats.kinds.items())))
    print(f"health: {len(health_latency)} checks, p50 "
          f"{percentile(health_latency, 0.5) * 1000:.1f} ms, p99 "
          f"{percentile(health_latency, 0.99) * 1000:.1f} ms, max "
          f"{max(health_latency, default=float('nan')) * 1000:.1f} ms, failures "
          f"{dict(health_failures) or 0}")
    growth = None
    if pid:
        start_mb, end_mb = marks["start"] / 2**20, marks["end"] / 2**20
        warm_mb = marks.get("warm", marks["start"]) / 2**20
        growth = (end_mb - warm_mb) / warm_mb * 100
        print(f"server RSS: start {start_mb:.0f} MiB, after {warmup} requests (warm-up) "
              f"{warm_mb:.0f} MiB, end {end_mb:.0f} MiB: {growth:+.1f}% after warm-up over "
              f"{total - warmup} requests")
        print("server RSS every 500 requests (MiB):",
              ", ".join(f"{n}: {b / 2**20:.0f}" for n, b in series))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{date.today()}")
    bad = stats.codes.get("INTERNAL", 0) + stats.codes.get("UNKNOWN", 0)
    return 1 if bad or health_failures or (growth is not None and growth >= 5) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server")
    where.add_argument("--serve", action="store_true",
                       help="start `gramstyle serve --weights random` (vgg19, CPU) here")
    parser.add_argument("--pid", type=int, help="the server's process id, for its RSS")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3600.0, help="at most this long")
    parser.add_argument("--requests", type=int, default=1200, help="at most this many")
    parser.add_argument("--warmup", type=int, default=200,
                        help="requests before the 'after warm-up' RSS reading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-flags", default="",
                        help="extra `gramstyle serve` flags with --serve, e.g. '--workers 2'")
    args = parser.parse_args(argv)
    process = None
    target, pid = args.target, args.pid
    if args.serve:
        process, target = start_server(args.server_flags.split())
        pid = process.pid
    try:
        return run(target, pid, args.clients, args.seconds, args.requests, args.warmup,
                   args.seed)
    finally:
        if process:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
