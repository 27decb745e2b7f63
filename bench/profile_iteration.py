#!/usr/bin/env python
"""Where the time of one style-transfer iteration goes, by torch.profiler (CPU).

Runs ``StyleTransfer.stylize`` for a few iterations under ``torch.profiler`` and splits each
iteration into:

- ``gramstyle::forward``: the network up to the deepest layer, the content loss and the
  fused style-loss op (``gramstyle::style_loss``), the tv loss;
- ``gramstyle::backward``: autograd through all of it (the convolutions' input gradients,
  ``gramstyle::style_loss_backward``);
- ``gramstyle::lbfgs_update``: the L-BFGS two-loop recursion and step;
- the rest of the step (clamping, bookkeeping).

The L-BFGS update grows with its history (two vectors of the image's size per pair), which
a few profiled iterations do not reach, so it is also timed on its own for full histories
(``--histories``).

    python bench/profile_iteration.py --size 512 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch
from machine import cpu_model, load1
from torch.profiler import ProfilerActivity, profile

from gramstyle import kernels
from gramstyle.engine import StyleTransfer
from gramstyle.engine.lbfgs import LBFGS
from gramstyle.images import load_image
from gramstyle.options import StyleOptions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "images"
PHASES = ("gramstyle::forward", "gramstyle::backward", "gramstyle::lbfgs_update")
#: Operators worth naming in the breakdown (self CPU time, summed over the iterations).
OPS = {
    "convolution (fwd)": ("aten::mkldnn_convolution", "aten::_convolution_pointwise",
                          "aten::thnn_conv2d", "aten::_slow_conv2d_forward"),
    "convolution (bwd)": ("aten::convolution_backward", "aten::mkldnn_convolution_backward",
                          "aten::_slow_conv2d_backward"),
    "style-loss op (fwd)": ("gramstyle::style_loss",),
    "style-loss op (bwd)": ("gramstyle::style_loss_backward",),
    "relu / pooling": ("aten::relu", "aten::threshold_backward", "aten::max_pool2d_with_indices",
                       "aten::max_pool2d_with_indices_backward", "aten::clamp_min"),
    "autocast copies": ("aten::_to_copy", "aten::copy_"),
}


def profile_run(engine: StyleTransfer, content, style, size: int, precision: str,
                iterations: int) -> dict:
    options = StyleOptions(size=size, iterations=iterations, precision=precision, tolerance=0)
    engine.stylize([content], [style], StyleOptions(size=size, iterations=2,
                                                    precision=precision, tolerance=0))
    started = time.perf_counter()
    engine.stylize([content], [style], options)
    plain_s = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.stylize([content], [style], options)
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1e6 for e in events}
    own = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    phases = {name: total.get(name, 0.0) / iterations for name in PHASES}
    ops = {label: sum(own.get(k, 0.0) for k in keys) / iterations for label, keys in OPS.items()}
    top = sorted(((e.key, e.self_cpu_time_total / 1e6 / iterations) for e in events),
                 key=lambda kv: -kv[1])[:15]
    return {"precision": precision, "size": size, "iterations": iterations,
            "run_s_unprofiled": plain_s, "phases_s_per_it": phases, "ops_s_per_it": ops,
            "top_self_s_per_it": top}


def lbfgs_update_s(numel: int, history: int, repeats: int = 3) -> float:
    """Seconds of one L-BFGS update with a full history of ``history`` pairs."""
    x = torch.rand(numel, requires_grad=True)
    optimizer = LBFGS(x, history_size=history)
    target = torch.rand(numel)

    def closure():
        optimizer.zero_grad()
        loss = ((x - target) ** 2).sum() + (x ** 4).sum()
        loss.backward()
        return loss

    for _ in range(history + 1):  # fill the history
        optimizer.step(closure)
    times = []
    for _ in range(repeats):
        closure()
        started = time.perf_counter()
        with torch.no_grad():
            optimizer._update()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=["fp32", "bf16"])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--histories", type=int, nargs="*", default=[10, 20, 100])
    parser.add_argument("--arch", default="vgg19")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile_iteration.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    content = load_image(SHARED / "content" / "chelsea.png")
    style = load_image(SHARED / "style" / "starry_night.jpg")
    engine = StyleTransfer(arch=args.arch, weights=args.weights, device="cpu")
    meta = {"date": date.today().isoformat(), "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "kernel_backend": kernels.backend("cpu"), "arch": args.arch,
            "weights": args.weights, "load_before": load1()}
    runs = []
    for precision in args.precisions:
        run = profile_run(engine, content, style, args.size, precision, args.iterations)
        runs.append(run)
        per_it = run["run_s_unprofiled"] / args.iterations
        print(f"\n{args.size} px {precision}: {per_it:.3f} s/it (unprofiled, incl. set-up "
              f"/ {args.iterations})")
        for name, seconds in run["phases_s_per_it"].items():
            print(f"  {name:28s} {seconds * 1e3:8.1f} ms/it")
        for name, seconds in run["ops_s_per_it"].items():
            print(f"    {name:26s} {seconds * 1e3:8.1f} ms/it (self)")
    height = round(args.size * 300 / 451)  # the cat photo's aspect ratio
    numel = 3 * args.size * height
    histories = {h: lbfgs_update_s(numel, h) for h in args.histories}
    for h, seconds in histories.items():
        print(f"L-BFGS update, full history {h:3d}, {args.size}x{height} px: "
              f"{seconds * 1e3:7.1f} ms")
    meta["load_after"] = load1()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": runs,
                                    "lbfgs_update_s": histories}, indent=2) + "\n")
    print(f"load {meta['load_before']:.2f} -> {meta['load_after']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
