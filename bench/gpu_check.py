#!/usr/bin/env python
"""The measurements of bench/gpu_check.sh, one subcommand each; every one writes JSON (and a
Markdown table where there is one) into ``--out``.

    rates    the fused Gram/style-loss op and einsum at S x S for fp32, TF32 and bf16,
             forward and forward+backward, in achieved TFLOP/s next to a plain GEMM of the
             same shape measured on the spot (and a square GEMM, the device's practical peak)
    stylize  Stylize for N iterations in each precision: seconds per iteration
    syncs    host synchronisations inside optimiser steps (CUDA: must be 0)
    compile  eager against torch.compile'd extractor, forward+backward, per precision

FLOP counts (per layer, C channels, N = H*W positions): forward 2*C^2*N (one Gram matrix),
forward+backward 4*C^2*N (plus one GEMM for dL/dF): the least work either implementation
must do. The fused op computes only the upper triangle in the forward, so its achieved rate
may exceed the GEMM's.

Every subcommand runs on CUDA on a GPU machine and, with ``--device cpu`` and tiny sizes, on
the CPU (GPU_CHECK_SMOKE=1 in CI), so that it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_kernel  # noqa: E402  (bench/ is not a package)

DTYPES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True),
          "bf16": (torch.bfloat16, False)}


@contextlib.contextmanager
def tf32(enabled: bool):
    """Allow TF32 tensor cores for float32 matmuls (cuBLAS) inside the block."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def write(out: Path, name: str, data: dict, table: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    if table:
        (out / f"{name}.md").write_text("\n".join(table) + "\n")
        print("\n".join(table), flush=True)


