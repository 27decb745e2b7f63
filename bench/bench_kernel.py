#!/usr/bin/env python
"""Benchmark the fused Gram / style-loss operator against the einsum path.

Shapes: the five VGG19 style layers for an S x S input (batch 1):
    relu1_1 [64, S, S], relu2_1 [128, S/2, S/2], relu3_1 [256, S/4, S/4],
    relu4_1 [512, S/8, S/8], relu5_1 [512, S/16, S/16]
for S in {256, 512, 1024}, forward only ("fwd") and forward+backward ("fwd+bwd"), float32
features and bfloat16 features (as under bf16 autocast; the target Gram stays float32), on
the CPU and, when present, on CUDA.

What is timed: ``gramstyle.kernels.ops.style_loss`` (the fused op) and
``gramstyle.kernels.reference.style_loss`` (einsum), called with scale 1/(C*N) against a
float32 target. "fwd" runs on features without requires_grad (no autograd graph);
"fwd+bwd" runs the loss and ``torch.autograd.grad(loss, features)``.

Timing: torch.utils.benchmark.Timer with num_threads = all cores (its default is 1). For
each shape the two implementations are measured alternately for --rounds rounds, each a
blocked_autorange of --min-run-time seconds; a time is the smallest per-round median, so a
burst of load from other processes penalises neither side systematically.

Peak memory: the extra memory one call needs beyond its inputs. CPU: the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim) minus the
resident set before the call -- every page the call touches, including BLAS workspaces.
CUDA: torch.cuda.max_memory_allocated minus memory_allocated before the call.

Outputs (in --out, default bench/results): bench_kernel.md (the table, with speed-ups and
per-S sums over the five layers), bench_kernel.json (everything, including each round) and
bench_kernel.png (per-S sums). Examples:

    python bench/bench_kernel.py                       # everything (several minutes)
    python bench/bench_kernel.py --sizes 512 --dtypes fp32 --modes fwd+bwd   # the target
    python bench/bench_kernel.py --sweep-blocks --sizes 512                  # panel widths
    python bench/bench_kernel.py --weighted --sizes 512 --dtypes fp32  # guided Gram rows

--weighted times the per-position weighted op (guided Gram, ``weights=``) instead: a soft
mask (ones on the left half, a ramp to zero on the right) at each layer's resolution, the
fused op with those weights against the einsum written for the weighted case
(``reference.style_loss(f, A, s, w)``: the Gram of F diag(w)). Its rows say "weighted".
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from machine import cpu_model
from torch.utils import benchmark

import gramstyle.kernels as K
from gramstyle.kernels import reference

LAYERS: list[tuple[str, int, int]] = [  # (name, channels, downsampling of S)
    ("relu1_1", 64, 1),
    ("relu2_1", 128, 2),
    ("relu3_1", 256, 4),
    ("relu4_1", 512, 8),
    ("relu5_1", 512, 16),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
TARGET = {"device": "cpu", "dtype": "fp32", "mode": "fwd+bwd", "size": 512, "speedup": 1.8}
MIB = 2**20


@dataclass
class Row:
    """One benchmark row; times in milliseconds, memory in MiB."""

    device: str
    dtype: str
    mode: str
    size: int
    layer: str
    shape: list[int]  # [C, H, W]
    einsum_ms: float
    fused_ms: float
    speedup: float
    einsum_peak_mib: float
    fused_peak_mib: float
    einsum_rounds_ms: list[float] = field(default_factory=list)
    fused_rounds_ms: list[float] = field(default_factory=list)
    #: Per-position weights (the guided Gram) on both sides.
    weighted: bool = False


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _proc_status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"{key}:\s+(\d+) kB", text)
    if match is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(match.group(1)) * 1024


def peak_extra_bytes(fn: Callable[[], object], device: str) -> float:
    """Extra memory one call of fn needs beyond what is allocated before it (see module doc)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    if _LIBC is None:
        return float("nan")
    _LIBC.malloc_trim(0)  # give freed heap pages back, so reusing them counts as touching
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _proc_status_bytes("VmRSS")
    fn()
    return float(_proc_status_bytes("VmHWM") - before)


# ----------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------


