"""The quality study behind the presets: sweeps of single options around ``balanced``, the
three presets on six content/style pairs, measured the same way, and the contact sheets.

    python bench/preset_study.py run sweeps  --size 384 --iterations 100 --pairs 2
    python bench/preset_study.py run presets --size 384 --iterations 150 --pairs 6
    python bench/preset_study.py report --size 384          # markdown tables (docs/quality.md)
    python bench/preset_study.py sheet presets --size 384 --pairs 2 --commands \
        --out docs/gallery/presets_sheet.jpg

``run`` is resumable: every finished run is a record in ``bench/results/preset_study.json``
(written after each run) and its output image a JPEG under ``--images``; a run whose record
and image both exist is skipped, so an interrupted study goes on where it stopped.

Every run uses the trained VGG16 (``../shared/models``) on the CPU, ``--threads`` threads,
the precision ``auto`` picks (bf16 with AMX), and the default early stop; ``--iterations`` caps
the steps per scale of every variant alike (a preset's own ``iterations`` is larger), so that
variants differ only by the option under study. Every output is measured in fp32 with the
balanced options, so all variants are compared on one scale:

- ``content``: the relative content error at relu4_2 (lower: the content is better kept);
- ``deep``, ``fine``: the relative Gram distance to the style image (seen at style_scale 1) at
  relu4_1 + relu5_1, and at relu1_1 + relu2_1, averaged;
- ``stroke px``: the scale of what the stylisation added -- the power-weighted mean
  wavelength (pixels, at the output size) of the luminance of output minus content, from its
  2-D spectrum without the DC term. Larger means larger strokes and motifs;
- ``coarse %``: the share of that added luminance's power at wavelengths of 16 px and more
  (up to the image's short side);
- ``matched scale``: the style_scale at which the style image's relu4_1 + relu5_1 Gram
  matrices are closest to the output's (of 0.5, 0.75, 1, 1.5, 2, 3; a parabola through the
  best three in log scale): how much larger than at scale 1 the style's motifs appear in the
  output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from machine import cpu_model, load1
from PIL import Image, ImageDraw, ImageFont

from gramstyle.images import load_image
from gramstyle.options import StyleOptions
from gramstyle.presets import PRESET_NAMES, preset_values

SHARED = next(Path(p) for p in (os.environ.get("GRAMSTYLE_SHARED"),
                                Path(__file__).resolve().parents[2] / "shared", "/work/shared")
              if p and (Path(p) / "images").is_dir())
WEIGHTS = SHARED / "models" / "vgg16-hed-bsds500.pth"
RESULTS = Path(__file__).resolve().parent / "results" / "preset_study.json"
#: The content/style pairs, the sweeps' two first.
PAIRS = (("chelsea.png", "starry_night.jpg"), ("astronaut.png", "the_scream.jpg"),
         ("coffee.png", "woman_with_a_hat.jpg"), ("rocket.jpg", "shipwreck.jpg"),
         ("chelsea.png", "woman_with_a_hat.jpg"), ("rocket.jpg", "starry_night.jpg"))
LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
MATCH_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
DEEP_WEIGHTS = (0.5, 0.5, 1.0, 2.0, 2.0)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _sweep(option: str, values: Iterable[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(f"{option}={_shown(v)}", "balanced", {option: v}) for v in values]


#: Groups of variants: (label, preset, options over the preset).
GROUPS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "presets": [(name, name, {}) for name in PRESET_NAMES],
    "sweeps": [("balanced", "balanced", {})]
    + _sweep("style_weight", (1.5, 20.0, 50.0))
    + _sweep("style_layer_weights", ((2.0, 2.0, 1.0, 0.5, 0.5), DEEP_WEIGHTS,
                                     (0.1, 0.1, 0.5, 2.0, 4.0)))
    + _sweep("style_scale", (0.75, 1.5, 2.0, 3.0))
    + _sweep("scales", (2, 3))
    + _sweep("tv_weight", (1.0, 10.0, 50.0)),
    # Candidates for painterly, from what the sweeps showed: coarse-to-fine is what makes
    # strokes larger (deep layer weights alone make a fine, colourless texture), with the
    # style seen larger and more style weight; equal layer weights keep the style's colours.
    "painterly": [(f"sw{w:g} ss{s:g} scales{n}", "balanced",
                   {"style_weight": w, "style_scale": s, "scales": n})
                  for w, s, n in ((10.0, 1.5, 4), (10.0, 2.0, 4), (20.0, 1.5, 4))],
}


def luminance(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return rgb @ np.array([0.299, 0.587, 0.114])


def added_spectrum(output: Image.Image, content: Image.Image) -> tuple[float, float]:
    """(mean wavelength px, share of power at wavelengths >= 16 px) of luminance(output) -
    luminance(content): the power-weighted mean frequency's inverse, DC excluded."""
    diff = luminance(output) - luminance(content.resize(output.size, Image.BICUBIC))
    diff -= diff.mean()
    power = np.abs(np.fft.fft2(diff)) ** 2
    fy = np.fft.fftfreq(diff.shape[0])[:, None]
    fx = np.fft.fftfreq(diff.shape[1])[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    power[0, 0] = 0
    mean_frequency = float((power * radius).sum() / power.sum())  # cycles per pixel
    inside = radius >= 1 / min(diff.shape)  # wavelengths up to the short side
    coarse = float(power[inside & (radius <= 1 / 16)].sum() / power[inside].sum())
    return 1 / mean_frequency, coarse


def matched_scale(distances: dict[float, float]) -> float:
    """The style scale of least deep Gram distance: a parabola in log(scale) through the best
    measured scale and its neighbours (the best scale itself at either end)."""
    scales = sorted(distances)
    i = min(range(len(scales)), key=lambda k: distances[scales[k]])
    if i in (0, len(scales) - 1):
        return scales[i]
    x = np.log(scales[i - 1:i + 2])
    a, b, _ = np.polyfit(x, [distances[s] for s in scales[i - 1:i + 2]], 2)
    return float(math.exp(-b / (2 * a))) if a > 0 else scales[i]


def measure(engine: Any, output: Image.Image, content: Image.Image,
            style: Image.Image) -> dict[str, Any]:
    base = StyleOptions(size=max(output.size), style_layers=LAYERS, precision="fp32")
    layers = engine.compute_losses(output, content, style, base).losses
    by_scale = {}
    for scale in MATCH_SCALES:
        report = engine.compute_losses(output, content, style, dataclasses.replace(
            base, style_scale=scale, style_layers=("relu4_1", "relu5_1")))
        by_scale[scale] = sum(report.losses.style_layers.values()) / 2
    stroke, coarse = added_spectrum(output, content)
    styles = layers.style_layers
    return {"content": layers.content_layers["relu4_2"], "style_layers": styles,
            "deep": (styles["relu4_1"] + styles["relu5_1"]) / 2,
            "fine": (styles["relu1_1"] + styles["relu2_1"]) / 2,
            "stroke_px": stroke, "coarse_share": coarse,
            "deep_by_scale": {f"{s:g}": d for s, d in by_scale.items()},
            "matched_scale": matched_scale(by_scale)}


def _key(size: int, iterations: int, pair: tuple[str, str], label: str) -> str:
    return f"{size}/{iterations}/{Path(pair[0]).stem}+{Path(pair[1]).stem}/{label}"


def _load_records() -> dict[str, Any]:
    return json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else {}


def _save_records(records: dict[str, Any]) -> None:
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"about": __doc__.split("\n\n")[0], "runs": records}, indent=1,
                              sort_keys=True) + "\n")
    tmp.replace(RESULTS)  # never a half-written file: an interrupted study resumes from it


