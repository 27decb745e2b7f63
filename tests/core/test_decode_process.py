"""gramstyle.decode_process: images decoded in child processes that are killed when the
caller stops waiting (issue 18: no input holds a worker more than 1 s past its deadline)."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gramstyle.decode_process import DecodePool
from gramstyle.errors import Cancelled
from gramstyle.images import MAX_JPEG_SCANS, ImageError, load_image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from fuzz import scan_bomb  # noqa: E402


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def slow_jpeg() -> bytes:
    """A 2048 x 2048 noise JPEG with the most scans allowed: well over 0.2 s to decode."""
    return scan_bomb(_noise(2048, 2048), MAX_JPEG_SCANS)


@pytest.fixture
def pool():
    pool = DecodePool(1, in_process_pixels=0)
    yield pool
    pool.close()


def _stop_after(seconds: float):
    """A ``check`` that raises Cancelled once ``seconds`` have passed since it was made."""
    start = time.monotonic()

    def check(_: float) -> None:
        if time.monotonic() - start > seconds:
            raise Cancelled("stopped")
    return check


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB"),
                                      ("GIF", "P"), ("TIFF", "I;16"), ("BMP", "L")])
def test_child_decodes_the_same_pixels_as_load_image(pool, fmt, mode):
    image = _noise(96, 64).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 257)
    data = _encoded(image, fmt)
    got = pool.load_image(data, "style[0]")
    want = load_image(data, "style[0]")
    assert got.mode == "RGB" and got.size == want.size == (96, 64)
    assert got.tobytes() == want.tobytes()
    assert len(pool.pids) == 1  # decoded by the child, which stays for the next image


def test_child_errors_name_the_field_as_load_image_does(pool):
    data = _encoded(_noise(128, 128), "PNG")[:3000]
    with pytest.raises(ImageError) as want:
        load_image(data, "content[1]")
    with pytest.raises(ImageError) as got:
        pool.load_image(data, "content[1]")
    assert got.value.field == "content[1]"
    assert str(got.value) == str(want.value)
    assert "truncated" in str(got.value)


def test_header_checks_refuse_before_any_child(pool):
    data = _encoded(_noise(64, 64), "PNG")
    with pytest.raises(ImageError, match=r"^content\[0\]: image is 64x64 = 4096 pixels, over "
                                         r"the limit of 1000 pixels"):
        pool.load_image(data, "content[0]", max_pixels=1000)
    assert pool.pids == []  # no process was started for it


def test_small_images_stay_in_process():
    pool = DecodePool(1, in_process_pixels=64 * 64)
    try:
        assert pool.load_image(_encoded(_noise(64, 64), "PNG")).size == (64, 64)
        assert pool.pids == []
        assert pool.load_image(_encoded(_noise(65, 64), "PNG")).size == (65, 64)
        assert len(pool.pids) == 1
    finally:
        pool.close()


def test_a_stopped_decode_is_killed_within_a_poll_and_the_child_replaced(pool, slow_jpeg):
    pool.load_image(_encoded(_noise(32, 32), "PNG"))  # start the child
    (first,) = pool.pids
    start = time.monotonic()
    with pytest.raises(Cancelled):
        pool.load_image(slow_jpeg, "content[0]", check=_stop_after(0.05))
    overrun = time.monotonic() - start - 0.05
    assert overrun < 0.5, f"returned {overrun:.2f} s after the stop"
    assert pool.killed == 1
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # killed and reaped
    (second,) = pool.pids
    assert second != first
    # The replacement decodes the same file in full.
    assert pool.load_image(slow_jpeg, "content[0]").size == (2048, 2048)


def test_a_crashing_decoder_is_a_clear_error_and_the_pool_recovers(pool, slow_jpeg):
    pool.load_image(_encoded(_noise(32, 32), "PNG"))
    (child,) = pool.pids
    # A decoder that crashes (here: killed mid-decode, as by a segfault) fails its image only.
    threading.Timer(0.1, os.kill, (child, signal.SIGKILL)).start()
    with pytest.raises(ImageError, match=r"^style\[2\]: the image decoder failed on this "
                                         r"image \(exit code -9"):
        pool.load_image(slow_jpeg, "style[2]")
    assert pool.load_image(_encoded(_noise(40, 30), "PNG")).size == (40, 30)


def test_a_child_that_died_idle_is_replaced(pool):
    data = _encoded(_noise(40, 30), "PNG")
    pool.load_image(data)
    (child,) = pool.pids
    os.kill(child, signal.SIGKILL)
    time.sleep(0.1)
    assert pool.load_image(data).size == (40, 30)
    assert pool.pids != [child]


def test_processes_are_bounded_and_a_waiting_caller_can_stop(pool, slow_jpeg):
    """One process: a second caller waits for it (polling its check), never forks more."""
    busy = threading.Thread(target=pool.load_image, args=(slow_jpeg, "content[0]"))
    busy.start()
    time.sleep(0.1)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        pool.load_image(_encoded(_noise(32, 32), "PNG"), check=_stop_after(0.1))
    assert time.monotonic() - start < 0.6
    busy.join(30)
    assert pool._alive == 1 and len(pool.pids) == 1
    assert pool.killed == 0  # the waiting caller's stop killed nobody's decode


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_child_probe_reads_the_same_header_as_probe_image(pool, fmt):
    from gramstyle.images import probe_image

    data = _encoded(_noise(96, 64), fmt)
    assert pool.probe_image(data, "style[0]") == probe_image(data, "style[0]")
    with pytest.raises(ImageError, match=r"^candidate: long side 96 px is over the limit of "
                                         r"80 px$"):
        pool.probe_image(data, "candidate", max_side=80)


def test_a_stopped_probe_is_killed(pool):
    """A probe that does not answer (its child stopped, as by a header that takes forever)
    is given up at the caller's stop and its child killed."""
    pool.probe_image(_encoded(_noise(32, 32), "PNG"))
    (child,) = pool.pids
    os.kill(child, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(Cancelled):
        pool.probe_image(_encoded(_noise(32, 32), "PNG"), "content[0]",
                         check=_stop_after(0.1))
    assert time.monotonic() - start < 0.6
    assert pool.killed == 1 and pool.pids != [child]
    assert pool.probe_image(_encoded(_noise(32, 32), "PNG")).width == 32
