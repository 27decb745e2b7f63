"""gramstyle.images: decoding to 8-bit RGB, limits, atomic writes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from conftest import EPS, encode, noise, png
from PIL import Image

from gramstyle.engine.stop import Cancelled
from gramstyle.images import ImageError, encode_image, load_image, probe_image, save_image


def test_16_bit_grey_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    rgb = np.asarray(load_image(png(Image.fromarray(ramp))))
    assert rgb.shape == (32, 32, 3)
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135


def test_float_image_in_unit_range_is_scaled():
    ramp = Image.fromarray(np.linspace(0, 1, 64).reshape(8, 8).astype(np.float32))
    rgb = np.asarray(load_image(ramp))
    assert rgb.min() == 0 and rgb.max() == 255


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert np.asarray(load_image(clear))[0, 0].tolist() == [255, 255, 255]
    assert 120 < np.asarray(load_image(png(half)))[0, 0, 0] < 135


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_zero_size_and_pixel_limit():
    with pytest.raises(ImageError, match=r"^style\[1\]: zero-size image \(0x5\)$"):
        load_image(Image.new("RGB", (0, 5)), "style[1]")
    with pytest.raises(ImageError, match=r"^candidate: image is 20x20 = 400 pixels, over the "
                                         r"limit of 100 pixels$"):
        load_image(png(Image.new("RGB", (20, 20))), "candidate", max_pixels=100)


def test_save_is_atomic_and_readable(tmp_path):
    target = tmp_path / "out.webp"
    save_image(Image.new("RGB", (8, 8), "blue"), target)
    assert Image.open(target).format == "WEBP"
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ImageError, match=r"^format: unsupported output format 'gif'"):
        encode_image(Image.new("RGB", (2, 2)), "gif")


_FAILING_WRITE = """
import os, resource, sys
from PIL import Image
from gramstyle.images import save_image
# The file size limit makes write() fail part-way (EFBIG; Python ignores SIGXFSZ), as a
# full disk would: the temporary file gets its first 4 KiB, then the write raises.
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
noise = Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3))  # ~49 KB as PNG
try:
    save_image(noise, sys.argv[1])
except OSError as exc:
    print("failed", exc.errno)
else:
    print("written")
"""


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    import errno
    import subprocess
    import sys

    target = tmp_path / "out.png"
    save_image(Image.new("RGB", (8, 8), "blue"), target)
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _FAILING_WRITE, str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["failed", str(errno.EFBIG)]
    assert target.read_bytes() == before  # the old image, whole
    assert np.asarray(Image.open(target)).tolist() == np.asarray(
        Image.new("RGB", (8, 8), "blue")).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary left


def test_decoding_announces_its_work_and_stops():
    big = encode(noise(2048, 2048, 5))
    seen: list[float] = []

    def stop(seconds: float) -> None:
        seen.append(seconds)
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        load_image(big, "content[0]", check=stop)
    assert seen and seen[0] > 0.05  # told before the pixels are decoded




def test_only_allowed_formats_are_decoded(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):  # pragma: no cover - must never run
        raise AssertionError("Ghostscript would run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    for data in (EPS, encode(Image.new("RGB", (8, 8)), "PPM"),
                 encode(Image.new("RGB", (8, 8)), "TGA")):
        with pytest.raises(ImageError, match=r"not a PNG, JPEG, WebP, BMP, TIFF or GIF image"):
            load_image(data, "style[0]")
        with pytest.raises(ImageError):
            probe_image(data, "style[0]")
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        assert load_image(encode(Image.new("RGB", (8, 6), "red"), fmt)).size == (8, 6), fmt
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((0, 0)) == (255, 0, 0)  # the first frame
