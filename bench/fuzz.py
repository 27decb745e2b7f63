"""Fuzz a gramstyle server: hostile requests, counted by status code.

Cases are drawn by Hypothesis from the proto descriptors themselves (every field of every
request message, by type: edge-case numbers, NaN and infinities, unknown enum values,
long and non-ASCII strings, layer names and indices), with image fields filled from a corpus
of hostile images (truncated, header bombs, 16-bit, CMYK, EXIF-rotated, animated, huge
metadata chunks, formats outside the allowlist, random bytes, and issue 18's container bombs:
progressive-JPEG scan bombs, JPEG segment bombs, PNG chunk bombs), and about a third of the
messages then mutated at the byte level (bit flips, truncation, insertions, splices). Every
numeric field also gets the extremes of its type: float32 and float64 limits, just past
float32's, the smallest normals, subnormals and +-0. Some messages carry a large unknown
field, and some are sent gzip-compressed (refused UNIMPLEMENTED). Each case is sent as raw
bytes to one of Stylize, ComputeLosses, GetServerInfo, health Check or reflection, with a
10 s deadline.

A healthy server answers every case with a status that names the caller's mistake (or OK):
never INTERNAL or UNKNOWN, never a hang (DEADLINE_EXCEEDED at 10 s), and it is still SERVING
at the end.

    # against a running server (give it small limits so valid cases are cheap):
    gramstyle serve --weights random --max-size 64 --max-iterations 3 --port 50051 &
    python bench/fuzz.py --target localhost:50051 -n 10000
    # or let the script start one (the same flags) and also report its RSS:
    python bench/fuzz.py --serve -n 10000

``tests/server/test_fuzz.py`` runs a few hundred of the same cases in CI.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from gramstyle.inputs import INPUTS
from gramstyle.v1 import gramstyle_pb2 as pb

SERVICE = "gramstyle.v1.StyleTransferService"
#: A case that takes longer than this is a hang.
DEADLINE_S = 10.0
#: Codes that mean a server bug (or a hang).
BAD_CODES = ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")
#: Cases after which the server counts as warmed up, for the RSS comparison.
WARMUP_CASES = 1000
#: Seconds waited after the last case before the last RSS reading.
SETTLE_S = 10
#: --message-timeout of the server --serve starts: a withheld case lasts about this long.
WITHHELD_TIMEOUT_S = 2
#: Layer names and indices that exist in VGG19/VGG16, to reach past the name checks.
LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1", "conv1_1",
          "pool1", "pool5", "0", "2", "22", "36")
#: Image fields of the requests (bytes fields that carry an encoded image), as declared.
IMAGE_FIELDS = {entry.part or entry.field for entry in INPUTS}
#: Fields set in most cases: without them (or with their defaults) a case stops at the
#: first check on a fuzz server's small limits.
_USUALLY_SET = {"content", "style", "data", "candidate", "iterations", "size"}


# ---------------------------------------------------------------------------- hostile images


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height."""
    data = bytearray(_encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _with_chunk(png: bytes, chunk: bytes) -> bytes:
    """``png`` with ``chunk`` inserted after IHDR."""
    return png[:33] + chunk + png[33:]


def scan_bomb(image: Image.Image, scans: int) -> bytes:
    """A progressive JPEG of ``image`` whose last Huffman table and scan are repeated until
    it has ``scans`` scans (issue 18: 4096 x 4096 with 3,000 held a worker 29 s)."""
    data = _encode(image, "JPEG", progressive=True, quality=90)
    end = data.rindex(b"\xff\xd9")
    table = data.rindex(b"\xff\xc4", 0, data.rindex(b"\xff\xda"))
    extra = max(0, scans - data.count(b"\xff\xda"))
    return data[:end] + data[table:end] * extra + data[end:]


def chunk_bomb(png: bytes, chunks: int) -> bytes:
    """``png`` with ``chunks`` empty ancillary chunks after IHDR (issue 18: 5,200,000 of them
    starved the header probes)."""
    return _with_chunk(png, _png_chunk(b"teXt", b"") * chunks)


def segment_bomb(jpeg: bytes, segments: int) -> bytes:
    """``jpeg`` with ``segments`` tiny COM segments after SOI."""
    return jpeg[:2] + b"\xff\xfe\x00\x04hi" * segments + jpeg[2:]


def unknown_field(size: int, number: int = 1000) -> bytes:
    """A length-delimited field ``number`` of ``size`` zero bytes: unknown to every request
    (issue 18: a 60 MB one was estimated at 77 MiB and peaked at 183 MiB)."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
            value >>= 7
            if not value:
                return bytes(out)
    return varint(number << 3 | 2) + varint(size) + bytes(size)


@functools.cache
def hostile_images() -> tuple[bytes, ...]:
    """The corpus: small valid images of every allowed format and mode, and hostile ones."""
    import numpy as np

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    tiny = Image.new("RGB", (1, 1), "red")
    png = _encode(rgb, "PNG")
    jpeg = _encode(rgb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    frames = [Image.new("RGB", (20, 16), c) for c in ("red", "green", "blue")]
    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "x" * 200_000)
    grey16 = Image.fromarray((rng.integers(0, 65536, (16, 24))).astype(np.uint16))
    corpus = [
        png, jpeg, _encode(rgb, "WEBP"), _encode(rgb, "BMP"), _encode(rgb, "TIFF"),
        _encode(rgb, "GIF"), _encode(tiny, "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"), _encode(rgb.convert("LA"), "PNG"),
        _encode(rgb.convert("P"), "PNG", transparency=0), _encode(grey16, "PNG"),
        _encode(rgb.convert("CMYK"), "JPEG"), _encode(rgb, "JPEG", exif=exif),
        _encode(rgb.convert("F"), "TIFF"), _encode(rgb.convert("I"), "TIFF"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),  # APNG
        _encode(rgb, "PNG", pnginfo=text),  # a 200 kB text chunk
        _with_chunk(png, _png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"z" * 2**22))),
        _encode(rgb, "JPEG", comment=b"c" * 65_000),
        _png_bomb(5000, 5000), _png_bomb(60_000, 60_000), _png_bomb(2**31 - 1, 1),
        _png_bomb(0, 10), _png_bomb(4096, 4096),
        _encode(Image.new("RGB", (4096, 4096), "white"), "PNG"),  # a real bomb, 50 kB
        png[: len(png) // 2], jpeg[: len(jpeg) // 3], png[:40], b"\x89PNG\r\n\x1a\n",
        b"GIF89a" + b"\xff" * 20, b"BM" + b"\x00" * 60, b"II*\x00" + b"\x00" * 40,
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        _encode(rgb, "PPM"), _encode(rgb, "TGA"), _encode(rgb, "ICO"),
        b"", b"\x00", bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
        # Issue 18's container bombs, small: refused from their structure.
        scan_bomb(rgb, 40), scan_bomb(rgb, 32), segment_bomb(jpeg, 1100),
        chunk_bomb(png, 20_000), chunk_bomb(png, 1000),
        _with_chunk(png, _png_chunk(b"tEXt", b"k\x00" + b"t" * 2**20)),
    ]
    return tuple(corpus)


# ---------------------------------------------------------------------------- messages


_INTS = st.one_of(st.integers(-3, 80), st.sampled_from(
    [0, 1, -1, 16, 17, 32, 48, 64, 65, 2048, 10_000, 10_001, 2**31 - 1, -(2**31)]))
_INT64 = st.one_of(_INTS, st.sampled_from([2**63 - 1, -(2**63)]))
#: The extremes of float32 and float64, each sign: the largest finite, just past float32's
#: (3.5e38 overflowed torch.full in float32), the smallest normal, the smallest subnormal,
#: a subnormal, and zero.
FLOAT_EXTREMES = tuple(sign * value for value in (
    3.4028234663852886e38, 3.5e38, 1.7976931348623157e308, 1.1754943508222875e-38,
    2.2250738585072014e-308, 1.401298464324817e-45, 5e-324, 1e-40, 1e6, 0.0)
    for sign in (1, -1))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(0, 10), st.sampled_from([0.0, -0.0, 1.0, 1e-300, 1e300]),
                    st.sampled_from(FLOAT_EXTREMES))
_NAMES = st.one_of(st.sampled_from(LAYERS), st.text(max_size=20),
                   st.builds(lambda n, c: c * n, st.integers(1, 20_000), st.sampled_from("x9é")))
#: Valid images half of the time, so that cases get past the image checks.
_IMAGES = st.one_of(st.sampled_from(hostile_images()[:7]), st.sampled_from(hostile_images()),
                    st.binary(max_size=64))
#: Values that pass the request checks, drawn most of the time for these fields, so that
#: cases also reach the engine (the model fields mostly name the default model).
_HINTS = {
    "arch": st.sampled_from(["", "vgg19"]), "weights": st.sampled_from(["", "random"]),
    "iterations": st.integers(1, 3), "size": st.integers(16, 64), "scales": st.integers(1, 2),
    "progress_every": st.integers(1, 4), "style_scale": st.floats(0.5, 2.0),
    "learning_rate": st.floats(0.001, 2.0), "tolerance": st.floats(0, 0.1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    hint = _HINTS.get(field.name)
    generic = _generic(field)
    if hint is None:
        return generic
    # (Hypothesis's one_of would merge the repeated branches; sampled_from keeps the odds.)
    return st.sampled_from([hint, hint, hint, generic]).flatmap(lambda strategy: strategy)


def _generic(field: FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t == FieldDescriptor.TYPE_BYTES:
        return _IMAGES if field.name in IMAGE_FIELDS else st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_STRING:
        return _NAMES
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _FLOATS
    if t == FieldDescriptor.TYPE_ENUM:
        # Mostly the declared values, sometimes numbers the enum does not have.
        known = st.sampled_from([v.number for v in field.enum_type.values])
        return st.sampled_from([known, known, known, _INTS]).flatmap(lambda s: s)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_SFIXED64):
        return _INT64
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1]))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**64 - 1]))
    return _INTS


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else \
        field.label == FieldDescriptor.LABEL_REPEATED


@st.composite
def message(draw: Callable, descriptor, depth: int = 0):
    """A message of ``descriptor``'s type with a random subset of its fields set (each with
    probability about 1/3; the images, iterations and size 3/4, or most cases would stop at
    the first check), each drawn by type (nested messages up to depth 3)."""
    cls = _class(descriptor.full_name)
    msg = cls()
    for field in descriptor.fields:
        odds = (True, True, True, False) if field.name in _USUALLY_SET else \
            (False, False, True)
        if not draw(st.sampled_from(odds)):
            continue
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry or depth >= 3:
                continue
            if _repeated(field):
                for _ in range(draw(st.sampled_from((1, 1, 2, 0, 3, 9)))):
                    getattr(msg, field.name).add().CopyFrom(
                        draw(message(field.message_type, depth + 1)))
            else:
                getattr(msg, field.name).CopyFrom(draw(message(field.message_type, depth + 1)))
        elif _repeated(field):
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=4)))
        else:
            value = draw(_scalar(field))
            try:
                setattr(msg, field.name, value)
            except (ValueError, TypeError):  # e.g. an int out of the field's range
                pass
    return msg


@functools.cache
def _class(full_name: str):
    name = full_name.rsplit(".", 1)[-1]
    return getattr(pb, name)


@st.composite
def mutated(draw: Callable, data: bytes) -> bytes:
    """Byte-level mutations of a serialised message."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "varint"]))
        at = draw(st.integers(0, len(data))) if data else 0
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "splice" and data:
            start = draw(st.integers(0, len(data)))
            data[at:at] = data[start:start + draw(st.integers(1, 32))]
        elif op == "varint":  # a field header with a huge length
            data[at:at] = b"\x0a\xff\xff\xff\xff\x0f"
    return bytes(data)


