"""Seconds per style-transfer iteration: gramstyle's engine against a plain PyTorch one.

The plain implementation is the PyTorch tutorial's recipe (VGG19 ``features``, Gram =
F·Fᵀ/(C·H·W) with bmm, MSE losses, L-BFGS, float32, default memory layout). gramstyle runs the
same network and layers through ``StyleTransfer.stylize`` (fused Gram kernel, channels_last on
CPU, optional bf16 autocast), in fp32, bf16 and its default precision (auto: bf16 where the
hardware runs it natively), without the early stop (tolerance 0). Both use seeded random
VGG19 weights: speed does not depend on the weight values.

Per-iteration time is (time of N+1 iterations − time of 1 iteration) / N, each the best of
two runs, so set-up (target features, image loading) is excluded for both.

    python bench/bench_engine.py --sizes 256 512 --iterations 5
    python bench/bench_engine.py --sizes 512 --compute-losses    # + ComputeLosses via gRPC
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch
import torchvision
from machine import cpu_model, load1
from PIL import Image

from gramstyle import kernels
from gramstyle.engine import StyleTransfer
from gramstyle.images import load_image, resize_long_side
from gramstyle.options import StyleOptions

STYLE_LAYERS = (1, 6, 11, 20, 29)  # relu1_1 .. relu5_1 in vgg19().features
CONTENT_LAYER = 22  # relu4_2


def plain_pytorch(
    content: Image.Image, style: Image.Image, iterations: int, size: int, device: torch.device
) -> None:
    """The tutorial recipe, written the plain way."""
    torch.manual_seed(0)
    features = torchvision.models.vgg19().features[: max(STYLE_LAYERS) + 1].to(device).eval()
    for i, m in enumerate(features):
        if isinstance(m, torch.nn.ReLU):
            features[i] = torch.nn.ReLU(inplace=False)
    features.requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def to_tensor(im):
        return torchvision.transforms.functional.to_tensor(im).unsqueeze(0).to(device)

    def run(x):
        out, h = {}, (x - mean) / std
        for i, m in enumerate(features):
            h = m(h)
            if i in STYLE_LAYERS or i == CONTENT_LAYER:
                out[i] = h
        return out

    def gram(f):
        b, c, h, w = f.shape
        f = f.view(b, c, h * w)
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)

    content_t = to_tensor(resize_long_side(content, size))
    style_t = to_tensor(resize_long_side(style, size))
    with torch.no_grad():
        target_c = run(content_t)[CONTENT_LAYER]
        target_s = {i: gram(f) for i, f in run(style_t).items() if i in STYLE_LAYERS}
    x = content_t.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=1)

    def closure():
        opt.zero_grad()
        feats = run(x)
        loss = torch.nn.functional.mse_loss(feats[CONTENT_LAYER], target_c)
        for i in STYLE_LAYERS:
            loss = loss + 5 * torch.nn.functional.mse_loss(gram(feats[i]), target_s[i])
        loss.backward()
        return loss

    for _ in range(iterations):
        opt.step(closure)
        with torch.no_grad():
            x.clamp_(0, 1)


def per_iteration(run, iterations: int, repeats: int = 2) -> float:
    """(best time of a 1 + iterations run - best time of a 1-iteration run) / iterations."""
    def timed(n):
        start = time.perf_counter()
        run(n)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(1)  # warm-up: oneDNN/cuDNN primitive caches
    one = min(timed(1) for _ in range(repeats))
    many = min(timed(iterations + 1) for _ in range(repeats))
    return (many - one) / iterations


def compute_losses_through_service(engine: StyleTransfer, content: Image.Image,
                                   style: Image.Image, size: int, repeats: int = 5) -> dict:
    """Seconds of a ComputeLosses call through a loopback gRPC server: the first call against
    new targets (cold target cache) and repeated calls against the same targets."""
    import io

    import grpc

    from gramstyle.server.serve import GramstyleServer, ServeConfig
    from gramstyle.v1 import gramstyle_pb2 as pb
    from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()

    candidate = png(resize_long_side(content, size))
    out = {"size": size}
    server = GramstyleServer([engine], ServeConfig(host="127.0.0.1", port=0)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}",
                                   options=[("grpc.max_receive_message_length", 2**28)]) as ch:
            stub = pb_grpc.StyleTransferServiceStub(ch)
            for gradient in (False, True):
                request = pb.ComputeLossesRequest(
                    candidate=candidate, content=[pb.WeightedImage(data=png(content))],
                    style=[pb.WeightedImage(data=png(style))], gradient=gradient)

                def call(request=request) -> float:
                    started = time.perf_counter()
                    stub.ComputeLosses(request, timeout=600)
                    return time.perf_counter() - started

                call()  # warm-up (oneDNN primitives for these shapes)
                firsts, repeated = [], []
                for _ in range(2):
                    engine.target_cache.clear()
                    firsts.append(call())
                    repeated += [call() for _ in range(repeats)]
                key = "gradient" if gradient else "losses"
                out[key] = {"first_s": min(firsts), "repeated_s": min(repeated),
                            "speedup": min(firsts) / min(repeated)}
    finally:
        server.stop(grace=None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--content", default=None)
    parser.add_argument("--style", default=None)
    parser.add_argument("--compute-losses", type=int, nargs="*", default=None, metavar="SIZE",
                        help="also time ComputeLosses through a loopback server, first call "
                             "vs repeated (default sizes: --sizes)")
    parser.add_argument("--out", default="bench/results/engine.json")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    shared = Path(__file__).resolve().parents[2] / "shared" / "images"
    content = load_image(args.content or shared / "content" / "chelsea.png")
    style = load_image(args.style or shared / "style" / "starry_night.jpg")
    engine = StyleTransfer(arch="vgg19", weights="random", device=args.device)
    device = engine.device
    auto = engine.auto_precision
    load_before = load1()

    rows = []
    for size in args.sizes:
        plain = per_iteration(
            lambda n, s=size: plain_pytorch(content, style, n, s, device), args.iterations
        )
        row = {"size": size, "plain_fp32_s": plain}
        variants = [("fp32", engine, "fp32"), ("bf16", engine, "bf16"),
                    ("default", engine, "auto")]
        for name, runner, precision in variants:

            def run(n, s=size, p=precision, e=runner):
                # tolerance 0: time every iteration asked for (no early stop)
                e.stylize([content], [style], StyleOptions(size=s, iterations=n, precision=p,
                                                           tolerance=0))

            row[f"gramstyle_{name}_s"] = per_iteration(run, args.iterations)
        rows.append(row)
        shown = "   ".join(f"{k.removeprefix('gramstyle_').removesuffix('_s')} "
                           f"{v:6.3f} s/it ({plain / v:.2f}x)"
                           for k, v in row.items() if k.startswith("gramstyle_"))
        print(f"{size:>5} px  plain fp32 {plain:6.3f} s/it   {shown}  (default = {auto})",
              flush=True)

    losses = []
    for size in (args.sizes if args.compute_losses == [] else args.compute_losses or []):
        result = compute_losses_through_service(engine, content, style, size)
        losses.append(result)
        for key in ("losses", "gradient"):
            r = result[key]
            print(f"ComputeLosses {size} px ({key}): first {r['first_s']:.3f} s, repeated "
                  f"{r['repeated_s']:.3f} s ({r['speedup']:.2f}x)", flush=True)

    meta = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "kernel_backend": kernels.backend(device),
        "torch": torch.__version__,
        "iterations": args.iterations,
        "auto_precision": auto,
        "load_before": load_before,
        "load_after": load1(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows,
                                          "compute_losses": losses}, indent=2))
    print(f"load {meta['load_before']:.2f} -> {meta['load_after']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
