"""Container bombs are refused before Pillow parses them (issue 18, items 2 and 3): a
progressive JPEG with thousands of scans, a JPEG of endless marker segments, a PNG of
millions of empty ancillary chunks, megabytes of metadata -- each an ImageError naming the
field, found by a walk over lengths and markers that takes milliseconds. Real images pass."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from gramstyle.images import (
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_METADATA_BYTES,
    MAX_PNG_ANCILLARY_CHUNKS,
    ImageError,
    check_structure,
    load_image,
    probe_image,
)


def _noise(side: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def progressive_jpeg(side: int = 64, scans: int = 10) -> bytes:
    """A progressive JPEG whose last Huffman table and scan are repeated until it has
    ``scans`` scans (the issue's scan bomb, at any size)."""
    buf = io.BytesIO()
    _noise(side).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    end = data.rindex(b"\xff\xd9")
    last_scan = data.rindex(b"\xff\xda")
    table = data.rindex(b"\xff\xc4", 0, last_scan)
    extra = max(0, scans - data.count(b"\xff\xda"))
    return data[:end] + data[table:end] * extra + data[end:]


def png_with_chunks(side: int = 64, chunks: int = 0, text: int = 0) -> bytes:
    """A PNG with ``chunks`` empty ancillary chunks and a tEXt chunk of ``text`` bytes after
    its header (the issue's chunk bomb)."""
    buf = io.BytesIO()
    _noise(side).save(buf, "PNG")
    data = buf.getvalue()
    empty = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
    body = b"Comment\0" + b"x" * text
    comment = (struct.pack(">I", len(body)) + b"tEXt" + body
               + struct.pack(">I", zlib.crc32(b"tEXt" + body))) if text else b""
    return data[:33] + empty * chunks + comment + data[33:]


def test_real_progressive_jpeg_passes():
    data = progressive_jpeg(64, scans=0)
    assert 5 <= data.count(b"\xff\xda") <= 12  # Pillow/libjpeg's progressive script
    assert load_image(data).size == (64, 64)
    assert probe_image(data).metadata_bytes >= 0


@pytest.mark.parametrize("scans", [MAX_JPEG_SCANS + 1, 3000])
def test_jpeg_scan_bomb_is_refused_before_decoding(scans):
    data = progressive_jpeg(64, scans)
    for read in (probe_image, load_image):
        with pytest.raises(ImageError) as info:
            read(data, "content[0]")
        assert str(info.value) == (f"content[0]: JPEG has over {MAX_JPEG_SCANS} scans, over "
                                   f"the limit of {MAX_JPEG_SCANS} (progressive JPEGs have "
                                   f"about 10)")


def test_jpeg_at_the_scan_limit_decodes():
    data = progressive_jpeg(64, MAX_JPEG_SCANS)
    assert data.count(b"\xff\xda") == MAX_JPEG_SCANS
    assert load_image(data, "style[0]").size == (64, 64)


def test_jpeg_segment_bomb_is_refused():
    data = progressive_jpeg(64, 0)
    comment = b"\xff\xfe\x00\x04hi"
    bomb = data[:2] + comment * (MAX_JPEG_SEGMENTS + 1) + data[2:]
    with pytest.raises(ImageError, match=r"^style\[1\]: JPEG has over 1024 marker segments"):
        probe_image(bomb, "style[1]")


def test_png_chunk_bomb_is_refused_in_milliseconds():
    bomb = png_with_chunks(64, chunks=1_000_000)  # 12 MB of empty chunks
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        probe_image(bomb, "content[0]")
    took = time.perf_counter() - start
    assert str(info.value) == (f"content[0]: PNG has over {MAX_PNG_ANCILLARY_CHUNKS} "
                               f"ancillary (metadata) chunks, over the limit of "
                               f"{MAX_PNG_ANCILLARY_CHUNKS}")
    assert took < 0.25, took  # Pillow took seconds on it, holding the interpreter


def test_png_metadata_is_counted_and_bounded():
    fine = png_with_chunks(64, chunks=10, text=2 * 2**20)
    header = probe_image(fine)
    assert header.metadata_bytes == 2 * 2**20 + len(b"Comment\0")
    assert load_image(fine).size == (64, 64)
    big = png_with_chunks(64, text=MAX_METADATA_BYTES)
    with pytest.raises(ImageError, match=r"^init_image: image carries \d+ bytes of metadata, "
                                         r"over the limit of 16777216 bytes$"):
        load_image(big, "init_image")


def test_other_formats_and_garbage_pass_the_walk_unchanged():
    buf = io.BytesIO()
    _noise(32).save(buf, "WEBP")
    assert check_structure(buf.getvalue()) == 0
    assert check_structure(b"\x89PNG\r\n\x1a\n") == 0  # truncated: Pillow's error, not ours
    assert check_structure(b"\xff\xd8\x00\x00") == 0
