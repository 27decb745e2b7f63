"""A small study of the presets: each content/style pair under faithful, balanced and
painterly, measured the same way, and a contact sheet.

    python bench/preset_study.py --size 192 --iterations 80 --sheet docs/gallery/presets_sheet.jpg

Every run uses the trained VGG16 (../shared/models) on the CPU with ``--iterations`` steps per
scale for every preset (the same budget per scale, so that the presets differ only by their
weights, layer weights, style_scale, scales and TV weight). Measured on each output, with the
balanced options so that the presets are compared on one scale:

- ``content``: the relative content error at relu4_2 (lower: the content is better kept);
- ``deep style``, ``fine style``: the relative Gram distance to the style image at relu4_1 and
  relu5_1, and at relu1_1 and relu2_1 (the style's large motifs, and its fine texture);
- ``stroke px``: the scale of what the stylisation added -- the power-weighted mean
  wavelength (pixels, at the output size) of the luminance of output minus content, from its
  2-D spectrum without the DC term. Larger means larger strokes and motifs.

Prints a markdown table (one row per pair and preset, and the mean per preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np
from machine import cpu_model, load1
from PIL import Image, ImageDraw

from gramstyle.engine import StyleTransfer
from gramstyle.images import load_image
from gramstyle.options import StyleOptions
from gramstyle.presets import PRESET_NAMES, preset_values

SHARED = next(Path(p) for p in (os.environ.get("GRAMSTYLE_SHARED"),
                                Path(__file__).resolve().parents[2] / "shared", "/work/shared")
              if p and (Path(p) / "images").is_dir())
PAIRS = (("chelsea.png", "starry_night.jpg"), ("astronaut.png", "the_scream.jpg"),
         ("coffee.png", "woman_with_a_hat.jpg"), ("rocket.jpg", "shipwreck.jpg"))


def luminance(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return rgb @ np.array([0.299, 0.587, 0.114])


def stroke_wavelength(output: Image.Image, content: Image.Image) -> float:
    """Power-weighted mean wavelength (px) of luminance(output) - luminance(content)."""
    diff = luminance(output) - luminance(content.resize(output.size, Image.BICUBIC))
    diff -= diff.mean()
    power = np.abs(np.fft.fft2(diff)) ** 2
    fy = np.fft.fftfreq(diff.shape[0])[:, None]
    fx = np.fft.fftfreq(diff.shape[1])[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    power[0, 0] = 0
    mean_frequency = float((power * radius).sum() / power.sum())  # cycles per pixel
    return 1 / mean_frequency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--pairs", type=int, default=len(PAIRS))
    parser.add_argument("--sheet", help="write the contact sheet here (.jpg)")
    args = parser.parse_args()
    engine = StyleTransfer(arch="vgg16", weights=str(SHARED / "models" / "vgg16-hed-bsds500.pth"),
                           device="cpu")
    measure = StyleOptions(size=args.size, style_layers=("relu1_1", "relu2_1", "relu4_1",
                                                         "relu5_1"), precision="fp32")
    print(f"{args.pairs} pairs at {args.size} px, {args.iterations} iterations per scale, "
          f"VGG16 (HED); {cpu_model()}, load {load1():.1f}\n")
    print("| pair | preset | content | deep style | fine style | stroke px | time s |")
    print("|---|---|---|---|---|---|---|")
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in PRESET_NAMES}
    tiles: list[list[Image.Image]] = []
    for content_name, style_name in PAIRS[:args.pairs]:
        content = load_image(SHARED / "images" / "content" / content_name)
        style = load_image(SHARED / "images" / "style" / style_name)
        tiles.append([])
        for name in PRESET_NAMES:
            options = StyleOptions(**preset_values(name, {"size": args.size,
                                                          "iterations": args.iterations}))
            result = engine.stylize(content, style, options)
            report = engine.compute_losses(result.image, content, style,
                                           dataclasses.replace(measure))
            layers = report.losses.style_layers
            row = (report.losses.content_layers["relu4_2"],
                   (layers["relu4_1"] + layers["relu5_1"]) / 2,
                   (layers["relu1_1"] + layers["relu2_1"]) / 2,
                   stroke_wavelength(result.image, content), result.elapsed_s)
            rows[name].append(row)
            tiles[-1].append(result.image)
            print(f"| {Path(content_name).stem} + {Path(style_name).stem} | {name} | "
                  + " | ".join(f"{v:.3g}" for v in row) + " |", flush=True)
    for name in PRESET_NAMES:
        mean = np.mean(rows[name], axis=0)
        print(f"| **mean** | {name} | " + " | ".join(f"{v:.3g}" for v in mean) + " |")
    if args.sheet:
        width = max(t.width for row in tiles for t in row)
        heights = [max(t.height for t in row) for row in tiles]  # each row as tall as its pair
        sheet = Image.new("RGB", (3 * (width + 8) + 8, sum(h + 8 for h in heights) + 20),
                          "white")
        draw = ImageDraw.Draw(sheet)
        for j, name in enumerate(PRESET_NAMES):
            draw.text((8 + j * (width + 8), 8), f"--preset {name}", fill="black")
        top = 28
        for row, height in zip(tiles, heights, strict=True):
            for j, tile in enumerate(row):
                sheet.paste(tile, (8 + j * (width + 8), top))
            top += height + 8
        sheet.save(args.sheet, quality=90)
        print(f"\nwrote {args.sheet}")


if __name__ == "__main__":
    main()