@dataclass(frozen=True)
class Case:
    """One fuzz case: raw request bytes for one method."""

    method: str  # full path, e.g. /gramstyle.v1.StyleTransferService/Stylize
    payload: bytes
    streaming_response: bool = False
    streaming_request: bool = False
    #: Sent gzip-compressed (the server refuses compressed requests: UNIMPLEMENTED).
    compressed: bool = False
    #: Sent over raw HTTP/2 without its last byte (the server cuts it off at its
    #: --message-timeout); needs the server's address (:func:`send`'s ``target``).
    withheld: bool = False

    def __repr__(self) -> str:  # Hypothesis prints failing cases
        gzip = ", gzip" if self.compressed else ", withheld" if self.withheld else ""
        return (f"Case({self.method!r}, {len(self.payload)} bytes{gzip}: "
                f"{self.payload[:120]!r}...)")


_METHODS = [
    # (path, request type, server streaming, client streaming, weight)
    (f"/{SERVICE}/Stylize", pb.StylizeRequest, True, False, 5),
    (f"/{SERVICE}/ComputeLosses", pb.ComputeLossesRequest, False, False, 4),
    (f"/{SERVICE}/GetServerInfo", pb.GetServerInfoRequest, False, False, 1),
    ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, False, False, 1),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
     reflection_pb2.ServerReflectionRequest, True, True, 1),
]


