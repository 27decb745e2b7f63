"""The progress sheet: the image at several iterations side by side, labelled, like the
lecture's slides (iterations 1, 11, 21, ... next to the target)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from gramstyle.errors import FieldError
from gramstyle.images import save_image

#: Most frames drawn on one sheet; more are thinned out evenly (keeping the first and last).
MAX_FRAMES = 8


def pick_frames(frames: Sequence[tuple[int, Image.Image]], limit: int = MAX_FRAMES
                ) -> list[tuple[int, Image.Image]]:
    """Thin ``(iteration, image)`` frames to at most ``limit``, keeping the first and last."""
    frames = list(frames)
    if len(frames) <= limit:
        return frames
    step = (len(frames) - 1) / (limit - 1)
    return [frames[round(i * step)] for i in range(limit)]


def draw_progress_sheet(frames: Sequence[tuple[str, Image.Image]], tile: int = 192,
                        pad: int = 8, label_height: int = 22) -> Image.Image:
    """Lay ``(label, image)`` frames out in one row, each scaled to fit a ``tile`` px box,
    with its label underneath. Returns the sheet as an RGB image."""
    if not frames:
        raise FieldError("progress_sheet", "no frames to draw")
    scaled = []
    for label, image in frames:
        # Scale up as well as down, so small frames and a large target line up.
        factor = min(tile / image.width, tile / image.height)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        scaled.append((label, image.convert("RGB").resize(size, Image.Resampling.LANCZOS)))
    height = max(im.height for _, im in scaled)
    width = sum(im.width for _, im in scaled) + pad * (len(scaled) + 1)
    sheet = Image.new("RGB", (width, height + label_height + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    x = pad
    for label, image in scaled:
        sheet.paste(image, (x, pad))
        text_w = draw.textlength(label, font=font)
        draw.text((x + (image.width - text_w) / 2, pad + height + 4), label, fill="black",
                  font=font)
        x += image.width + pad
    return sheet


def save_progress_sheet(frames: Sequence[tuple[int, Image.Image]], path: str | os.PathLike,
                        target: tuple[str, Image.Image] | None = None) -> None:
    """Draw ``(iteration, image)`` frames, plus a ``(label, image)`` target such as the content
    image when given, and write the sheet atomically."""
    labelled = [(f"iteration {i}", im) for i, im in pick_frames(frames)]
    if target is not None:
        labelled.append(target)
    save_image(draw_progress_sheet(labelled), path, "--progress-sheet")