def make_inputs(
    channels: int, side: int, dtype: torch.dtype, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ReLU-like features [1,C,side,side], a float32 target Gram, and scale 1/(C*N)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, channels, side, side)
    features = torch.randn(shape, generator=gen).relu_().to(device=device, dtype=dtype)
    other = torch.randn(shape, generator=gen).relu_().to(device)
    scale = 1.0 / (channels * side * side)
    target = reference.gram(other, scale)[0].float()
    return features, target, scale


def make_weights(side: int, device: str) -> torch.Tensor:
    """A soft region mask as [N] weights: ones on the left half, a ramp to 0 on the right."""
    cols = torch.linspace(0, 1, side)
    row = torch.where(cols < 0.5, torch.ones_like(cols), 2 * (1 - cols))
    return row.expand(side, side).reshape(-1).contiguous().to(device)


def make_call(impl: str, mode: str, features: torch.Tensor, target: torch.Tensor, scale: float,
              weights: torch.Tensor | None = None):
    if impl == "fused":
        from gramstyle.kernels import ops

        def loss_fn(f: torch.Tensor) -> torch.Tensor:
            if weights is None:
                return ops.style_loss(f, target, scale)
            return ops.style_loss(f, target, scale, 0, weights)
    else:

        def loss_fn(f: torch.Tensor) -> torch.Tensor:
            if weights is None:
                return reference.style_loss(f, target, scale)
            return reference.style_loss(f, target, scale, weights)

    if mode == "fwd":
        f = features.detach()
        return lambda: loss_fn(f)
    f = features.detach().requires_grad_()
    return lambda: torch.autograd.grad(loss_fn(f), f)


