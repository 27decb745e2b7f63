"""Issue 18, items 2 and 3: how long the worst images the limits allow take to decode, and how
long the bombs take to be refused.

For a side of N pixels (default 4096, the default --max-pixels): a flat and a noise
progressive JPEG with libjpeg's 10 scans and with ``MAX_JPEG_SCANS`` (the last scan
repeated), decoded with ``load_image``; a PNG with ``MAX_PNG_ANCILLARY_CHUNKS`` empty chunks,
probed; and the bombs -- 3,000 scans, 5,200,000 empty chunks -- refused by
``probe_image``.

    python bench/image_bombs.py              # 4096 px
    python bench/image_bombs.py --smoke      # 256 px, fewer chunks (tests/core/...)

Prints one line per case and, last, a JSON list of them.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz import chunk_bomb, scan_bomb  # noqa: E402

from gramstyle.images import (  # noqa: E402
    MAX_JPEG_SCANS,
    MAX_PNG_ANCILLARY_CHUNKS,
    ImageError,
    load_image,
    probe_image,
)


def _timed(fn) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        fn()
        outcome = "decoded"
    except ImageError as exc:
        outcome = f"refused: {exc}"
    return time.perf_counter() - start, outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="256 px, 200,000 chunks")
    args = parser.parse_args(argv)
    side, bomb_chunks = (256, 200_000) if args.smoke else (args.side, 5_200_000)
    flat = Image.new("RGB", (side, side), (200, 100, 50))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3),
                                                              dtype=np.uint8))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    png = buf.getvalue()
    cases = [
        (f"flat JPEG {side}px, 10 scans", scan_bomb(flat, 10), load_image),
        (f"flat JPEG {side}px, {MAX_JPEG_SCANS} scans (worst allowed)",
         scan_bomb(flat, MAX_JPEG_SCANS), load_image),
        (f"noise JPEG {side}px, 10 scans", scan_bomb(noise, 10), load_image),
        (f"flat JPEG {side}px, 3000 scans (bomb)", scan_bomb(flat, 3000), probe_image),
        (f"PNG 64px, {MAX_PNG_ANCILLARY_CHUNKS} empty chunks (worst allowed)",
         chunk_bomb(png, MAX_PNG_ANCILLARY_CHUNKS), load_image),
        (f"PNG 64px, {bomb_chunks} empty chunks (bomb)", chunk_bomb(png, bomb_chunks),
         probe_image),
    ]
    rows = []
    for name, data, read in cases:
        seconds, outcome = _timed(lambda d=data, r=read: r(d, "content[0]", None))
        rows.append({"case": name, "bytes": len(data), "seconds": round(seconds, 3),
                     "outcome": outcome})
        print(f"{name:<55} {len(data) / 2**10:>9.0f} KiB {seconds:7.3f} s  {outcome[:60]}",
              flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