def _image_path(images: Path, key: str) -> Path:
    return images / (key.replace("/", "_") + ".jpg")


def run(args: argparse.Namespace) -> None:
    import torch

    from gramstyle.engine import StyleTransfer

    torch.set_num_threads(args.threads)
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    records = _load_records()
    engine = None
    for pair in PAIRS[:args.pairs]:
        for label, preset, over in GROUPS[args.group]:
            key = _key(args.size, args.iterations, pair, label)
            if key in records and _image_path(images, key).exists():
                continue
            values = preset_values(preset, {**over, "size": args.size})
            values["iterations"] = min(values["iterations"], args.iterations)
            values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            # The same run under another label (balanced is in every group): reuse it.
            same = next((k for k, r in records.items() if r["options"] == values
                         and (r["content"], r["style"]) == pair
                         and _image_path(images, k).exists()), None)
            if same is not None:
                records[key] = {**records[same], "group": args.group, "label": label,
                                "preset": preset}
                _image_path(images, key).write_bytes(_image_path(images, same).read_bytes())
                _save_records(records)
                print(f"{key}: the run of {same}")
                continue
            if engine is None:
                engine = StyleTransfer(arch="vgg16", weights=str(WEIGHTS), device="cpu")
            content = load_image(SHARED / "images" / "content" / pair[0])
            style = load_image(SHARED / "images" / "style" / pair[1])
            options = StyleOptions(**values)
            load = load1()
            result = engine.stylize(content, style, options)
            result.image.save(_image_path(images, key), quality=92)
            record = {"group": args.group, "label": label, "preset": preset,
                      "options": values,
                      "content": pair[0], "style": pair[1], "size": args.size,
                      "iterations_cap": args.iterations, "iterations": result.iterations,
                      "stop_reason": result.stop_reason, "precision": result.precision,
                      "elapsed_s": result.elapsed_s, "threads": args.threads,
                      "cpu": cpu_model(), "load1_before": load,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "losses": dataclasses.asdict(result.losses),
                      "measured": measure(engine, result.image, content, style)}
            records[key] = record
            _save_records(records)
            m = record["measured"]
            print(f"{key}: {result.iterations} it, {result.elapsed_s:.0f} s, content "
                  f"{m['content']:.3f}, deep {m['deep']:.3f}, stroke {m['stroke_px']:.2f} px, "
                  f"coarse {m['coarse_share']:.2f}, scale {m['matched_scale']:.2f}", flush=True)


