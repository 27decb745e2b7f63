"""Seconds per style-transfer iteration: gramstyle's engine against a plain PyTorch one.

The plain implementation is the PyTorch tutorial's recipe (VGG19 ``features``, Gram =
F·Fᵀ/(C·H·W) with bmm, MSE losses, L-BFGS, float32, default memory layout). gramstyle runs the
same network and layers through ``StyleTransfer.stylize`` (fused Gram kernel, channels_last on
CPU, optional bf16 autocast). Both use seeded random VGG19 weights: speed does not depend on
the weight values.

Per-iteration time is (time of N+1 iterations − time of 1 iteration) / N, each the best of
two runs, so set-up (target features, image loading) is excluded for both.

    python bench/bench_engine.py --sizes 256 512 --iterations 5
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
from PIL import Image

from gramstyle import kernels
from gramstyle.images import load_image, resize_long_side
from gramstyle.options import StyleOptions
from gramstyle.server import StyleTransfer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--content", default=None)
    parser.add_argument("--style", default=None)
    parser.add_argument("--out", default="bench/results/engine.json")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    shared = Path(__file__).resolve().parents[2] / "shared" / "images"
    content = load_image(args.content or shared / "content" / "chelsea.png")
    style = load_image(args.style or shared / "style" / "starry_night.jpg")
    engine = StyleTransfer(arch="vgg19", weights="random", device=args.device)
    device = engine.device

    rows = []
    for size in args.sizes:
        plain = per_iteration(
            lambda n, s=size: plain_pytorch(content, style, n, s, device), args.iterations
        )
        row = {"size": size, "plain_fp32_s": plain}
        for precision in ("fp32", "bf16"):

            def run(n, s=size, p=precision):
                engine.stylize([content], [style], StyleOptions(size=s, iterations=n, precision=p))

            row[f"gramstyle_{precision}_s"] = per_iteration(run, args.iterations)
        rows.append(row)
        print(
            f"{size:>5} px  plain fp32 {plain:6.3f} s/it   gramstyle fp32 "
            f"{row['gramstyle_fp32_s']:6.3f} s/it ({plain / row['gramstyle_fp32_s']:.2f}x)   "
            f"gramstyle bf16 {row['gramstyle_bf16_s']:6.3f} s/it "
            f"({plain / row['gramstyle_bf16_s']:.2f}x)",
            flush=True,
        )

    meta = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "kernel_backend": kernels.backend(device),
        "torch": torch.__version__,
        "iterations": args.iterations,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
