"""Image decoding, validation and encoding -- the one place for it.

The CLI, the client library and the gRPC server all go through these functions, so a bad
image gets the same message everywhere. Every error is an :class:`ImageError` (a
``ValueError``) whose message starts with the name of the field or option it came from.

Pixel limits are checked from the image *header*, before any pixel data is decoded, so a
decompression bomb costs nothing. Only the formats in :data:`INPUT_FORMATS` are decoded
(``Image.open(formats=...)``): Pillow knows about 45, some of which run external programs
(EPS runs Ghostscript) or are rarely exercised parsers, and a network service should not
offer them to every caller. :func:`probe_image` reads a header without decoding, so that a
server can size a request (and refuse it) before paying for the pixels.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error

from PIL import Image, ImageOps, UnidentifiedImageError

from gramstyle.errors import ImageError  # re-exported here

#: Default limit on width*height of any decoded image (a 4096x4096 image).
DEFAULT_MAX_PIXELS = 4096 * 4096

#: Output formats by name, as used by the CLI suffixes and the proto enum.
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}

#: The input formats decoded (Pillow format ids); of animated GIF, APNG, multi-page TIFF and
#: MPO only the first frame is used. Anything else is "cannot decode image".
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
_INPUT_NAMES = "PNG, JPEG, WebP, BMP, TIFF or GIF"
#: What Pillow's parsers and decoders raise on bad bytes (besides UnidentifiedImageError):
#: all of it is the caller's corrupt or truncated image, never a server error.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct_error, IndexError,
                  KeyError, TypeError, ZeroDivisionError, OverflowError)
#: Rough seconds per pixel of one decoding step (decode, rotate, convert) on a CPU core: a
#: 16-megapixel PNG decodes in about 0.3 s, a WebP in about 1 s.
_SECONDS_PER_PIXEL = 4e-8

#: Bytes per pixel Pillow holds for a decoded image of each mode (multi-band modes are stored
#: as 32 bits per pixel); see :func:`decoded_bytes`.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
               "I": 4, "F": 4}

#: Most scans (SOS segments) a JPEG may have. libjpeg's progressive script has 10 for colour
#: images (18 for CMYK), and optimised encoders (mozjpeg) stay under 20; every scan is a pass
#: over all the pixels inside one decoder call that cannot be interrupted, so a "scan bomb"
#: of thousands held a worker for half a minute. Measured (bench/image_bombs.py) on a shared
#: 2-core Xeon: a flat 4096 x 4096 JPEG decodes in 1.3 s with 10 scans, 3.0 s with 32 (the
#: worst allowed); a 13 MB noise one with 10 scans in 3.7 s. Within the limit the decode
#: time grows with the file's bytes, and one decode still cannot be interrupted.
MAX_JPEG_SCANS = 32
#: Most marker segments a JPEG may have (Pillow parses each one in Python); real files have
#: a few dozen, an ICC profile split into 64 KiB APP2 segments a few more.
MAX_JPEG_SEGMENTS = 1024
#: Most chunks a PNG may have, and most ancillary ones (anything but IHDR, PLTE, IDAT, IEND
#: and APNG's frame chunks): Pillow parses each chunk in Python, holding the interpreter,
#: and 5,200,000 empty ones starved the server's header probes for 20 s. Encoders split the
#: pixels into IDAT chunks of 8 KiB or more: 16,384 chunks hold a 128 MiB image.
MAX_PNG_CHUNKS = 16384
MAX_PNG_ANCILLARY_CHUNKS = 1024
#: Most bytes of metadata (PNG ancillary chunks, JPEG APPn/COM segments) an image may carry:
#: Pillow reads them into memory (text chunks decoded as strings). ICC profiles and XMP
#: packets are at most a few MiB.
MAX_METADATA_BYTES = 16 * 2**20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"acTL", b"fcTL", b"fdAT"}
#: The end of a JPEG scan's entropy-coded data: a marker, i.e. 0xFF followed by anything but
#: a stuffed zero, a restart marker or another 0xFF (fill).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


def _check_size(width: int, height: int, field: str, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(field, f"zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            field,
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode.

    16-bit and 32-bit integer images are scaled to 8 bits (Pillow's own conversion would clip
    them to white), float images in [0, 1] are scaled by 255, and transparency is composited
    onto white (a plain conversion would show whatever colour hides under alpha 0).
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        wide = image.convert("F") if image.mode != "F" else image
        high = wide.getextrema()[1]
        if image.mode.startswith("I;16") or (image.mode == "I" and high > 255):
            factor = 255 / 65535 if high <= 65535 else 255 / high
        elif image.mode == "F" and high <= 1.0:
            factor = 255.0
        else:
            factor = 1.0
        image = wide.point(lambda v: v * factor).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk; Pillow refuses to open zero-size PNGs at all,
    and this lets the error say why."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, before any pixel is decoded."""

    #: Pillow's format id, one of :data:`INPUT_FORMATS`.
    format: str
    #: Pillow's mode of the decoded pixels ('RGB', 'I;16', 'CMYK', ...).
    mode: str
    #: Size in pixels as stored (EXIF rotation may swap them when decoded; the product and
    #: the long side stay the same).
    width: int
    height: int
    #: Bytes of metadata Pillow reads into memory besides the pixels (PNG ancillary chunks,
    #: JPEG APPn/COM segments); see :func:`check_structure`.
    metadata_bytes: int = 0

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decoded_bytes(header: ImageHeader) -> int:
    """Bytes Pillow holds for the decoded pixels of an image with this header."""
    return header.pixels * _MODE_BYTES.get(header.mode, 4)