COLUMNS = (("content", "content", "{:.3f}"), ("deep", "deep", "{:.3f}"),
           ("fine", "fine", "{:.4f}"), ("stroke px", "stroke_px", "{:.2f}"),
           ("coarse %", "coarse_share", "{:.0%}"), ("matched scale", "matched_scale", "{:.2f}"))


def _pair_name(record: dict[str, Any]) -> str:
    return f"{Path(record['content']).stem} + {Path(record['style']).stem}"


def report(args: argparse.Namespace) -> None:
    records = _load_records()
    for group in args.groups.split(","):
        labels = [label for label, _, _ in GROUPS[group]]
        keys = [_key(args.size, args.iterations, pair, label) for label in labels
                for pair in PAIRS[:args.pairs]]
        rows = [{**records[k], "label": k.rsplit("/", 1)[1]} for k in keys if k in records]
        if not rows:
            continue
        pairs = list(dict.fromkeys(_pair_name(r) for r in rows))
        first = min(rows, key=lambda r: r["date"])
        last = max(rows, key=lambda r: r["date"])
        print(f"\n### {group}: {len(pairs)} pairs at {args.size} px, at most "
              f"{rows[0]['iterations_cap']} iterations per scale; {first['cpu']}, "
              f"{rows[0]['threads']} thread(s), {first['date']} to {last['date'][-9:]}\n")
        print("| variant | pair | " + " | ".join(c[0] for c in COLUMNS)
              + " | iterations | time s |")
        print("|---|---|" + "---|" * (len(COLUMNS) + 2))
        for label in labels:
            mine = [r for r in rows if r["label"] == label]
            if not mine:
                continue
            for r in mine if args.per_pair else []:
                print(f"| {label} | {_pair_name(r)} | "
                      + " | ".join(f.format(r["measured"][k]) for _, k, f in COLUMNS)
                      + f" | {r['iterations']} | {r['elapsed_s']:.0f} |")
            mean = {k: float(np.mean([r["measured"][k] for r in mine])) for _, k, _ in COLUMNS}
            print(f"| **{label}** | mean of {len(mine)} | "
                  + " | ".join(f.format(mean[k]) for _, k, f in COLUMNS)
                  + f" | {np.mean([r['iterations'] for r in mine]):.0f} | "
                  f"{np.mean([r['elapsed_s'] for r in mine]):.0f} |")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSansMono.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _command(record: dict[str, Any]) -> list[str]:
    """The CLI command of a run, in four short lines; $C and $S are the shared content and
    style folders, and the network flags (``--arch vgg16 --weights $W``) are said once, in
    the caption."""
    return [f"gramstyle stylize --preset {record['preset']}",
            f"  --content $C/{record['content']}",
            f"  --style $S/{record['style']}",
            f"  --size {record['size']} --iterations {record['iterations_cap']}"]