@st.composite
def cases(draw: Callable, withheld: bool = False) -> Case:
    """A request for a random method: a generated message, a third of them mutated.
    ``withheld``: one in 200 is sent without its last byte (against a server whose
    --message-timeout is short: each such case lasts that long)."""
    path, cls, out_stream, in_stream, _ = draw(st.sampled_from(
        [m for m in _METHODS for _ in range(m[4])]))
    if cls.DESCRIPTOR.file.package == "gramstyle.v1":
        msg = draw(message(cls.DESCRIPTOR))
    elif cls is health_pb2.HealthCheckRequest:
        msg = cls(service=draw(st.one_of(st.just(""), st.just(SERVICE), st.text(max_size=40))))
    else:
        msg = cls(list_services="", file_containing_symbol=draw(st.one_of(
            st.just(SERVICE), st.text(max_size=40))))
    payload = msg.SerializeToString()
    if draw(st.integers(0, 2)) == 0:
        payload = draw(mutated(payload))
    # (sampled_from, not integers: Hypothesis draws an integer's bounds far more often.)
    if draw(st.sampled_from((False,) * 19 + (True,))):  # a field the server does not know
        payload += unknown_field(draw(st.sampled_from([1, 2**16, 2**20, 4 * 2**20])))
    compressed = draw(st.sampled_from((False,) * 29 + (True,)))
    # Not on reflection's request stream: a stream waiting for its next message is idle, not
    # withheld, and is not cut off (docs/service.md, Reliability).
    held = (withheld and not compressed and not in_stream
            and draw(st.sampled_from((False,) * 199 + (True,))))
    return Case(path, payload, out_stream, in_stream, compressed=compressed, withheld=held)


