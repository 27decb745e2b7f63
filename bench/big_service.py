"""A big Stylize through a real ``gramstyle serve`` with the default limits (issue 19,
"Service" target): the result arrives whole through the client library with its default
settings, every message stays small, and the image matches the in-process engine's.

    python bench/big_service.py                  # 4096 px, random weights, 2 iterations
    python bench/big_service.py --weights ../shared/models/vgg16-hed-bsds500.pth --arch vgg16
    python bench/big_service.py --smoke          # 96 px, 1 KiB chunks: seconds (a test runs it)

Steps: start ``gramstyle serve`` (default limits: 64 MiB messages, the machine's memory
budget, ``--max-size`` 4096; ``--smoke`` adds ``--result-chunk-kb 1`` so that a small result
is chunked too), send one Stylize with :class:`gramstyle.client.Client` at its defaults
(counting the stream's messages and their sizes on the way), read the server's peak RSS
(VmHWM) and stop it; then run the same request in this process with the engine and compare.

The comparison runs in fp32 with an explicit ``--tile`` (the server's ``auto`` would pick a
tile from its memory budget, the in-process engine's ``auto`` runs untiled: different
summation orders). Same seed, options, weights and tile give the same computation; the
tolerance allows for the one thing that may still differ -- the order in which a
multithreaded CPU kernel sums (the server's process and this one may split work across
threads differently), which moves a float32 value by a few ulps and can round an 8-bit
pixel to the neighbouring level. So: the same size, no value more than 2 levels apart
(of 255), and the mean absolute difference below 0.05 levels. A real bug (a missing chunk, a
shifted tile, another seed) gives differences of tens of levels.

The last line of stdout is a JSON object with every figure (``ok``: the checks passed); the
exit status is 0 when they did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from machine import cpu_model, load1
from replicas import free_port

REPO = Path(__file__).resolve().parents[1]
#: The shared images: $GRAMSTYLE_SHARED, else ../shared, else /work/shared (as tests/conftest).
SHARED = next((Path(c) for c in (os.environ.get("GRAMSTYLE_SHARED"), REPO.parent / "shared",
                                 "/work/shared") if c and (Path(c) / "images").is_dir()),
              REPO.parent / "shared")
CONTENT = SHARED / "images" / "content" / "chelsea.png"
STYLE = SHARED / "images" / "style" / "starry_night.jpg"
#: Largest difference allowed per 8-bit value, and in the mean (see the module docstring).
MAX_LEVELS = 2
MEAN_LEVELS = 0.05


def peak_rss_bytes(pid: int) -> int:
    """A process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class CountingCall:
    """A Stylize call object that records the kind and wire size of every message."""

    def __init__(self, call, seen: list[tuple[str, int]]):
        self.call, self.seen = call, seen

    def __iter__(self):
        for message in self.call:
            self.seen.append((message.WhichOneof("kind"), message.ByteSize()))
            yield message

    def cancel(self) -> None:
        self.call.cancel()


def serve(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    extra = ["--result-chunk-kb", str(args.chunk_kb)] if args.chunk_kb else []
    return subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--arch", args.arch, "--weights", args.weights, "--device", args.device,
         *extra], stdout=log, stderr=subprocess.STDOUT)


def through_service(args: argparse.Namespace, options: dict) -> dict:
    from gramstyle.client import Client, ServiceError

    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = serve(args, port, log)
        try:
            with Client(f"127.0.0.1:{port}") as client:  # the library's defaults
                deadline = time.monotonic() + 300
                while True:
                    if proc.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"gramstyle serve exited {proc.returncode}:\n"
                                           f"{log.read().decode(errors='replace')[-3000:]}")
                    try:
                        info = client.server_info(timeout=5)
                        break
                    except ServiceError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                seen: list[tuple[str, int]] = []
                real = client.stub.Stylize
                client.stub = SimpleNamespace(
                    Stylize=lambda request, **kw: CountingCall(real(request, **kw), seen))
                started = time.monotonic()
                result = client.stylize(CONTENT, STYLE, **options)
                wall = time.monotonic() - started
            rss = peak_rss_bytes(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
    kinds = [kind for kind, _ in seen]
    return {"result": result, "wall_s": wall, "server_peak_rss_bytes": rss,
            "messages": len(seen), "progress_messages": kinds.count("progress"),
            "chunk_messages": kinds.count("result_chunk"),
            "largest_message_bytes": max(size for _, size in seen),
            "server_limits": {k: info.limits[k] for k in ("max_size", "max_message_bytes",
                                                          "max_request_memory_bytes")}}


def in_process(args: argparse.Namespace, options: dict):
    from gramstyle.engine import StyleTransfer
    from gramstyle.options import StyleOptions

    engine = StyleTransfer(arch=args.arch, weights=args.weights, device=args.device)
    started = time.monotonic()
    result = engine.stylize([CONTENT], [STYLE], StyleOptions(**options))
    return result, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="output long side (default 4096)")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--tile", type=int, default=512,
                   help="tile side for both runs (explicit: see the module docstring)")
    p.add_argument("--arch", default="vgg19", choices=["vgg19", "vgg16"])
    p.add_argument("--weights", default="random", help="random (default) or a path")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--chunk-kb", type=int, default=0,
                   help="pass --result-chunk-kb to the server (default: its default)")
    p.add_argument("--smoke", action="store_true",
                   help="96 px, tile 48, 1 KiB chunks: a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.tile, args.chunk_kb = 96, 48, args.chunk_kb or 1
    options = {"size": args.size, "iterations": args.iterations, "tile": args.tile,
               "seed": args.seed, "precision": "fp32"}

    served = through_service(args, options)
    remote = served.pop("result")
    local, local_wall = in_process(args, options)
    a = np.asarray(remote.image, dtype=np.int16)
    b = np.asarray(local.image, dtype=np.int16)
    same_size = a.shape == b.shape
    diff = np.abs(a - b) if same_size else None
    report = {
        "size": args.size, "width": remote.width, "height": remote.height,
        "iterations": args.iterations, "tile": args.tile, "weights": args.weights,
        "encoded_bytes": len(remote.data), **served,
        "in_process_wall_s": local_wall,
        "max_diff_levels": int(diff.max()) if same_size else None,
        "mean_diff_levels": float(diff.mean()) if same_size else None,
        "identical_fraction": float((diff == 0).mean()) if same_size else None,
        "cpu": cpu_model(), "load1": load1(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report["ok"] = bool(same_size and report["max_diff_levels"] <= MAX_LEVELS
                        and report["mean_diff_levels"] < MEAN_LEVELS
                        and report["largest_message_bytes"]
                        < report["server_limits"]["max_message_bytes"])
    print(f"{report['width']}x{report['height']} px, {report['encoded_bytes'] / 2**20:.1f} MiB "
          f"PNG: {report['messages']} messages ({report['progress_messages']} progress, "
          f"{report['chunk_messages']} chunks, 1 result), largest "
          f"{report['largest_message_bytes'] / 2**20:.2f} MiB; service {report['wall_s']:.1f} s, "
          f"server peak RSS {report['server_peak_rss_bytes'] / 2**30:.2f} GiB; in-process "
          f"{local_wall:.1f} s; max diff {report['max_diff_levels']} levels, mean "
          f"{report['mean_diff_levels']}; {report['cpu']}, {report['date']}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