def _read_source(source: ImageSource, field: str) -> tuple[bytes, str]:
    """The encoded bytes of a path or bytes source, and how to name it in errors."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(field, f"file not found: {str(path)!r}")
        if path.is_dir():
            raise ImageError(field, f"is a directory, not an image file: {str(path)!r}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(field, f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
        what = repr(str(path))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        what = f"{len(data)} bytes"
    else:
        raise ImageError(field, f"expected a path, bytes or PIL image, got {type(source).__name__}")
    if not data:
        raise ImageError(field, f"empty image ({what})")
    return data, what


def _png_structure(data: bytes, field: str) -> int:
    """Walk a PNG's chunk list (lengths and types only); the ancillary bytes."""
    pos, chunks, ancillary, extra = 8, 0, 0, 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ImageError(field, f"PNG has over {MAX_PNG_CHUNKS} chunks, over the limit "
                                    f"of {MAX_PNG_CHUNKS}")
        if kind not in _PNG_CRITICAL:
            ancillary += 1
            extra += length
            if ancillary > MAX_PNG_ANCILLARY_CHUNKS:
                raise ImageError(field, f"PNG has over {MAX_PNG_ANCILLARY_CHUNKS} ancillary "
                                        f"(metadata) chunks, over the limit of "
                                        f"{MAX_PNG_ANCILLARY_CHUNKS}")
        pos += 12 + length
        if kind == b"IEND":
            break
    return extra


def _jpeg_structure(data: bytes, field: str) -> int:
    """Walk a JPEG's marker segments, skipping each scan's entropy-coded data; the bytes of
    its APPn and COM segments."""
    pos, segments, scans, extra = 2, 0, 0, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break  # not a marker: corrupt, Pillow says so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageError(field, f"JPEG has over {MAX_JPEG_SEGMENTS} marker segments, "
                                    f"over the limit of {MAX_JPEG_SEGMENTS}")
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            extra += length
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageError(field, f"JPEG has over {MAX_JPEG_SCANS} scans, over the "
                                        f"limit of {MAX_JPEG_SCANS} (progressive JPEGs have "
                                        f"about 10)")
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return extra


def check_structure(data: bytes, field: str = "image") -> int:
    """Refuse a PNG or JPEG whose container is built to hold the decoder -- too many chunks,
    segments or scans, too much metadata -- before Pillow parses any of it (a walk over
    lengths and markers, milliseconds for the largest message). Returns the metadata bytes
    Pillow will read into memory (0 for other formats). Raises :class:`ImageError`."""
    if data.startswith(_PNG_SIGNATURE):
        extra = _png_structure(data, field)
    elif data.startswith(b"\xff\xd8"):
        extra = _jpeg_structure(data, field)
    else:
        return 0
    if extra > MAX_METADATA_BYTES:
        raise ImageError(field, f"image carries {extra} bytes of metadata, over the limit of "
                                f"{MAX_METADATA_BYTES} bytes")
    return extra


def _open(data: bytes, what: str, field: str, max_pixels: int | None,
          max_side: int | None) -> Image.Image:
    """Open (parse the header of) an allowed format and check its size; decodes nothing.
    Call :func:`check_structure` first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires before our check for truly huge headers.
        raise ImageError(field, f"image has over {2 * Image.MAX_IMAGE_PIXELS} pixels, over the "
                                f"limit of {max_pixels} pixels ({what})") from exc
    except UnidentifiedImageError as exc:
        size = _png_header_size(data)
        if size is not None and 0 in size:
            raise ImageError(field, f"zero-size image ({size[0]}x{size[1]})") from exc
        raise ImageError(field, f"cannot decode image ({what}): not a {_INPUT_NAMES} "
                                "image") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(field, f"corrupt or truncated image ({what}): {_short(exc)}") from exc
    _check_size(image.width, image.height, field, max_pixels)
    if max_side is not None and max(image.size) > max_side:
        raise ImageError(field, f"long side {max(image.size)} px is over the limit of "
                                f"{max_side} px")
    return image


def probe_image(source: ImageSource, field: str = "image",
                max_pixels: int | None = DEFAULT_MAX_PIXELS, max_side: int | None = None
                ) -> ImageHeader:
    """The format, mode and size of an encoded image, from its header alone.

    Applies the same checks as :func:`load_image` that need no pixels (allowed format, zero
    size, ``max_pixels``, ``max_side``) and raises the same :class:`ImageError`; a
    corrupt body is only found when decoding. A PIL image is described as it is.
    """
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, field, max_pixels)
        return ImageHeader(source.format or "", source.mode, source.width, source.height)
    data, what = _read_source(source, field)
    metadata = check_structure(data, field)
    with _open(data, what, field, max_pixels, max_side) as image:
        return ImageHeader(image.format, image.mode, image.width, image.height, metadata)


def _short(exc: BaseException) -> str:
    """A decoder's message, cut short (some echo the bytes they choked on)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else f"{text[:200]}… ({len(text)} chars)"


