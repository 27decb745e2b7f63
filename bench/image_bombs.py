"""Issue 18, items 2 and 3: how long the worst images the limits allow take to decode, and how
long the bombs take to be refused.

For a side of N pixels (default 4096, the default --max-pixels): a flat and a noise
progressive JPEG with libjpeg's 10 scans and with ``MAX_JPEG_SCANS`` (the last scan
repeated), decoded with ``load_image``; a PNG with ``MAX_PNG_ANCILLARY_CHUNKS`` empty chunks,
probed; and the bombs -- 3,000 scans, 5,200,000 empty chunks -- refused by
``probe_image``.

    python bench/image_bombs.py              # 4096 px
    python bench/image_bombs.py --smoke      # 256 px, fewer chunks (tests/core/...)

``--decode`` measures instead the worst allowed file of every input format (a noise JPEG
with ``MAX_JPEG_SCANS`` scans, noise PNGs, GIF, TIFF uncompressed and deflated, lossy and
lossless WebP, BMP) at the side given: its decode time in-process (``load_image``) and in a
child process (``DecodePool``), and how long after a deadline the call returns when the
deadline falls mid-decode (``--deadline`` seconds after the start; the child is killed):

    python bench/image_bombs.py --decode               # 4096 px, the default --max-pixels
    python bench/image_bombs.py --decode --side 1024   # DEFAULT_IN_PROCESS_PIXELS

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

from gramstyle.decode_process import DecodePool  # noqa: E402
from gramstyle.errors import Cancelled  # noqa: E402
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


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _lossy_webp(image: Image.Image) -> bytes:
    """The highest quality libwebp can encode noise at (its first partition holds 512 KiB:
    a 4096 px noise image overflows it at quality 100)."""
    for quality in (100, 90, 75, 50, 25):
        try:
            return _encoded(image, "WEBP", quality=quality, method=0)
        except ValueError:
            continue
    raise ValueError("libwebp cannot encode this image")


def worst_files(side: int) -> list[tuple[str, bytes]]:
    """The costliest file to decode of each input format that the limits allow, side x side:
    noise (nothing compresses, every byte is decoded), the most scans a JPEG may have, the
    16-bit PNG whose conversion takes the most copies."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 65536, (side, side), dtype=np.uint16))
    return [
        (f"JPEG {MAX_JPEG_SCANS} scans", scan_bomb(noise, MAX_JPEG_SCANS)),
        ("PNG RGBA", _encoded(noise.convert("RGBA"), "PNG", compress_level=1)),
        ("PNG 16-bit grey", _encoded(wide, "PNG", compress_level=1)),
        ("GIF", _encoded(noise.quantize(256, method=Image.Quantize.FASTOCTREE), "GIF")),
        ("TIFF raw", _encoded(noise, "TIFF")),
        ("TIFF deflate", _encoded(noise, "TIFF", compression="tiff_adobe_deflate")),
        ("WebP lossy", _lossy_webp(noise)),
        ("WebP lossless", _encoded(noise, "WEBP", lossless=True, method=0, quality=0)),
        ("BMP", _encoded(noise, "BMP")),
    ]


def decode_times(side: int, deadline: float) -> list[dict]:
    """For each worst file: seconds to decode in-process and in a child, and the seconds a
    call stopped ``deadline`` s after its start took past that deadline."""
    pool = DecodePool(1, in_process_pixels=0)
    pool.load_image(_encoded(Image.new("RGB", (64, 64)), "PNG"))  # start the child
    rows = []
    try:
        for name, data in worst_files(side):
            row = {"case": f"{name} {side}px", "bytes": len(data)}
            row["in_process_s"] = round(_timed(lambda d=data: load_image(d, "c", None))[0], 3)
            row["child_s"] = round(_timed(lambda d=data: pool.load_image(d, "c", None))[0], 3)
            start = time.monotonic()

            def check(_: float, start: float = start) -> None:
                if time.monotonic() - start > deadline:
                    raise Cancelled("deadline")
            try:
                pool.load_image(data, "c", None, check=check)
                row["past_deadline_s"] = "finished first"
            except Cancelled:
                row["past_deadline_s"] = round(time.monotonic() - start - deadline, 3)
            rows.append(row)
            print(f"{row['case']:<24} {len(data) / 2**20:7.1f} MiB  in-process "
                  f"{row['in_process_s']:6.3f} s  child {row['child_s']:6.3f} s  stopped at "
                  f"{deadline} s: {row['past_deadline_s']}"
                  f"{'' if isinstance(row['past_deadline_s'], str) else ' s late'}", flush=True)
    finally:
        pool.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="256 px, 200,000 chunks")
    parser.add_argument("--decode", action="store_true",
                        help="the worst allowed file of each format, decoded in-process and "
                             "in a child, and stopped at a deadline")
    parser.add_argument("--deadline", type=float, default=0.1,
                        help="with --decode: seconds after the start that the stop comes")
    args = parser.parse_args(argv)
    if args.decode:
        rows = decode_times(256 if args.smoke else args.side, args.deadline)
        print(json.dumps(rows))
        return 0
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
