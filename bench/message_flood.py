"""Issue 18, item 1 at full size: many large request messages at once -- without a token,
with a token but an invalid image, gzip-compressed, or withheld one byte short of their end
-- against ``gramstyle serve --weights random --memory-budget B --auth-tokens``, measuring the
server's RSS: its baseline, its peak (VmHWM, reset before each attack), and how long it
takes to come back within 64 MiB of the baseline.

    python bench/message_flood.py                       # 40 x 60 MiB, every attack
    python bench/message_flood.py --smoke               # 3 x 2 MiB (tests/server/...)

Prints one line per attack and, last, a JSON list of them. Exit 1 when a peak is over the
memory budget + the message budget + ``--overhead`` above the baseline, or the RSS does not
come back within 10 s.

The withheld attack speaks HTTP/2 itself (:class:`WithheldCall`): grpc's clients cannot
send part of a message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from gramstyle.v1 import gramstyle_pb2 as pb

TOKEN = "flood-token"
STYLIZE = "/gramstyle.v1.StyleTransferService/Stylize"
MiB = 2**20


def _status(pid: int, key: str) -> int:
    match = re.search(key + r":\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---------------------------------------------------------------------------- raw HTTP/2


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    def string(text: str) -> bytes:
        data = text.encode()
        assert len(data) < 127
        return bytes([len(data)]) + data
    return b"\x00" + string(name) + string(value)


class WithheldCall:
    """A gRPC call over a raw HTTP/2 connection that sends all of a message but its last
    byte, honouring flow control, then waits for the server to end the stream."""

    def __init__(self, port: int, message: bytes, token: str | None, path: str = STYLIZE):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.payload = b"\x00" + struct.pack(">I", len(message)) + message
        headers = b"".join(_literal(k, v) for k, v in (
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"),
            ("te", "trailers"), *((("authorization", f"Bearer {token}"),) if token else ())))
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0)
                          + _frame(1, 0x4, 1, headers))
        self.connection_window = self.stream_window = 65535
        self.ended_at: float | None = None
        self.sent = 0

    def _read_frame(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        length = int.from_bytes(head[:3], "big")
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, \
            self._read(length)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _handle(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == 4 and not flags & 1:  # SETTINGS: apply INITIAL_WINDOW_SIZE, ack
            for i in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[i:i + 6])
                if key == 4:
                    self.stream_window += value - 65535
            self.sock.sendall(_frame(4, 1, 0))
        elif kind == 8:  # WINDOW_UPDATE
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream == 0:
                self.connection_window += increment
            else:
                self.stream_window += increment
        elif kind == 6 and not flags & 1:  # PING
            self.sock.sendall(_frame(6, 1, 0, payload))
        elif stream == 1 and (kind == 3 or (kind == 1 and flags & 1)) or kind == 7:
            self.ended_at = time.monotonic()  # RST_STREAM, trailers, GOAWAY

    def run(self, timeout: float) -> float | None:
        """Send all but the last byte, then wait; seconds until the server ended the call
        (None: not within ``timeout``)."""
        start = time.monotonic()
        self.sock.settimeout(timeout)
        todo = len(self.payload) - 1
        try:
            while self.ended_at is None:
                window = min(self.connection_window, self.stream_window, 16384,
                             todo - self.sent)
                if window > 0:
                    chunk = self.payload[self.sent:self.sent + window]
                    self.sock.sendall(_frame(0, 0, 1, chunk))
                    self.sent += window
                    self.connection_window -= window
                    self.stream_window -= window
                    continue
                self._handle(*self._read_frame())
        except (OSError, ConnectionError):
            if self.ended_at is None and time.monotonic() - start < timeout:
                self.ended_at = time.monotonic()  # the server closed the connection
        finally:
            self.sock.close()
        return None if self.ended_at is None else self.ended_at - start


# ---------------------------------------------------------------------------- attacks


def _stylize(message_bytes: int) -> bytes:
    """A Stylize request of about ``message_bytes`` whose content is a corrupt PNG."""
    return pb.StylizeRequest(
        content=[pb.WeightedImage(data=b"\x89PNG\r\n\x1a\n" + bytes(message_bytes))],
        style=[pb.WeightedImage(data=b"\x89PNG\r\n\x1a\n")], size=32).SerializeToString()


def attack(kind: str, port: int, calls: int, size: int, timeout: float) -> dict:
    payload = _stylize(size)
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def one(_: int) -> None:
        if kind == "withheld":
            took = WithheldCall(port, payload, TOKEN).run(timeout)
            code = "ENDED" if took is not None else "HELD"
        else:
            metadata = [] if kind == "unauthenticated" else [("authorization",
                                                              f"Bearer {TOKEN}")]
            gzip = grpc.Compression.Gzip if kind == "gzip" else None
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[
                    ("grpc.max_send_message_length", 128 * MiB),
                    ("grpc.use_local_subchannel_pool", 1)]) as channel:
                try:
                    list(channel.unary_stream(STYLIZE)(payload, timeout=timeout,
                                                       metadata=metadata, compression=gzip))
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
        with lock:
            codes[code] = codes.get(code, 0) + 1

    with ThreadPoolExecutor(calls) as pool:
        list(pool.map(one, range(calls)))
    return codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--message-mb", type=int, default=60)
    parser.add_argument("--memory-budget", default="512M")
    parser.add_argument("--message-budget", default="512M")
    parser.add_argument("--message-timeout", type=float, default=10.0)
    parser.add_argument("--overhead-mb", type=int, default=256,
                        help="the fixed overhead allowed above the budgets (MiB)")
    parser.add_argument("--attacks", default="unauthenticated,invalid,gzip,withheld")
    parser.add_argument("--smoke", action="store_true",
                        help="3 calls of 2 MiB, 4 MiB messages, 64M budgets, 2 s timeout")
    args = parser.parse_args(argv)
    max_message_mb = 64
    if args.smoke:
        args.calls, args.message_mb, max_message_mb = 3, 2, 4
        args.memory_budget = args.message_budget = "64M"
        args.message_timeout = 2.0
    with tempfile.TemporaryDirectory() as folder:
        tokens = Path(folder) / "tokens.txt"
        tokens.write_text(f"{TOKEN}\n")
        process = subprocess.Popen(
            [sys.executable, "-m", "gramstyle.cli", "serve", "--weights", "random",
             "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
             "--memory-budget", args.memory_budget, "--message-budget", args.message_budget,
             "--message-timeout", str(args.message_timeout), "--max-message-mb",
             str(max_message_mb), "--auth-tokens", str(tokens), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            ready = process.stdout.readline()
            if "ready on port" not in ready:
                raise SystemExit(f"the server did not start: {ready!r}")
            port = int(ready.split("ready on port ")[1].split(":")[0])
            budget = (_parse(args.memory_budget) + _parse(args.message_budget)
                      + args.overhead_mb * MiB)
            rows, ok = [], True
            for kind in args.attacks.split(","):
                time.sleep(1.0)
                baseline = _status(process.pid, "VmRSS")
                _reset_peak(process.pid)
                start = time.monotonic()
                codes = attack(kind, port, args.calls, args.message_mb * MiB,
                               timeout=args.message_timeout + 20)
                took = time.monotonic() - start
                peak = _status(process.pid, "VmHWM")
                back = None
                for tenth in range(100):
                    if _status(process.pid, "VmRSS") <= baseline + 64 * MiB:
                        back = tenth / 10
                        break
                    time.sleep(0.1)
                row = {"attack": kind, "calls": args.calls, "message_mb": args.message_mb,
                       "codes": codes, "seconds": round(took, 1),
                       "baseline_mib": baseline // MiB, "peak_mib": peak // MiB,
                       "above_baseline_mib": (peak - baseline) // MiB,
                       "back_within_s": back}
                row["ok"] = peak - baseline <= budget and back is not None
                ok &= row["ok"]
                rows.append(row)
                print(f"{kind:<16} {codes} in {took:.1f} s: RSS {baseline // MiB} -> peak "
                      f"{peak // MiB} MiB (+{(peak - baseline) // MiB}), back in "
                      f"{back} s", flush=True)
            print(json.dumps(rows))
            return 0 if ok else 1
        finally:
            process.terminate()
            process.wait(timeout=60)


def _parse(size: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(size[:-1]) * units[size[-1].upper()]) if size[-1].upper() in units \
        else int(size)


if __name__ == "__main__":
    sys.exit(main())
