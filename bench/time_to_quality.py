#!/usr/bin/env python
"""Time to quality: how long each configuration takes to a finished image, and how good the
image is, side by side in one run.

For each content/style pair and size, each configuration runs one ``StyleTransfer.stylize``
with the shared HED-trained VGG16 (the only trained network on these machines), from a cold
target cache. Recorded per run:

- the total loss against wall time: a progress report every ``--every`` iterations (the
  loss the optimiser saw, in the run's own precision);
- the wall time of the whole call (decoding, targets, optimisation, the returned image);
- the final loss measured the same way for every run: fp32 ComputeLosses of the returned
  8-bit image against the same targets.

Configurations (``--configs``; see CONFIGS):

- ``old``: the old default -- fp32, 300 iterations, no early stop, L-BFGS history 100;
- ``new``: today's defaults (``StyleOptions()``: precision auto, the default tolerance);
- ``nostop``: the new defaults with tolerance 0, reported every iteration: the curve the
  tolerance table simulates the early stop on (how the default tolerance was chosen);
- ``tol01``: the new defaults with ``--tolerance 0.01`` (the default before 0.0125);
- ``scales2``, ``adam``, ``fp32stop``, ``nostop_h20``/``nostop_h100`` (the L-BFGS history):
  variants worth showing. (torch.compile of the extractor is measured by
  ``bench/gpu_check.py compile``: it did not win on the CPU, so it is no engine option.)

Targets (issue 11): for every pair and size, ``new``'s final loss at most 5 % above ``old``'s
and its wall time at most 1/3 of ``old``'s.

The CPU is shared: before each (pair, size) the script waits (up to ``--max-wait`` s) for the
1-minute load to fall below ``--quiet-load`` and records the load around every run.
Results are written after every run (``--resume`` skips runs already in the JSON).

    python bench/time_to_quality.py                                  # 3 pairs x 384, 512 px
    python bench/time_to_quality.py --pairs chelsea:starry_night --sizes 384 --configs old new
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from machine import cpu_model, load1

from gramstyle import kernels
from gramstyle.engine import StyleTransfer
from gramstyle.engine import optimise as optimise_module
from gramstyle.images import load_image
from gramstyle.options import (
    CONVERGENCE_CHECK_EVERY,
    CONVERGENCE_WINDOW,
    DEFAULT_TOLERANCE,
    StyleOptions,
)

SHARED = Path(os.environ.get("GRAMSTYLE_SHARED")
              or Path(__file__).resolve().parents[2] / "shared")
DEFAULT_PAIRS = ["chelsea:starry_night", "coffee:the_scream", "astronaut:woman_with_a_hat"]


@dataclasses.dataclass
class Config:
    """One configuration: option overrides on top of StyleOptions() and the L-BFGS history."""

    label: str
    options: dict[str, Any]
    history: int | None = None  # None: the engine's default (optimise.LBFGS_HISTORY)
    every: int | None = None  # progress interval; None: --every


CONFIGS = {
    "old": Config("old default: fp32, 300 it, no early stop, history 100",
                  {"precision": "fp32", "iterations": 300, "tolerance": 0.0}, history=100),
    "new": Config("new default", {}),
    "tol01": Config("new default with --tolerance 0.01", {"tolerance": 0.01}),
    "nostop": Config("new default without early stop", {"tolerance": 0.0}, every=1),
    "fp32stop": Config("fp32 with early stop", {"precision": "fp32"}),
    "scales2": Config("new default, --scales 2", {"scales": 2}),
    "adam": Config("new default, --optimizer adam", {"optimizer": "adam"}),
    "nostop_h20": Config("no early stop, L-BFGS history 20", {"tolerance": 0.0}, history=20,
                         every=1),
    "nostop_h100": Config("no early stop, L-BFGS history 100", {"tolerance": 0.0},
                          history=100, every=1),
}


def wait_for_quiet(limit: float, max_wait: float) -> float:
    """Wait until the 1-minute load is below ``limit`` (at most ``max_wait`` s); return it."""
    deadline = time.monotonic() + max_wait
    while (load := load1()) >= limit and time.monotonic() < deadline:
        time.sleep(15)
    return load


def image_path(name: str, kind: str) -> Path:
    folder = SHARED / "images" / kind
    matches = sorted(folder.glob(f"{name}.*"))
    if not matches:
        raise SystemExit(f"--pairs: no image {name!r} in {folder}")
    return matches[0]


def run_one(engine: StyleTransfer, judge: StyleTransfer, content, style, size: int,
            config: Config, every: int, max_iterations: int | None) -> dict:
    """One stylize run from a cold target cache, and its fp32-measured final loss."""
    values = {**config.options, "size": size, "progress_every": config.every or every}
    if max_iterations is not None:
        values["iterations"] = min(values.get("iterations", 300), max_iterations)
    options = StyleOptions(**values)
    curve: list[tuple[float, int, float]] = []
    engine.target_cache.clear()
    history = optimise_module.LBFGS_HISTORY
    if config.history is not None:
        optimise_module.LBFGS_HISTORY = config.history
    load_before = load1()
    try:
        cpu_started = time.process_time()
        started = time.perf_counter()
        result = engine.stylize(
            [content], [style], options,
            progress=lambda p: curve.append((time.perf_counter() - started, p.iteration,
                                             p.losses.total)))
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        optimise_module.LBFGS_HISTORY = history
    final = judge.compute_losses(result.image, [content], [style],
                                 dataclasses.replace(options, precision="fp32")).losses
    return {"wall_s": wall, "cpu_s": cpu, "engine_s": result.elapsed_s,
            "iterations": result.iterations, "stop_reason": result.stop_reason,
            "precision": result.precision,
            "final_loss_fp32": final.total, "final_content": final.content,
            "final_style": final.style, "curve": curve, "load_before": load_before,
            "load_after": load1(), "options": {k: v for k, v in values.items()},
            "history": config.history or optimise_module.LBFGS_HISTORY}


def simulate_stop(curve: list, tolerance: float) -> tuple[int, float, float] | None:
    """Where the early stop (optimise.Convergence) would have ended a tolerance-0 run that
    reported every iteration: (iterations, seconds, in-run loss at that point), or None."""
    losses = {it: loss for _, it, loss in curve}
    times = {it: t for t, it, _ in curve}
    best, checked = float("inf"), {}
    for n in range(1, max(losses) + 1):
        if n - 1 not in losses:
            return None
        best = min(best, losses[n - 1])
        if n % CONVERGENCE_CHECK_EVERY:
            continue
        checked[n] = best
        then = checked.get(n - CONVERGENCE_WINDOW)
        if then is not None and then - best <= tolerance * then:
            return n, times.get(n, times[n - 1]), losses.get(n, best)
    return None


def tolerance_table(rows: list[dict], tolerances: list[float]) -> list[str]:
    """Simulated early stops on the 'nostop' curves, against the old default's final loss."""
    lines = ["| pair | size | tolerance | stops at | s (sim.) | in-run loss | vs nostop end "
             "| vs old final (fp32) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        runs = row["runs"]
        if "nostop" not in runs:
            continue
        nostop = runs["nostop"]
        end_loss = nostop["curve"][-1][2]
        old = runs.get("old", {}).get("final_loss_fp32")
        for tolerance in tolerances:
            stop = simulate_stop(nostop["curve"], tolerance)
            if stop is None:
                lines.append(f"| {row['pair']} | {row['size']} | {tolerance:g} | (cap) | | | | |")
                continue
            n, seconds, loss = stop
            vs_old = f"{loss / old - 1:+.1%}" if old else ""
            lines.append(f"| {row['pair']} | {row['size']} | {tolerance:g} | {n} | "
                         f"{seconds:.1f} | {loss:.4g} | {loss / end_loss - 1:+.1%} | {vs_old} |")
    return lines


def summary(rows: list[dict], meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}, torch {meta['torch']}, "
             f"{meta['threads']} threads, {meta['arch']} {meta['weights']}. Wall = the whole "
             "stylize call from a cold target cache; final loss = fp32 ComputeLosses of the "
             "returned image. CPU s = the process's CPU time (all threads), less sensitive to "
             "other processes than wall time. load = 1-minute load average before/after the "
             "run.", "",
             "| pair | size | configuration | precision | iterations | stop | wall s | CPU s | "
             "final loss | vs old loss | vs old wall | vs old CPU | load |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    verdicts = []
    for row in rows:
        runs = row["runs"]
        old = runs.get("old")
        for name, run in runs.items():
            vs_loss = vs_time = vs_cpu = ""
            cpu = run.get("cpu_s")
            if old and name != "old":
                vs_loss = f"{run['final_loss_fp32'] / old['final_loss_fp32'] - 1:+.1%}"
                vs_time = f"{run['wall_s'] / old['wall_s']:.2f}×"
                if cpu and old.get("cpu_s"):
                    vs_cpu = f"{cpu / old['cpu_s']:.2f}×"
            lines.append(
                f"| {row['pair']} | {row['size']} | {CONFIGS[name].label} | {run['precision']} "
                f"| {run['iterations']} | {run['stop_reason']} | {run['wall_s']:.1f} | "
                f"{cpu or float('nan'):.1f} | {run['final_loss_fp32']:.4g} | {vs_loss} | "
                f"{vs_time} | {vs_cpu} | {run['load_before']:.2f}/{run['load_after']:.2f} |")
        if old and "new" in runs:
            new = runs["new"]
            loss_ok = new["final_loss_fp32"] <= 1.05 * old["final_loss_fp32"]
            time_ok = new["wall_s"] <= old["wall_s"] / 3
            ratio = new["final_loss_fp32"] / old["final_loss_fp32"]
            verdicts.append(
                f"- {row['pair']} {row['size']} px: loss {new['final_loss_fp32']:.4g} vs "
                f"{old['final_loss_fp32']:.4g} ({ratio - 1:+.1%}, "
                f"target <= +5 %: {'met' if loss_ok else 'NOT met'}); wall {new['wall_s']:.1f} s "
                f"vs {old['wall_s']:.1f} s ({new['wall_s'] / old['wall_s']:.2f}×, target <= "
                f"0.33×: {'met' if time_ok else 'NOT met'})")
    if verdicts:
        lines += ["", "Targets (new default against the old one):", *verdicts]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({row["size"] for row in rows})
    pairs = list(dict.fromkeys(row["pair"] for row in rows))
    fig, axes = plt.subplots(len(sizes), len(pairs), figsize=(5.5 * len(pairs),
                                                              4.2 * len(sizes)),
                             squeeze=False, constrained_layout=True)
    colours = dict(zip(CONFIGS, ("#555555", "#d62728", "#ff9896", "#1f77b4", "#2ca02c",
                                 "#9467bd", "#e377c2", "#bcbd22", "#ff7f0e"), strict=True))
    for row in rows:
        ax = axes[sizes.index(row["size"])][pairs.index(row["pair"])]
        for name, run in row["runs"].items():
            curve = run["curve"]
            ax.plot([t for t, _, _ in curve], [loss for _, _, loss in curve],
                    label=f"{name} ({run['iterations']} it, {run['wall_s']:.0f} s)",
                    color=colours[name], lw=1.4)
            ax.plot([run["wall_s"]], [run["final_loss_fp32"]], "o", color=colours[name], ms=4)
        ax.set_yscale("log")
        ax.set_xlabel("seconds")
        ax.set_ylabel("total loss")
        ax.set_title(f"{row['pair']}, {row['size']} px")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("total loss against wall time (dots: final loss, fp32 ComputeLosses of "
                 "the output)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS,
                        help="CONTENT:STYLE names of ../shared/images files, no suffix")
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    parser.add_argument("--configs", nargs="+", default=["old", "new", "nostop", "scales2"],
                        choices=list(CONFIGS))
    parser.add_argument("--every", type=int, default=5, help="progress interval (iterations)")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--weights", default=str(SHARED / "models" / "vgg16-hed-bsds500.pth"))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="cap every run's iterations (smoke tests)")
    parser.add_argument("--tolerances", type=float, nargs="+",
                        default=[2e-2, 1.5e-2, 1.25e-2, 1e-2, 5e-3, 2e-3])
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--max-wait", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/time_to_quality"),
                        help="output stem: .json, .md and .png")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)
    engine = StyleTransfer(arch=args.arch, weights=args.weights, device=args.device)
    judge = engine
    device = engine.device
    meta = {
        "date": date.today().isoformat(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": str(device),
        "machine": f"{torch.get_num_threads()}-thread {platform.machine()} CPU ({cpu_model()})"
                   + (f", GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "kernel_backend": kernels.backend(device), "arch": args.arch,
        "weights": Path(args.weights).name, "auto_precision": engine.auto_precision,
        "default_tolerance": DEFAULT_TOLERANCE, "window": CONVERGENCE_WINDOW,
        "check_every": CONVERGENCE_CHECK_EVERY,
        "default_history": optimise_module.LBFGS_HISTORY,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else
                                                       sys.argv[1:])]),
    }
    json_path = args.out.with_suffix(".json")
    rows: list[dict] = []
    if args.resume and json_path.exists():
        rows = json.loads(json_path.read_text())["rows"]

    def save() -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    for pair in args.pairs:
        content_name, _, style_name = pair.partition(":")
        content = load_image(image_path(content_name, "content"))
        style = load_image(image_path(style_name, "style"))
        for size in args.sizes:
            row = next((r for r in rows if r["pair"] == pair and r["size"] == size), None)
            if row is None:
                row = {"pair": pair, "size": size, "runs": {}}
                rows.append(row)
            todo = [c for c in args.configs if c not in row["runs"]]
            if not todo:
                continue
            if device.type == "cpu":
                load = wait_for_quiet(args.quiet_load, args.max_wait)
                print(f"== {pair} {size} px (load {load:.2f})", flush=True)
            for name in todo:
                run = run_one(engine, judge, content, style, size, CONFIGS[name], args.every,
                              args.max_iterations)
                row["runs"][name] = run
                save()
                print(f"   {name:9s} {run['precision']} {run['iterations']:4d} it "
                      f"({run['stop_reason']}) {run['wall_s']:7.1f} s  final loss "
                      f"{run['final_loss_fp32']:.4g}  load {run['load_before']:.2f}->"
                      f"{run['load_after']:.2f}", flush=True)
    text = summary(rows, meta)
    tolerances = tolerance_table(rows, args.tolerances)
    if len(tolerances) > 2:
        text += ("\nSimulated early stops on the `nostop` curves (the rule of "
                 "optimise.Convergence, window "
                 f"{CONVERGENCE_WINDOW}, checked every {CONVERGENCE_CHECK_EVERY}); losses are "
                 "in-run, in the run's precision:\n\n" + "\n".join(tolerances) + "\n")
    args.out.with_suffix(".md").write_text(text)
    chart(rows, args.out.with_suffix(".png"))
    save()
    print(text)
    print(f"wrote {args.out}.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
