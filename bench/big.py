"""Big outputs: peak memory, time per iteration at each scale, the seam measure.

    python bench/big.py --sides 1024 2048 4096 --iterations 16      # the real run
    python bench/big.py --smoke                                     # 96 and 128 px: a check

For each long side, one content and style pair from ``../shared/images`` (the content
centre-cropped to 4:3, so 4096 px is 4096 x 3072), stylised with the automatic coarse-to-fine
schedule (``scales`` 0, :func:`gramstyle.options.schedule`; ``--iterations`` is the coarsest
scale's count, tolerance 0 so every run does the same steps), in these configurations:

- **tiled**: ``tile`` "auto" with the engine's memory limit set to ``--memory-gib`` less
  what the process holds once the network is loaded: each scale runs untiled when it fits,
  else with the largest tile that fits (``StyleTransfer.fit_tile``);
- **untiled**: ``tile`` off, for the sides up to ``--untiled-up-to``;
- at the smallest side also **tile N** (``--cost-tile``), for the cost target: seconds per
  iteration per megapixel tiled against untiled, side by side in one run.

Each configuration runs in its own child process, so its peak RSS (``ru_maxrss`` of the
child, from :func:`resource.getrusage` ``RUSAGE_CHILDREN``) is its own. Recorded: seconds per
iteration at each scale (from the progress reports, after each scale's targets are built),
the tile each scale used, the total wall time, the final loss, the engine's memory estimate
of the final scale against the measured peak, and the **seam measure**: the mean absolute
difference between neighbouring pixels across the final scale's tile borders, over the same
measure between all other neighbouring pixels (1.00: no seam; the target is within 10 %).
Writes ``big.json``, ``big.md`` (a table with the CPU model and the date) and ``big.png``
(peak memory and time against megapixels) into ``--out`` (bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model, load1

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT.parent / "shared" / "images"
if not IMAGES.is_dir():  # a worktree: ../shared is next to the main checkout
    IMAGES = Path("/work/shared/images")
HED = Path("/work/shared/models/vgg16-hed-bsds500.pth")


def crop_4_3(image):
    """The largest centred 4:3 (landscape) crop of a PIL image."""
    w, h = image.size
    if w * 3 > h * 4:
        cw = h * 4 // 3
        return image.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    ch = w * 3 // 4
    return image.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))


def seam_ratio(pixels, tile: int, stride: int, shift: int = 0) -> float:
    """Mean |difference| of neighbouring pixels across the tile borders of a ``tile`` px
    tiling (:func:`gramstyle.engine.tiles.plan`'s interiors; with ``shift``, those lines
    moved by that many px) over the same mean between the other neighbouring pixels;
    ``pixels``: float [H, W, 3]. NaN for an untiled image."""
    import numpy as np

    from gramstyle.engine.tiles import _spans

    height, width = pixels.shape[:2]
    side = max(stride, tile // stride * stride)
    rows = [a + shift for a, _, _, _ in _spans(height, side, 0)][1:]  # first rows of tiles
    cols = [a + shift for a, _, _, _ in _spans(width, side, 0)][1:]
    rows, cols = [r for r in rows if r < height], [c for c in cols if c < width]
    if not rows and not cols:
        return float("nan")
    dy = np.abs(pixels[1:] - pixels[:-1]).mean(axis=(1, 2))  # pair (y-1, y) at index y-1
    dx = np.abs(pixels[:, 1:] - pixels[:, :-1]).mean(axis=(0, 2))
    across = [dy[r - 1] for r in rows] + [dx[c - 1] for c in cols]
    seam_y = np.zeros(len(dy), bool)
    seam_y[[r - 1 for r in rows]] = True
    seam_x = np.zeros(len(dx), bool)
    seam_x[[c - 1 for c in cols]] = True
    elsewhere = np.concatenate([dy[~seam_y], dx[~seam_x]]).mean()
    return float(np.mean(across) / elsewhere)


def child(case: dict) -> dict:
    """One configuration, in this (child) process."""
    from PIL import Image

    from gramstyle.engine import StyleTransfer, footprint
    from gramstyle.engine import objective as objective_module
    from gramstyle.engine.tiles import receptive_field
    from gramstyle.host_memory import process_rss
    from gramstyle.options import StyleOptions, schedule

    engine = StyleTransfer(arch=case["arch"], weights=case["weights"], device="cpu",
                           max_size=8192)
    content = crop_4_3(Image.open(IMAGES / "content" / case["content"]).convert("RGB"))
    style = Image.open(IMAGES / "style" / case["style"]).convert("RGB")
    warm = content.resize((32, 24))
    engine.stylize([warm], [warm], StyleOptions(size=32, iterations=1))
    resident = process_rss()
    options = engine.validate(StyleOptions(size=case["size"], iterations=case["iterations"],
                                           tolerance=0.0, tile=case["tile"],
                                           progress_every=1))
    plan = schedule(options.size, options.scales, options.iterations)
    held = 4 * (content.width * content.height + style.width * style.height)

    caps = dict(plan)

    def estimate(side: int, tile: int | str):
        """The engine's estimate of one scale at this side, with its iterations and this
        tile: what StyleTransfer.fit_tile judged."""
        at = options.resolved(options.network, size=side, scales=1, iterations=caps[side],
                              tile=tile)
        return footprint.peak(footprint.stylize_phases(
            engine.extractor, at, {"content": [content], "style": [style]}, held)).total

    if case.get("reestimate"):  # only the estimate of a finished run's scales
        return {"estimate_mib": max(estimate(s["side"], s["tile"] or "off")
                                    for s in case["reestimate"]) / 2**20}
    if case["tile"] == "auto":
        engine.memory_limit = int(case["memory_gib"] * 2**30) - resident
    # Each scale's targets are built by Objective.build: time it, and note its tile.
    builds: list[dict] = []
    original = objective_module.Objective.build.__func__

    def build(cls, *args, **kwargs):
        started = time.perf_counter()
        made = original(cls, *args, **kwargs)
        builds.append({"side": max(made.width, made.height), "width": made.width,
                       "height": made.height, "tile": made.tile, "built": time.perf_counter(),
                       "build_s": time.perf_counter() - started})
        return made

    objective_module.Objective.build = classmethod(build)
    reports: list[tuple[float, int, int, int]] = []  # (time, iteration, scale, tile report)

    def progress(p) -> None:
        reports.append((time.perf_counter(), p.iteration, p.scale, p.tiles))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from the current RSS: the run's own peak
    started = time.perf_counter()
    result = engine.stylize([content], [style], options, progress=progress)
    wall = time.perf_counter() - started
    scales = []
    for k, ((side, cap), made) in enumerate(zip(plan, builds, strict=False)):
        done = [t for t, _, scale, tiles in reports if scale == k + 1 and not tiles]
        # The reports of scale k+1 come after each of its steps; the last is its last step's.
        seconds = (max(done) - made["built"]) / cap if done else float("nan")
        scales.append({"side": side, "width": made["width"], "height": made["height"],
                       "iterations": cap, "tile": made["tile"], "build_s": made["build_s"],
                       "s_per_it": seconds,
                       "s_per_it_mp": seconds / (made["width"] * made["height"] / 1e6)})
    final = builds[-1]
    with open("/proc/self/status") as f:
        run_peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
    layers = [*options.content_layers, *options.style_layers]
    result.image.save(case["save"])
    return {"stride": receptive_field(engine.extractor, layers).stride,
            "run_peak_mib": run_peak / 2**20, **case, "width": result.image.width,
            "height": result.image.height,
            "megapixels": result.image.width * result.image.height / 1e6,
            "precision": result.precision, "scales": scales, "wall_s": wall,
            "loss": result.losses.total, "iterations_run": result.iterations,
            "resident_mib": resident / 2**20,
            "estimate_mib": max(estimate(b["side"], b["tile"] or "off")
                                for b in builds) / 2**20,
            "final_tile": final["tile"]}


def add_seams(rows: list[dict]) -> None:
    """Set each row's ``seam_ratio`` (:func:`seam_ratio`) at the tile grid of its own final
    scale -- for an untiled row, as a control, at the grid of a tiled run of the same side
    (NaN where there is none) -- and ``seam_control``: the median of the same ratio at that
    grid shifted by 1/8, 2/8, ... 7/8 of a tile, lines that are no tile border (the output's
    own texture: an output upsampled from a small content image varies with the phase of
    its upsampling)."""
    import numpy as np
    from PIL import Image

    for row in rows:
        tile = row["final_tile"] or next(
            (r["final_tile"] for r in rows if r["size"] == row["size"] and r["final_tile"]),
            0)
        row["seam_tile"] = tile
        if not tile:
            row["seam_ratio"] = float("nan")
            continue
        pixels = np.asarray(Image.open(row["save"]).convert("RGB"), dtype=np.float32) / 255
        row["seam_ratio"] = seam_ratio(pixels, tile, row["stride"])
        row["seam_control"] = float(np.median(
            [seam_ratio(pixels, tile, row["stride"], shift=tile * k // 8) for k in range(1, 8)]))


def run(case: dict, timeout: float) -> dict:
    """One configuration in a fresh child process; its report, with ``peak_mib`` its peak
    RSS (the child's own ``ru_maxrss``) and ``resident_mib`` what it held after loading."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    code = ("import json, resource, subprocess, sys\n"
            "p = subprocess.run([sys.executable, sys.argv[1], '--child', sys.argv[2]],"
            " capture_output=True, text=True, timeout=float(sys.argv[3]))\n"
            "sys.stderr.write(p.stderr[-3000:])\n"
            "if p.returncode: sys.exit(p.returncode)\n"
            "row = json.loads(p.stdout.strip().splitlines()[-1])\n"
            "row['peak_mib'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(json.dumps(row))\n")
    # A middle process per configuration: RUSAGE_CHILDREN is then the one child's peak.
    proc = subprocess.run([sys.executable, "-c", code, __file__, json.dumps(case),
                           str(timeout)], capture_output=True, text=True, env=env,
                          timeout=timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({case}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tiles(row: dict) -> str:
    return " / ".join(str(s["tile"] or "off") for s in row["scales"])


def table(rows: list[dict]) -> str:
    """The runs as markdown: one row per configuration, then the cost comparison."""
    lines = [f"CPU: {cpu_model()}, 2 cores shared with other jobs (load {load1():.1f} at "
             f"the end), {time.strftime('%Y-%m-%d')}; {rows[0]['arch']} "
             f"({Path(rows[0]['weights']).name}), precision {rows[0]['precision']}, "
             f"{rows[0]['content']} (4:3 crop) + {rows[0]['style']}.", "",
             "| output | MP | config | scales (side: iterations) | tile per scale | s/it per "
             "scale | wall (s) | peak RSS (MiB) | run's peak over resident (MiB) | estimate "
             "(MiB) | final loss | seam ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sched = ", ".join(f"{s['side']}: {s['iterations']}" for s in r["scales"])
        speeds = " / ".join(f"{s['s_per_it']:.1f}" for s in r["scales"])
        seam = ("-" if r["seam_ratio"] != r["seam_ratio"]
                else f"{r['seam_ratio']:.3f} (grid {r['seam_tile']}; shifted "
                     f"{r['seam_control']:.3f})")
        lines.append(f"| {r['width']}x{r['height']} | {r['megapixels']:.1f} | {r['label']} | "
                     f"{sched} | {_tiles(r)} | {speeds} | {r['wall_s']:.0f} | "
                     f"{r['peak_mib']:.0f} | {r['run_peak_mib'] - r['resident_mib']:.0f} | "
                     f"{r['estimate_mib']:.0f} | {r['loss']:.4g} | "
                     f"{seam} |")
    cost = cost_ratio(rows)
    if cost:
        lines += ["", f"Cost at {cost['side']} px (one scale, side by side): untiled "
                  f"{cost['untiled']:.2f} s/it/MP, tile {cost['tile']} "
                  f"{cost['tiled']:.2f} s/it/MP: **{cost['ratio']:.2f}x** (target <= 2x)."]
    return "\n".join(lines)


def cost_ratio(rows: list[dict]) -> dict | None:
    """Final-scale s/it/MP of the cost configuration over the untiled one at the same side."""
    cost = [r for r in rows if r["label"].startswith("tile ")]
    for c in cost:
        base = [r for r in rows if r["label"] == "untiled" and r["size"] == c["size"]]
        if base:
            t, u = c["scales"][-1]["s_per_it_mp"], base[0]["scales"][-1]["s_per_it_mp"]
            return {"side": c["size"], "tile": c["tile"], "tiled": t, "untiled": u,
                    "ratio": t / u}
    return None


def chart(rows: list[dict], path: Path) -> None:
    """Peak RSS and wall time against megapixels, one line per configuration kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(10, 4))
    for label in ("tiled (auto)", "untiled"):
        sel = sorted((r for r in rows if r["label"] == label), key=lambda r: r["megapixels"])
        if not sel:
            continue
        mps = [r["megapixels"] for r in sel]
        mem.plot(mps, [r["peak_mib"] / 1024 for r in sel], "o-", label=f"{label}: peak RSS")
        mem.plot(mps, [(r["estimate_mib"] + r["resident_mib"]) / 1024 for r in sel], "x--",
                 label=f"{label}: resident + estimate")
        wall.plot(mps, [r["wall_s"] / 60 for r in sel], "o-", label=label)
    mem.axhline(6, color="grey", lw=0.8, ls=":", label="6 GiB target")
    mem.set(xlabel="output megapixels", ylabel="GiB", title="Peak memory")
    wall.set(xlabel="output megapixels", ylabel="minutes", title="Wall time (auto schedule)")
    mem.legend(fontsize=7)
    wall.legend(fontsize=7)
    fig.suptitle(f"bench/big.py, {cpu_model()}, {time.strftime('%Y-%m-%d')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def reestimate(out: Path, name: str) -> list[dict]:
    """Recompute the estimate of every row of ``out/name.json`` (in a child process, as the
    run did), its seam measures, and the table and chart."""
    rows = json.loads((out / f"{name}.json").read_text())
    for row in rows:
        case = {k: row[k] for k in ("arch", "weights", "content", "style", "iterations",
                                    "size", "tile")}
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        proc = subprocess.run([sys.executable, __file__, "--child",
                               json.dumps({**case, "reestimate": row["scales"]})],
                              capture_output=True, text=True, env=env, check=True)
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    add_seams(rows)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{name}.md").write_text(table(rows) + "\n")
    chart(rows, out / f"{name}.png")
    print(table(rows))
    return rows


def gallery(source: Path, out: Path, width: int = 640) -> None:
    """The README's picture: ``source`` (the 4096 px output) downscaled to ``width`` px
    wide, and beside it a 1:1 crop of the same height from its centre, as one JPEG."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    small = image.resize((width, round(image.height * width / image.width)),
                         Image.Resampling.LANCZOS)
    cx, cy, h = image.width // 2, image.height // 2, small.height
    crop = image.crop((cx - h // 2, cy - h // 2, cx - h // 2 + h, cy - h // 2 + h))
    sheet = Image.new("RGB", (small.width + 8 + crop.width, h), "white")
    sheet.paste(small, (0, 0))
    sheet.paste(crop, (small.width + 8, 0))
    sheet.save(out, quality=85)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--iterations", type=int, default=16,
                        help="iterations of the coarsest scale (finer ones: half each)")
    parser.add_argument("--untiled-up-to", type=int, default=2048)
    parser.add_argument("--cost-tile", type=int, default=512,
                        help="the tile of the cost comparison at the smallest side")
    parser.add_argument("--memory-gib", type=float, default=6.0)
    parser.add_argument("--arch", default="vgg16", choices=["vgg16", "vgg19"])
    parser.add_argument("--weights", default=str(HED) if HED.exists() else "random")
    parser.add_argument("--content", default="chelsea.png")
    parser.add_argument("--style", default="starry_night.jpg")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--smoke", action="store_true",
                        help="96 px, 1 iteration, tiles of 32 px: a check")
    parser.add_argument("--images", type=Path, default=Path("/tmp/gramstyle-big"),
                        help="where the outputs go (PNG; big, so not in bench/results)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--gallery", nargs=2, type=Path, metavar=("PNG", "JPEG"),
                        help="only make the README picture of an output: downscaled, and a "
                        "1:1 crop beside it")
    parser.add_argument("--reestimate", metavar="NAME",
                        help="only recompute the estimates, seams, table and chart of "
                        "OUT/NAME.json (a finished run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gallery:
        gallery(*args.gallery)
        return []
    if args.reestimate:
        return reestimate(args.out, args.reestimate)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return []
    if args.smoke:
        args.sides, args.iterations, args.cost_tile = [96], 1, 32
    common = {"arch": args.arch, "weights": args.weights, "content": args.content,
              "style": args.style, "iterations": args.iterations,
              "memory_gib": args.memory_gib}
    # Most telling first (a run cut short keeps those): the cost pair at the smallest side,
    # the automatic runs from the largest side down, then the untiled ones.
    small = min(args.sides)
    cases = [{**common, "size": small, "tile": args.cost_tile,
              "label": f"tile {args.cost_tile}"},
             {**common, "size": small, "tile": "off", "label": "untiled"}]
    cases += [{**common, "size": side, "tile": "auto", "label": "tiled (auto)"}
              for side in sorted(args.sides, reverse=True)]
    cases += [{**common, "size": side, "tile": "off", "label": "untiled"}
              for side in sorted(args.sides) if small < side <= args.untiled_up_to]
    args.out.mkdir(parents=True, exist_ok=True)
    args.images.mkdir(parents=True, exist_ok=True)
    name = "big_smoke" if args.smoke else "big"
    rows = []
    for case in cases:
        case["save"] = str(args.images / f"{name}_{case['size']}_{case['tile']}.png")
        row = run(case, args.timeout)
        rows.append(row)
        add_seams(rows)
        print(json.dumps(row), flush=True)
        # Written after every configuration: a run cut short keeps what it measured.
        (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
        (args.out / f"{name}.md").write_text(table(rows) + "\n")
        chart(rows, args.out / f"{name}.png")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()


__all__ = ["child", "cost_ratio", "crop_4_3", "main", "run", "seam_ratio", "table"]