def time_alternating(
    calls: dict[str, Callable[[], object]],
    threads: int,
    min_run_time: float,
    rounds: int,
    label: str,
) -> dict[str, list[float]]:
    """Per-round median seconds for each call, the calls measured in alternation."""
    for call in calls.values():
        call()  # warm-up: first-touch allocation, MKL/oneDNN kernel selection
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            timer = benchmark.Timer(
                stmt="call()",
                globals={"call": call},
                num_threads=threads,
                label=label,
                description=name,
            )
            out[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return out


def run_rows(args: argparse.Namespace, device: str, threads: int) -> list[Row]:
    rows: list[Row] = []
    for dtype_name in args.dtypes:
        for mode in args.modes:
            for size in args.sizes:
                for index, (layer, channels, down) in enumerate(LAYERS):
                    side = size // down
                    features, target, scale = make_inputs(
                        channels, side, DTYPES[dtype_name], device, seed=index
                    )
                    weights = make_weights(side, device) if args.weighted else None
                    calls = {
                        impl: make_call(impl, mode, features, target, scale, weights)
                        for impl in ("einsum", "fused")
                    }
                    label = f"{device} {dtype_name} {mode} S={size} {layer}"
                    if args.weighted:
                        label += " weighted"
                    rounds = time_alternating(calls, threads, args.min_run_time, args.rounds, label)
                    peaks = {name: peak_extra_bytes(call, device) for name, call in calls.items()}
                    einsum_s, fused_s = min(rounds["einsum"]), min(rounds["fused"])
                    row = Row(
                        device=device,
                        dtype=dtype_name,
                        mode=mode,
                        size=size,
                        layer=layer,
                        shape=[channels, side, side],
                        einsum_ms=einsum_s * 1e3,
                        fused_ms=fused_s * 1e3,
                        speedup=einsum_s / fused_s,
                        einsum_peak_mib=peaks["einsum"] / MIB,
                        fused_peak_mib=peaks["fused"] / MIB,
                        einsum_rounds_ms=[t * 1e3 for t in rounds["einsum"]],
                        fused_rounds_ms=[t * 1e3 for t in rounds["fused"]],
                        weighted=args.weighted,
                    )
                    rows.append(row)
                    print(
                        f"{label:38s} einsum {row.einsum_ms:9.2f} ms  fused {row.fused_ms:9.2f} ms"
                        f"  x{row.speedup:5.2f}  peak {row.einsum_peak_mib:7.1f} / "
                        f"{row.fused_peak_mib:7.1f} MiB",
                        flush=True,
                    )
                    del features, target, calls
    return rows


def sums(rows: list[Row]) -> list[dict]:
    """Per (device, dtype, mode, S): times summed over the five layers, and the speed-up."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.device, row.dtype, row.mode, row.size), []).append(row)
    out = []
    for (device, dtype, mode, size), group in groups.items():
        einsum_ms = sum(r.einsum_ms for r in group)
        fused_ms = sum(r.fused_ms for r in group)
        out.append(
            {
                "device": device,
                "dtype": dtype,
                "mode": mode,
                "size": size,
                "layers": len(group),
                "einsum_ms": einsum_ms,
                "fused_ms": fused_ms,
                "speedup": einsum_ms / fused_ms,
                "einsum_peak_mib": max(r.einsum_peak_mib for r in group),
                "fused_peak_mib": max(r.fused_peak_mib for r in group),
            }
        )
    return out


# ----------------------------------------------------------------------------------------
# Panel-width sweep (how the defaults in csrc/gram.cpp panel_width were chosen)
# ----------------------------------------------------------------------------------------


def block_candidates(channels: int) -> list[int]:
    widths = {channels}
    for parts in (2, 4, 8):
        width = -(-channels // parts)
        width = -(-width // 16) * 16
        if 16 <= width < channels:
            widths.add(width)
    return [0, *sorted(widths, reverse=True)]  # 0 = the built-in default


def sweep_blocks(args: argparse.Namespace, device: str, threads: int) -> list[dict]:
    from gramstyle.kernels import ops

    results = []
    for dtype_name in args.dtypes:
        for size in args.sizes:
            for index, (layer, channels, down) in enumerate(LAYERS):
                side = size // down
                features, target, scale = make_inputs(
                    channels, side, DTYPES[dtype_name], device, seed=index
                )
                calls = {
                    str(width): (
                        lambda w=width, f=features, a=target, s=scale: ops.style_loss(f, a, s, w)
                    )
                    for width in block_candidates(channels)
                }
                label = f"sweep {device} {dtype_name} S={size} {layer}"
                rounds = time_alternating(calls, threads, args.min_run_time / 2, args.rounds, label)
                times = {width: min(t) * 1e3 for width, t in rounds.items()}
                best = min((w for w in times if w != "0"), key=times.__getitem__)
                results.append(
                    {
                        "device": device,
                        "dtype": dtype_name,
                        "size": size,
                        "layer": layer,
                        "shape": [channels, side, side],
                        "fwd_ms_by_width": times,
                        "best_width": int(best),
                    }
                )
                shown = "  ".join(f"{'auto' if w == '0' else w}:{t:.2f}" for w, t in times.items())
                print(f"{label:32s} {shown}  best {best}", flush=True)
    return results


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------


def markdown(rows: list[Row], totals: list[dict], meta: dict) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} threads; time = best per-round median of {meta['rounds']} "
        "alternating rounds; peak = extra memory of one call (see bench/bench_kernel.py).",
        "",
        "| device | dtype | pass | S | layer | C×H×W | einsum ms | fused ms | speed-up "
        "| einsum peak MiB | fused peak MiB |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for total in totals:
        key = (total["device"], total["dtype"], total["mode"], total["size"])
        for r in rows:
            if (r.device, r.dtype, r.mode, r.size) != key:
                continue
            lines.append(
                f"| {r.device} | {r.dtype} | {r.mode} | {r.size} | "
                f"{r.layer}{' weighted' if r.weighted else ''} | "
                f"{'×'.join(map(str, r.shape))} | {r.einsum_ms:.2f} | {r.fused_ms:.2f} | "
                f"{r.speedup:.2f}× | {r.einsum_peak_mib:.1f} | {r.fused_peak_mib:.1f} |"
            )
        lines.append(
            f"| **{total['device']}** | **{total['dtype']}** | **{total['mode']}** | "
            f"**{total['size']}** | **sum of {total['layers']}** | | "
            f"**{total['einsum_ms']:.2f}** | **{total['fused_ms']:.2f}** | "
            f"**{total['speedup']:.2f}×** | max {total['einsum_peak_mib']:.1f} | "
            f"max {total['fused_peak_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def chart(totals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {name: i for i, name in enumerate(DTYPES)}
    panels = sorted({(t["device"], t["dtype"]) for t in totals}, key=lambda p: (p[0], order[p[1]]))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, constrained_layout=True
    )
    for ax, (device, dtype) in zip(axes[0], panels, strict=True):
        sel = [t for t in totals if t["device"] == device and t["dtype"] == dtype]
        groups = sorted({(t["size"], t["mode"]) for t in sel}, key=lambda g: (g[0], g[1]))
        xs = range(len(groups))
        width = 0.38
        for offset, impl, color in (
            (-width / 2, "einsum", "#999999"),
            (width / 2, "fused", "#1f77b4"),
        ):
            heights = [
                next(t[f"{impl}_ms"] for t in sel if (t["size"], t["mode"]) == g) for g in groups
            ]
            bars = ax.bar([x + offset for x in xs], heights, width, label=impl, color=color)
            if impl == "fused":
                for bar, g in zip(bars, groups, strict=True):
                    sp = next(t["speedup"] for t in sel if (t["size"], t["mode"]) == g)
                    ax.annotate(
                        f"{sp:.2f}×",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax.set_xticks(list(xs), [f"S={s}\n{m}" for s, m in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms, summed over relu1_1..relu5_1")
        ax.set_title(f"style loss, {device} {dtype}: einsum vs fused")
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cpu, plus cuda when a GPU and the CUDA kernels are present",
    )
    parser.add_argument("--threads", type=int, default=all_cores(), help="default: all cores")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default=None,
                        help="output file stem (default bench_kernel, bench_kernel_weighted)")
    parser.add_argument(
        "--weighted",
        action="store_true",
        help="time the op with per-position weights (guided Gram) against the weighted einsum",
    )
    parser.add_argument(
        "--sweep-blocks",
        action="store_true",
        help="instead: time the fused forward for several panel widths per layer",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.name is None:
        args.name = "bench_kernel_weighted" if args.weighted else "bench_kernel"
    if K.backend("cpu") != "cpu":
        print(
            "the fused extension is not loaded (backend is einsum); build it first", file=sys.stderr
        )
        return 2
    devices = args.devices or ["cpu"] + (["cuda"] if K.backend("cuda") == "cuda" else [])
    if "cuda" in devices and K.backend("cuda") != "cuda":
        print("--devices cuda needs a GPU and the CUDA kernels", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    meta = {
        "date": _dt.date.today().isoformat(),
        "machine": f"{args.threads}-core {platform.machine()} CPU ({cpu_model()})"
        + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "min_run_time_s": args.min_run_time,
        "devices": devices,
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep_blocks:
        sweep = [r for d in devices for r in sweep_blocks(args, d, args.threads)]
        path = args.out / f"{args.name}_blocks.json"
        path.write_text(json.dumps({"meta": meta, "block_sweep": sweep}, indent=2) + "\n")
        print(f"wrote {path}")
        return 0

    rows = [row for device in devices for row in run_rows(args, device, args.threads)]
    totals = sums(rows)
    target = next(
        (t for t in totals if all(t[k] == TARGET[k] for k in ("device", "dtype", "mode", "size"))),
        None,
    )
    verdict = None
    # Weighted (issue 20): at least as fast as the einsum written for the weighted case.
    required = 1.0 if args.weighted else TARGET["speedup"]
    if target is not None:
        verdict = {
            "required_speedup": required,
            "speedup": target["speedup"],
            "einsum_ms": target["einsum_ms"],
            "fused_ms": target["fused_ms"],
            "met": target["speedup"] >= required,
        }
    table = markdown(rows, totals, meta)
    (args.out / f"{args.name}.md").write_text(table)
    (args.out / f"{args.name}.json").write_text(
        json.dumps(
            {"meta": meta, "rows": [asdict(r) for r in rows], "sums": totals, "target": verdict},
            indent=2,
        )
        + "\n"
    )
    chart(totals, args.out / f"{args.name}.png")
    print()
    print(table)
    if verdict is not None:
        print(
            f"target: S=512 fp32 fwd+bwd on the CPU, sum over 5 layers: einsum "
            f"{verdict['einsum_ms']:.1f} ms, fused {verdict['fused_ms']:.1f} ms, speed-up "
            f"{verdict['speedup']:.2f}x (required {verdict['required_speedup']}x): "
            + ("met" if verdict["met"] else "NOT met")
        )
    print(f"wrote {args.out}/{args.name}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
