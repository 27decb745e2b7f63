"""Two complementary region masks for a content image: its left half and its right half.

    python bench/region_masks.py ../shared/images/content/chelsea.png --out /tmp/masks

writes ``left.png`` (white on the left, black on the right) and ``right.png`` (its inverse)
at the content image's size, so they have the output's aspect ratio whatever ``--size`` is.
The two meet in a linear ramp ``--feather`` of the width wide (0 for a hard edge), so the
two styles blend over a short band instead of meeting at a seam. Used for the regions
example in the README's gallery (``--style-mask``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def halves(width: int, height: int, feather: float) -> tuple[Image.Image, Image.Image]:
    """(left, right) greyscale masks of ``width`` x ``height`` px; ``feather`` is the ramp's
    width as a fraction of ``width`` (0 to 1), centred on the middle."""
    if not 0 <= feather <= 1:
        raise ValueError(f"feather: {feather} is not between 0 and 1")
    ramp = feather * width
    row = []
    for x in range(width):
        centre = x + 0.5 - width / 2  # px from the middle, negative on the left
        value = (0.5 - centre / ramp) if ramp else float(centre < 0)
        row.append(round(255 * min(1.0, max(0.0, value))))
    left = Image.new("L", (width, height))
    left.putdata(row * height)
    return left, Image.eval(left, lambda v: 255 - v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("content", type=Path, help="the content image (only its size is used)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for left/right.png")
    parser.add_argument("--feather", type=float, default=0.1,
                        help="width of the ramp between the halves, as a fraction of the width")
    args = parser.parse_args(argv)
    with Image.open(args.content) as image:
        size = image.size
    args.out.mkdir(parents=True, exist_ok=True)
    for name, mask in zip(("left", "right"), halves(*size, args.feather), strict=True):
        mask.save(args.out / f"{name}.png")
        print(f"wrote {args.out / name}.png ({size[0]}x{size[1]} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