def load_image(
    source: ImageSource, field: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *, max_side: int | None = None, check: Callable[[float], None] | None = None,
) -> Image.Image:
    """Decode and validate an image; return it as an RGB PIL image.

    Args:
        source: a file path, encoded bytes (one of :data:`INPUT_FORMATS`), or a PIL image.
        field: the option or request field name, used as the prefix of every error message.
        max_pixels: reject images whose width*height exceeds this (``None``: no limit).
        max_side: reject images whose long side (px) exceeds this, from the header.
        check: called before each decoding step (pixels, rotation, conversion) with its
            estimated seconds; it may raise to abandon the image (a cancelled request).

    Raises:
        ImageError: missing/unreadable file, empty/corrupt/undecodable bytes, a format not
            in :data:`INPUT_FORMATS`, zero size, or over a limit.
    """
    check = check or (lambda seconds: None)
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, field, max_pixels)
        if max_side is not None and max(source.size) > max_side:
            raise ImageError(field, f"long side {max(source.size)} px is over the limit of "
                                    f"{max_side} px")
        return to_rgb(source)
    data, what = _read_source(source, field)
    # Only the header is parsed here: the size is checked before any pixel is decoded.
    check_structure(data, field)
    image = _open(data, what, field, max_pixels, max_side)
    seconds = image.width * image.height * _SECONDS_PER_PIXEL
    try:
        check(seconds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()  # the first frame of an animation
            check(seconds)
            image = ImageOps.exif_transpose(image)
            check(seconds)
            return to_rgb(image)
    except ImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageError(field, f"corrupt or truncated image ({what}): {_short(exc)}") from exc
    except MemoryError as exc:
        raise ImageError(field, f"image too large to decode ({what})") from exc


def read_image_bytes(source: ImageSource, field: str) -> bytes:
    """The encoded bytes of a path, bytes or PIL image (encoded as PNG), undecoded.

    Used where an image travels as it is (the client sends the original file bytes; the
    server decodes them with :func:`load_image`). Raises ImageError naming ``field``.
    """
    if isinstance(source, Image.Image):
        return encode_image(source, "png")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ImageError(field, f"file not found: {path!r}") from None
        except IsADirectoryError:
            raise ImageError(field, f"is a directory, not an image file: {path!r}") from None
        except OSError as exc:
            raise ImageError(field, f"cannot read {path!r}: {exc.strerror or exc}") from None
    raise ImageError(field, f"expected a path, bytes or PIL image, got {type(source).__name__}")


def format_for_path(path: str | os.PathLike, field: str = "output") -> str:
    """Pillow format name ('PNG', 'JPEG', 'WEBP') for an output path's suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ImageError(
            field, f"unsupported output file type {str(path)!r}: use .png, .jpg, .jpeg or .webp"
        )
    return FORMATS[suffix]


def check_output_path(path: str | os.PathLike, field: str = "output") -> Path:
    """Validate an output path up front (known suffix, existing writable folder)."""
    format_for_path(path, field)
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ImageError(field, f"folder does not exist: {str(parent)!r}")
    if not os.access(parent, os.W_OK):
        raise ImageError(field, f"folder is not writable: {str(parent)!r}")
    return path


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an image to bytes. ``fmt`` is 'png', 'jpeg'/'jpg' or 'webp' (any case)."""
    name = FORMATS.get(fmt.lower())
    if name is None:
        raise ImageError("format", f"unsupported output format {fmt!r}: use png, jpeg or webp")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if name in ("JPEG", "WEBP") else {}
    image.convert("RGB").save(buf, format=name, **kwargs)
    return buf.getvalue()


def save_image(image: Image.Image, path: str | os.PathLike, field: str = "output") -> Path:
    """Write an image atomically: to a temporary file in the same folder, then rename.

    A crash or error part-way through never leaves a half-written file at ``path``.
    """
    path = check_output_path(path, field)
    data = encode_image(image, format_for_path(path, field))
    return write_bytes_atomic(data, path)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def long_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) :func:`resize_long_side` gives a ``width`` x ``height`` image."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_long_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the longer side is ``size`` pixels, keeping the aspect ratio."""
    new = long_side_size(image.width, image.height, size)
    if new == image.size:
        return image
    return image.resize(new, Image.Resampling.LANCZOS)
