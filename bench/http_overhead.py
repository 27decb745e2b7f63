"""The HTTP front's overhead: the same Stylize over gRPC and over HTTP (JSON in, server-sent
events out), side by side on one in-process server, alternating, so that both see the same
machine load.

    python bench/http_overhead.py --size 256 --iterations 50 --pairs 3

Prints one line per run and the median wall times (client side, request sent to result
decoded) with the HTTP/gRPC ratio; the issue's target is at most 1.05. Also checks that the
two answers are the same image.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time

import grpc
import httpx
import numpy as np
from machine import cpu_model, load1
from PIL import Image

from gramstyle.engine import StyleTransfer
from gramstyle.images import load_image, resize_long_side
from gramstyle.server.serve import GramstyleServer
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc


def png(path: str, size: int) -> bytes:
    buf = io.BytesIO()
    resize_long_side(load_image(path), size).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--content", default="../shared/images/content/chelsea.png")
    parser.add_argument("--style", default="../shared/images/style/starry_night.jpg")
    args = parser.parse_args()

    content, style = png(args.content, args.size), png(args.style, args.size)
    body = {"content": [{"data": base64.b64encode(content).decode()}],
            "style": [{"data": base64.b64encode(style).decode()}],
            "size": args.size, "iterations": args.iterations, "tolerance": 0.0}
    request = pb.StylizeRequest(content=[pb.WeightedImage(data=content)],
                                style=[pb.WeightedImage(data=style)], size=args.size,
                                iterations=args.iterations, tolerance=0.0)
    engine = StyleTransfer(arch="vgg19", weights="random", device="cpu")
    times: dict[str, list[float]] = {"grpc": [], "http": []}
    images: dict[str, bytes] = {}
    with GramstyleServer([engine], host="127.0.0.1", port=0, http_port=0) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, \
            httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}",
                         timeout=3600) as http:
        stub = pb_grpc.StyleTransferServiceStub(channel)

        def over_grpc() -> bytes:
            results = [m.result for m in stub.Stylize(request, timeout=3600)
                       if m.HasField("result")]
            return results[0].image.data

        def over_http() -> bytes:
            result = None
            with http.stream("POST", "/v1/stylize", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        message = json.loads(line[5:])
                        result = message.get("result", result)
            return base64.b64decode(result["image"]["data"])

        over_grpc()  # warm-up: first-call allocations, the target cache
        for pair in range(args.pairs):
            for name, call in (("grpc", over_grpc), ("http", over_http))[::1 - 2 * (pair % 2)]:
                start = time.perf_counter()
                images[name] = call()
                times[name].append(time.perf_counter() - start)
                print(f"pair {pair} {name}: {times[name][-1]:.2f} s", flush=True)
    same = np.array_equal(*(np.asarray(Image.open(io.BytesIO(images[n]))) for n in images))
    grpc_s, http_s = statistics.median(times["grpc"]), statistics.median(times["http"])
    print(f"{cpu_model()}, load {load1():.1f}; {args.size} px, {args.iterations} iterations, "
          f"{args.pairs} pairs: median gRPC {grpc_s:.2f} s, HTTP {http_s:.2f} s, ratio "
          f"{http_s / grpc_s:.3f}; same image: {same}")


if __name__ == "__main__":
    main()
