"""Peak memory of one Stylize, untiled and tiled (the ``tile`` option), measured.

    python bench/tiled_memory.py                  # 1024 px, 2 iterations, tiles of 256 px
    python bench/tiled_memory.py --size 768 --tile 192 --iterations 3
    python bench/tiled_memory.py --smoke          # 96 px, tiles of 64, 1 iteration: a check

Each run is a fresh child process (a VGG with seeded random weights, fp32, on the CPU, the
default layers): it loads the network, warms up on a tiny image, resets its peak RSS
(Linux ``/proc/self/clear_refs``), runs one Stylize of a noise content and style image,
and reports the peak resident memory over what was resident before (``VmHWM - VmRSS``),
the absolute peak, the wall time and the server's memory estimate
(:func:`gramstyle.server.memory.estimate_stylize`) of the same request. One JSON line per
run, then a markdown table with the CPU model and load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from machine import cpu_model, load1

CHILD = r"""
import io, json, re, sys, time
import numpy as np
from PIL import Image
from gramstyle.engine import StyleTransfer
from gramstyle.images import probe_image
from gramstyle.options import StyleOptions
from gramstyle.server.memory import estimate_stylize

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024

def png(side, seed):
    a = np.random.default_rng(seed).integers(0, 256, (side * 3 // 4, side, 3), dtype=np.uint8)
    buf = io.BytesIO(); Image.fromarray(a).save(buf, "PNG"); return buf.getvalue()

case = json.loads(sys.argv[1])
engine = StyleTransfer(arch=case["arch"], weights="random", device="cpu")
warm = png(32, 0)
engine.stylize([warm], [warm], StyleOptions(size=32, iterations=1, precision="fp32"))
content, style = png(case["size"], 1), png(case["size"], 2)
options = engine.validate(StyleOptions(size=case["size"], iterations=case["iterations"],
                                       tolerance=0.0, precision="fp32",
                                       tile=case["tile"] or "off"))
estimate = estimate_stylize(engine.extractor, options, [probe_image(content)],
                            [probe_image(style)], None, len(content) + len(style))
engine.target_cache.clear()
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS restarts from the current RSS
before = status("VmRSS")
started = time.perf_counter()
result = engine.stylize([content], [style], options)
print(json.dumps({**case, "peak_mib": (status("VmHWM") - before) / 2**20,
                  "peak_abs_mib": status("VmHWM") / 2**20,
                  "estimate_mib": estimate.total / 2**20,
                  "seconds": time.perf_counter() - started,
                  "loss": result.losses.total,
                  "width": result.image.width, "height": result.image.height}))
"""


def run(case: dict, timeout: float) -> dict:
    """One Stylize in a fresh child process; its JSON report."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({case}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The runs as a markdown table, with the machine."""
    lines = [f"CPU: {cpu_model()}, load {load1():.1f}, {time.strftime('%Y-%m-%d')}", "",
             "| arch | size (px) | tile (px) | iterations | peak RSS over resident (MiB) "
             "| peak RSS (MiB) | estimate (MiB) | seconds | final loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['width']}x{r['height']} | {r['tile'] or 'off'} | "
                     f"{r['iterations']} | {r['peak_mib']:.0f} | {r['peak_abs_mib']:.0f} | "
                     f"{r['estimate_mib']:.0f} | {r['seconds']:.1f} | {r['loss']:.5g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--arch", default="vgg19", choices=["vgg19", "vgg16"])
    parser.add_argument("--smoke", action="store_true", help="96 px, tiles of 64, 1 iteration")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.tile, args.iterations = 96, 64, 1
    rows = []
    for tile in (0, args.tile):
        row = run({"arch": args.arch, "size": args.size, "tile": tile,
                   "iterations": args.iterations}, args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()


__all__ = ["main", "run", "table"]