# ---------------------------------------------------------------------------- sending


def send(channel: grpc.Channel, case: Case, deadline: float = DEADLINE_S,
         target: str | None = None) -> str:
    """Send one case; the status code name (OK, INVALID_ARGUMENT, ...). A withheld case
    (sent to ``target``'s port) is CUT_OFF when the server ended it within ``deadline``,
    else DEADLINE_EXCEEDED (a hang)."""
    if case.withheld:
        try:  # bench/ on sys.path (run as a script) or the repository root (tests)
            from message_flood import WithheldCall
        except ImportError:
            from bench.message_flood import WithheldCall

        port = int(target.rsplit(":", 1)[1])
        took = WithheldCall(port, case.payload, None, path=case.method).run(deadline)
        return "CUT_OFF" if took is not None else "DEADLINE_EXCEEDED"
    gzip = grpc.Compression.Gzip if case.compressed else None
    try:
        if case.streaming_request:
            call = channel.stream_stream(case.method)(iter([case.payload]), timeout=deadline,
                                                      compression=gzip)
            for _ in call:
                pass
        elif case.streaming_response:
            for _ in channel.unary_stream(case.method)(case.payload, timeout=deadline,
                                                       compression=gzip):
                pass
        else:
            channel.unary_unary(case.method)(case.payload, timeout=deadline, compression=gzip)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.enable_retries", 0)]


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def run(target: str, n: int, seed: int | None = None, progress: bool = True,
        rss: Callable[[], int] | None = None, marks: dict[int, int] | None = None
        ) -> tuple[Counter, Counter, list[Case]]:
    """Send ``n`` cases; (codes, codes per method, the cases that hung or failed badly)."""
    codes: Counter = Counter()
    per_method: Counter = Counter()
    bad: list[Case] = []
    started = time.monotonic()
    with grpc.insecure_channel(target, options=channel_options()) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)

        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=seed is not None)
        @given(case=cases(withheld=True))
        def one(case: Case) -> None:
            code = send(channel, case, target=target)
            codes[code] += 1
            per_method[(case.method.rsplit("/", 1)[-1], code)] += 1
            if code in BAD_CODES:
                bad.append(case)
            done = sum(codes.values())
            if rss is not None and done % 500 == 0 and marks is not None:
                marks[done] = rss()
            if progress and done % 500 == 0:
                memory = f" RSS {marks[done] / 2**20:.0f} MiB" if rss and marks else ""
                print(f"  {done} cases in {time.monotonic() - started:.0f} s{memory}: "
                      f"{dict(codes)}", file=sys.stderr, flush=True)

        one()
    return codes, per_method, bad