def sheet(args: argparse.Namespace) -> None:
    """A contact sheet. For a group: one row per pair (``--rows``), one column per variant
    (``--labels``), with ``--commands`` the CLI command under each tile. With ``--sweep PAIR``:
    one row per swept option, for that pair, balanced first, each tile captioned."""
    records = _load_records()
    if args.sweep is not None:
        pair = PAIRS[args.sweep]
        options = list(dict.fromkeys(label.split("=")[0] for label, _, _ in GROUPS["sweeps"]
                                     if "=" in label))
        grid = [[(pair, "balanced")] + [(pair, label) for label, _, _ in GROUPS["sweeps"]
                                         if label.startswith(option + "=")]
                for option in options]
        header = None
    else:
        labels = args.labels.split(";") if args.labels else [
            label for label, _, _ in GROUPS[args.group]]
        pairs = ([PAIRS[int(i)] for i in args.rows.split(",")] if args.rows
                 else PAIRS[:args.pairs])
        grid = [[(pair, label) for label in labels] for pair in pairs]
        header = labels
    width, gap, line = args.tile, 6, 13
    font = _font(11 if args.commands else 10)
    rows = []
    for row in grid:
        tiles = []
        for pair, label in row:
            key = _key(args.size, args.iterations, pair, label)
            image = Image.open(_image_path(Path(args.images), key)).convert("RGB")
            image = image.resize((width, round(image.height * width / image.width)),
                                 Image.LANCZOS)
            record = records[key]
            if args.commands:
                caption = _command(record)
            else:
                m = record["measured"]
                caption = [label.replace("style_layer_weights=", "layer weights "),
                           f"stroke {m['stroke_px']:.1f}px content {m['content']:.2f}"]
            tiles.append((image, caption))
        rows.append(tiles)
    head = 22 if header else 0
    heights = [max(t.height + line * len(c) + 4 for t, c in row) for row in rows]
    columns = max(len(row) for row in rows)
    out = Image.new("RGB", (columns * (width + gap) + gap, head + sum(h + gap for h in heights)
                            + gap), "white")
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(header or []):
        draw.text((gap + j * (width + gap), 5), label, fill="black", font=_font(14))
    top = head + gap
    for row, height in zip(rows, heights, strict=True):
        for j, (tile, caption) in enumerate(row):
            x = gap + j * (width + gap)
            out.paste(tile, (x, top))
            for n, text in enumerate(caption):
                draw.text((x, top + tile.height + 2 + line * n), text, fill="black", font=font)
        top += height + gap
    out.save(args.out, quality=args.quality, optimize=True)
    print(f"wrote {args.out} ({out.width}x{out.height}, {Path(args.out).stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "report", "sheet"):
        p = sub.add_parser(name)
        if name != "report":
            p.add_argument("group", choices=tuple(GROUPS))
        p.add_argument("--size", type=int, default=384)
        p.add_argument("--iterations", type=int, default=150, help="cap per scale")
        p.add_argument("--pairs", type=int, default=len(PAIRS))
        p.add_argument("--images", default=str(RESULTS.parent / "preset_study"),
                       help="output images (JPEG) of the runs")
    sub.choices["run"].add_argument("--threads", type=int, default=1)
    sub.choices["report"].add_argument("--per-pair", action="store_true")
    sub.choices["report"].add_argument("--groups", default=",".join(GROUPS))
    sheet_args = sub.choices["sheet"]
    sheet_args.add_argument("--out", required=True)
    sheet_args.add_argument("--tile", type=int, default=256, help="tile width, px")
    sheet_args.add_argument("--rows", help="pair indices, e.g. 0,1")
    sheet_args.add_argument("--labels", help="variants to show, ';'-separated")
    sheet_args.add_argument("--commands", action="store_true", help="a command under each tile")
    sheet_args.add_argument("--sweep", type=int, help="a sweep sheet of this pair (index)")
    sheet_args.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    {"run": run, "report": report, "sheet": sheet}[args.command](args)


if __name__ == "__main__":
    main()
