"""Peak-memory estimates of one request, from image headers and options alone.

The server sizes every Stylize and ComputeLosses *before* decoding anything
(:func:`gramstyle.images.probe_image` reads the headers), refuses a request whose estimate is
over ``--max-request-memory`` (INVALID_ARGUMENT, naming what to lower), and admits jobs so
that the running ones' estimates never add up to more than ``--memory-budget``
(:class:`gramstyle.server.admission.WorkQueue`).

The model of the run itself -- targets, network activations (tiled or not), optimiser
state, output -- is the engine's (:mod:`gramstyle.engine.footprint`: the in-process engine
sizes ``tile`` "auto" with it too). This module adds what a server holds besides, in bytes:

- **images**: the encoded bytes (the request holds them, and a copy is taken), every decoded
  image kept as RGB (Pillow stores 4 bytes per pixel) for the whole run, and the largest
  one's decoding transient (its native mode, rotation, conversion, the cache digest; for
  an image decoded in a child process, the child's copy of the bytes and the pixels' trip
  back through the pipe);
- **message**: the parsed request itself (every field, unknown ones included: a caller may
  pad a message with fields this server does not know), and the metadata Pillow reads into
  memory with each image (PNG text chunks, JPEG APPn segments: the bytes, the decoded
  strings and their copy in the image's ``info``, ``METADATA_COPIES`` in all); the messages
  of queued requests, and of those still arriving, are held to the message budget
  (server/message_budget.py).

These do not all peak at once: the estimate is the costliest *phase* -- decoding (the
images, here), building one scale's targets (images and targets, with the coarser scale's targets
still held), optimising one scale (images, the kept targets, activations, optimiser,
output) -- times ``MARGIN``, plus a fixed ``OVERHEAD`` for the allocator, oneDNN's scratch
buffers and thread stacks; its parts are that phase's. ``tests/server/test_hardening.py`` checks
the estimate against the measured peak RSS of real requests (it must never be below it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from gramstyle.decode_process import DEFAULT_IN_PROCESS_PIXELS
from gramstyle.engine import footprint
from gramstyle.engine.footprint import MARGIN, OVERHEAD, Estimate, tile_sides
from gramstyle.images import ImageHeader, decoded_bytes
from gramstyle.options import StyleOptions

#: Modes whose conversion to RGB takes several full copies (see images.to_rgb).
_WIDE_MODES = {"RGBA", "LA", "PA", "P", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "1"}
_PIL_RGB = 4  # Pillow stores RGB as 32 bits per pixel
#: Copies of an image's metadata while it is decoded (see the module doc).
METADATA_COPIES = 3
#: Bytes per byte of the serialized request while it is parsed and held: protobuf's arena
#: grows by doubling (measured: a 48 MiB message peaked at 2.9 x its size with a small
#: Stylize, tests/server/test_memory_estimate_extras.py).
MESSAGE_COPIES = 3
#: The model's resized-inputs term (tests read it from here).
_resized_inputs = footprint.resized_inputs


def _held(images: Mapping[str, Sequence[ImageHeader]], encoded: int, message: int = 0
          ) -> tuple[int, int]:
    """(held, transient) bytes of the inputs as images. Held for the whole request: the
    parsed message, two copies of the encoded images (the job's list of them, the
    decoder's), each image's metadata copies and its decoded RGB pixels; transient: the
    largest one's decoding."""
    headers = [h for each in images.values() for h in each]
    held = (MESSAGE_COPIES * message + 2 * encoded
            + sum(METADATA_COPIES * h.metadata_bytes + _PIL_RGB * h.pixels for h in headers))
    return held, _decoding(headers, encoded)


def _decoding(headers: Sequence[ImageHeader], encoded: int = 0) -> int:
    """Transient bytes of decoding the largest image: its native pixels and a rotated copy,
    the conversion to RGB (16-bit and float go through two float copies and 8 bits; alpha
    and palettes are composited on white: three RGBA copies) and the target cache's digest
    of the pixels (3 bytes per pixel). An image decoded in a child process
    (:mod:`gramstyle.decode_process`: over ``DEFAULT_IN_PROCESS_PIXELS``) adds the child's
    copy of its encoded bytes (at most ``encoded``, all of the request's) and the RGB bytes
    on both ends of the pipe (3 bytes per pixel each)."""
    def cost(h: ImageHeader) -> int:
        converts = 16 if h.mode in _WIDE_MODES else 8
        child = encoded + 6 * h.pixels if h.pixels > DEFAULT_IN_PROCESS_PIXELS else 0
        return 2 * decoded_bytes(h) + (converts + 3) * h.pixels + child
    return max(map(cost, headers), default=0)


def estimate_stylize(extractor: nn.Module, options: StyleOptions,
                     contents: Sequence[ImageHeader], styles: Sequence[ImageHeader],
                     others: Mapping[str, Sequence[ImageHeader]] | None = None,
                     encoded: int = 0, message: int = 0) -> Estimate:
    """Peak bytes of a Stylize with validated ``options``; ``others``: the headers of the
    request's other image inputs by name (see :mod:`gramstyle.inputs`); ``encoded``: the
    request's image bytes; ``message``: the parsed request's size (``ByteSize()``)."""
    inputs = {"content": list(contents), "style": list(styles), **(others or {})}
    images, decoding = _held(inputs, encoded, message)
    return footprint.peak({"decode": {"images": images + decoding},
                           **footprint.stylize_phases(extractor, options, inputs, images)})


def estimate_losses(extractor: nn.Module, options: StyleOptions, candidate: ImageHeader,
                    contents: Sequence[ImageHeader], styles: Sequence[ImageHeader],
                    gradient: bool, encoded: int = 0,
                    others: Mapping[str, Sequence[ImageHeader]] | None = None,
                    message: int = 0) -> Estimate:
    """Peak bytes of a ComputeLosses with validated ``options``, for a candidate of this
    header (it fixes the size); ``encoded``: the request's image bytes; ``others`` and
    ``message`` as in :func:`estimate_stylize`."""
    inputs = {"candidate": [candidate], "content": list(contents), "style": list(styles),
              **(others or {})}
    images, decoding = _held(inputs, encoded, message)
    return footprint.peak({"decode": {"images": images + decoding},
                           **footprint.losses_phases(extractor, options, inputs, images,
                                                     gradient)})


__all__ = ["MARGIN", "OVERHEAD", "Estimate", "estimate_losses", "estimate_stylize",
           "tile_sides"]