def gemm_s(a: torch.Tensor, b: torch.Tensor, min_run_time: float) -> float:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def cmd_rates(args: argparse.Namespace) -> int:
    from gramstyle import kernels

    device = args.device
    if kernels.backend(device) != device:
        print(f"rates: the fused op has no {device} kernels here (backend "
              f"{kernels.backend(device)}); build it first", file=sys.stderr)
        return 2
    rows, table = [], ["| dtype | pass | S | einsum ms | fused ms | speed-up | einsum TFLOP/s "
                       "| fused TFLOP/s | GEMM TFLOP/s (same shapes) |",
                       "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    peaks = {}
    for name, (dtype, allow) in DTYPES.items():
        if name == "tf32" and device != "cuda":
            continue  # TF32 is a CUDA tensor-core mode
        with tf32(allow):
            side = args.peak_side
            a = torch.randn(side, side, device=device, dtype=dtype)
            peaks[name] = 2 * side ** 3 / gemm_s(a, a, args.min_run_time) / 1e12
            for mode in ("fwd", "fwd+bwd"):
                for size in args.sizes:
                    einsum_s = fused_s = gemm_total = flops = 0.0
                    for index, (_layer, channels, down) in enumerate(bench_kernel.LAYERS):
                        n = (size // down) ** 2
                        features, target, scale = bench_kernel.make_inputs(
                            channels, size // down, dtype, device, seed=index)
                        calls = {impl: bench_kernel.make_call(impl, mode, features, target,
                                                              scale)
                                 for impl in ("einsum", "fused")}
                        rounds = bench_kernel.time_alternating(
                            calls, torch.get_num_threads(), args.min_run_time, args.rounds,
                            f"{name} {mode} S={size}")
                        einsum_s += min(rounds["einsum"])
                        fused_s += min(rounds["fused"])
                        flat = features.reshape(channels, n)
                        gemms = 1 if mode == "fwd" else 2
                        gemm_total += gemms * gemm_s(flat, flat.t(), args.min_run_time)
                        flops += 2 * gemms * channels ** 2 * n
                        del features, target, calls
                    row = {"dtype": name, "mode": mode, "size": size,
                           "einsum_ms": einsum_s * 1e3, "fused_ms": fused_s * 1e3,
                           "speedup": einsum_s / fused_s, "flops": flops,
                           "einsum_tflops": flops / einsum_s / 1e12,
                           "fused_tflops": flops / fused_s / 1e12,
                           "gemm_tflops": flops / gemm_total / 1e12}
                    rows.append(row)
                    table.append(f"| {name} | {mode} | {size} | {row['einsum_ms']:.2f} | "
                                 f"{row['fused_ms']:.2f} | {row['speedup']:.2f}× | "
                                 f"{row['einsum_tflops']:.1f} | {row['fused_tflops']:.1f} | "
                                 f"{row['gemm_tflops']:.1f} |")
    table += ["", "Square GEMM (the device's practical peak): " + ", ".join(
        f"{k} {v:.1f} TFLOP/s" for k, v in peaks.items()) + f" at {args.peak_side}²."]
    write(args.out, "kernel_rates", {"device": device, "sizes": args.sizes, "rows": rows,
                                     "square_gemm_tflops": peaks}, table)
    return 0


def _engine(args: argparse.Namespace):
    from gramstyle.engine import StyleTransfer

    return StyleTransfer(arch=args.arch, weights=args.weights, device=args.device)


def _images(args: argparse.Namespace):
    from gramstyle.images import load_image

    folder = Path(args.shared) / "images"
    return (load_image(folder / "content" / "chelsea.png"),
            load_image(folder / "style" / "starry_night.jpg"))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cmd_stylize(args: argparse.Namespace) -> int:
    from gramstyle.options import StyleOptions

    engine = _engine(args)
    content, style = _images(args)
    rows, table = [], ["| precision | size | iterations | run s | s/iteration |",
                       "|---|---:|---:|---:|---:|"]
    for precision in args.precisions:
        def run(n: int, precision: str = precision) -> float:
            started = time.perf_counter()
            engine.stylize([content], [style], StyleOptions(
                size=args.size, iterations=n, precision=precision, tolerance=0))
            _sync(args.device)
            return time.perf_counter() - started

        run(2)  # warm-up: kernels, cuDNN/oneDNN plans, the target cache
        one = min(run(1) for _ in range(2))
        full = run(args.iterations)
        per_it = (full - one) / (args.iterations - 1)
        rows.append({"precision": precision, "size": args.size, "iterations": args.iterations,
                     "run_s": full, "s_per_iteration": per_it})
        table.append(f"| {precision} | {args.size} | {args.iterations} | {full:.2f} | "
                     f"{per_it * 1e3:.1f} ms |")
    write(args.out, "stylize", {"device": args.device, "arch": args.arch, "rows": rows}, table)
    return 0


def cmd_syncs(args: argparse.Namespace) -> int:
    """Count synchronising CUDA calls inside optimiser steps (torch's sync debug mode), or on
    the CPU the host reads of tensor values, which are what synchronise on CUDA."""
    from gramstyle.engine import optimise as optimise_module
    from gramstyle.options import StyleOptions

    engine = _engine(args)
    content, style = _images(args)
    in_step: list[int] = []
    events: list[str] = []
    make = optimise_module.make_optimizer

    def make_spied(x, options):
        optimizer = make(x, options)
        step = optimizer.step

        def spied(closure):
            in_step.append(1)
            try:
                return step(closure)
            finally:
                in_step.clear()

        optimizer.step = spied
        return optimizer

    optimise_module.make_optimizer = make_spied
    patched = []
    if args.device != "cuda":
        for name in ("item", "tolist", "__bool__", "__float__"):
            original = getattr(torch.Tensor, name)

            def spy(self, *a, _original=original, _name=name):
                if in_step:
                    events.append(_name)
                return _original(self, *a)

            setattr(torch.Tensor, name, spy)
            patched.append((name, original))
    results = {}

    def record(message, *_args, **_kwargs) -> None:
        if in_step and "synchroniz" in str(message):
            events.append(str(message).splitlines()[0])

    try:
        # On the CPU every read counts, and torch's Adam reads its step counter, a CPU
        # tensor (no CUDA sync): only our own L-BFGS is checked there.
        for optimizer in ("lbfgs", "adam") if args.device == "cuda" else ("lbfgs",):
            events.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record  # restored when the block ends
                if args.device == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.stylize([content], [style], StyleOptions(
                        size=args.size, iterations=args.iterations, optimizer=optimizer,
                        tolerance=0))
                finally:
                    if args.device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            results[optimizer] = {"iterations": args.iterations, "syncs_in_steps": len(events),
                                  "examples": sorted(set(events))[:5]}
            print(f"syncs: {optimizer}: {len(events)} host synchronisations inside "
                  f"{args.iterations} steps", flush=True)
    finally:
        optimise_module.make_optimizer = make
        for name, original in patched:
            setattr(torch.Tensor, name, original)
    write(args.out, "syncs", {"device": args.device, "results": results})
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from gramstyle.engine.objective import autocast

    engine = _engine(args)
    layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "relu4_2")
    x0 = torch.rand(1, 3, args.size * 2 // 3, args.size, device=args.device)
    rows, table = [], ["| precision | size | eager ms | compiled ms | speed-up | compile s |",
                       "|---|---:|---:|---:|---:|---:|"]
    for precision in args.precisions:
        net = engine.network(precision)
        compiled = torch.compile(net)

        def step(f, precision: str = precision) -> None:
            x = x0.detach().requires_grad_(True)
            with autocast(x.device, precision):
                out = f(x, layers)
                loss = sum(v.float().pow(2).mean() for v in out.values())
            loss.backward()
            _sync(args.device)

        started = time.perf_counter()
        step(compiled)
        compile_s = time.perf_counter() - started

        def best(f, n: int = 5) -> float:
            step(f)
            times = []
            for _ in range(n):
                started = time.perf_counter()
                step(f)
                times.append(time.perf_counter() - started)
            return min(times)

        eager, fast = best(net), best(compiled)
        rows.append({"precision": precision, "size": args.size, "eager_s": eager,
                     "compiled_s": fast, "speedup": eager / fast, "compile_s": compile_s})
        table.append(f"| {precision} | {args.size} | {eager * 1e3:.1f} | {fast * 1e3:.1f} | "
                     f"{eager / fast:.2f}× | {compile_s:.0f} |")
    write(args.out, "compile", {"device": args.device, "arch": args.arch, "rows": rows}, table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("rates", "stylize", "syncs", "compile"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--arch", default="vgg19")
        p.add_argument("--weights", default="random")
        p.add_argument("--shared", default=os.environ.get("GRAMSTYLE_SHARED")
                       or str(BENCH.parents[1] / "shared"))
        p.add_argument("--size", type=int, default=512)
        p.add_argument("--iterations", type=int, default=300)
        p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
        p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
        p.add_argument("--min-run-time", type=float, default=0.1)
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--peak-side", type=int, default=8192)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{args.command}: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    return {"rates": cmd_rates, "stylize": cmd_stylize, "syncs": cmd_syncs,
            "compile": cmd_compile}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