def _rss(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``gramstyle serve`` with small limits on a free loopback port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--arch", "vgg19",
         "--weights", "random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
         "--max-size", "64", "--max-iterations", "3", "--max-pixels", str(512 * 512),
         "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ready = process.stdout.readline()
    if "ready on port" not in ready:
        process.kill()
        raise SystemExit(f"the server did not start: {ready!r}")
    port = int(ready.split("ready on port ")[1].split(":")[0])
    return process, f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running server")
    where.add_argument("--serve", action="store_true",
                       help="start `gramstyle serve --weights random` with small limits")
    parser.add_argument("-n", type=int, default=1000, help="cases to send (default 1000)")
    parser.add_argument("--seed", type=int, help="derandomise (the same cases every run)")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                        help="with --serve: another flag for gramstyle serve, e.g. "
                             "--serve-flag=--target-cache-mb=0 (repeatable)")
    args = parser.parse_args(argv)
    process = None
    target = args.target
    if args.serve:
        # Withheld cases are cut off at the message timeout: keep it short.
        process, target = start_server(["--message-timeout", str(WITHHELD_TIMEOUT_S),
                                        *args.serve_flag])
    try:
        rss_before = _rss(process.pid) if process else 0
        marks: dict[int, int] = {}
        started = time.monotonic()
        codes, per_method, bad = run(
            target, args.n, args.seed,
            rss=(lambda: _rss(process.pid)) if process else None, marks=marks)
        took = time.monotonic() - started
        with grpc.insecure_channel(target) as channel:
            alive = serving(channel)
        total = sum(codes.values())
        print(f"{total} cases in {took:.0f} s ({total / took:.1f}/s)")
        for code, count in codes.most_common():
            print(f"  {code:<20} {count}")
        print("per method:")
        for (method, code), count in sorted(per_method.items()):
            print(f"  {method:<22} {code:<20} {count}")
        hangs = codes.get("DEADLINE_EXCEEDED", 0)
        print(f"INTERNAL {codes.get('INTERNAL', 0)}, UNKNOWN {codes.get('UNKNOWN', 0)}, "
              f"hangs over {DEADLINE_S:.0f} s {hangs}; health after: "
              f"{'SERVING' if alive else 'NOT SERVING'}")
        if process:
            ended = _rss(process.pid)
            time.sleep(SETTLE_S)
            settled = _rss(process.pid)
            # The first cases warm the server up (first calls of each path, the target
            # cache filling to its --target-cache-mb): growth is judged from WARMUP_CASES on.
            warm = marks.get(WARMUP_CASES, rss_before)
            print(f"server RSS {rss_before / 2**20:.0f} MiB before, {warm / 2**20:.0f} MiB "
                  f"after {WARMUP_CASES} cases, {ended / 2**20:.0f} MiB at the end, "
                  f"{settled / 2**20:.0f} MiB {SETTLE_S} s later "
                  f"({100 * (settled - warm) / warm:+.1f} % from {WARMUP_CASES} cases)")
        for case in bad[:10]:
            print("bad case:", case)
        return 0 if alive and not bad else 1
    finally:
        if process:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
