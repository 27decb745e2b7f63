"""Build request messages from Python arguments (shared by the sync and async clients).

Option names are the engine's ``StyleOptions`` field names, so the same keyword arguments
work for ``StyleTransfer.stylize`` in-process and ``Client.stylize`` over the network. An
option left at ``None`` is not sent, and the server applies its default. A ``StyleOptions``
instance (or any object with those attributes) may be passed as ``options=``; explicit
keyword arguments override its fields.

Images are sent as encoded bytes: a path is read as is, bytes pass through, a PIL image is
encoded as PNG. Decoding and validation happen on the server (gramstyle.images.load_image),
which answers INVALID_ARGUMENT naming the field (``content[1]: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from gramstyle.images import ImageError, ImageSource, encode_image
from gramstyle.v1 import gramstyle_pb2 as pb

#: StyleOptions field names accepted as keyword arguments.
OPTION_NAMES = (
    "content_layers", "content_layer_weights", "style_layers", "style_layer_weights",
    "content_blend_weights", "style_blend_weights", "content_weight", "style_weight",
    "tv_weight", "init", "optimizer", "iterations", "learning_rate", "seed", "size",
    "style_scale", "preserve_colors", "precision", "progress_every", "scales",
)
LOSS_OPTION_NAMES = (
    "content_layers", "content_layer_weights", "style_layers", "style_layer_weights",
    "content_blend_weights", "style_blend_weights", "content_weight", "style_weight",
    "tv_weight", "style_scale", "precision",
)

_INITS = {"content": pb.INIT_CONTENT, "noise": pb.INIT_NOISE, "style": pb.INIT_STYLE,
          "image": pb.INIT_IMAGE}
_OPTIMIZERS = {"lbfgs": pb.OPTIMIZER_LBFGS, "adam": pb.OPTIMIZER_ADAM}
_PRECISIONS = {"fp32": pb.PRECISION_FP32, "bf16": pb.PRECISION_BF16}
_FORMATS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG,
            "jpg": pb.IMAGE_FORMAT_JPEG, "webp": pb.IMAGE_FORMAT_WEBP}


def image_bytes(source: ImageSource, field: str) -> bytes:
    """Encoded bytes for a path, bytes or PIL image. Raises ImageError naming ``field``."""
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


def _as_list(sources: Sequence[ImageSource] | ImageSource | None) -> list[ImageSource]:
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, bytearray, memoryview, Image.Image, os.PathLike)):
        return [sources]
    return list(sources)


def _images(sources, weights: Sequence[float] | None, field: str) -> list[pb.WeightedImage]:
    sources = _as_list(sources)
    if weights is not None and len(weights) != len(sources):
        # The server would say the same; saying it here saves uploading the images.
        raise ValueError(f"{field}_blend_weights: expected {len(sources)} value(s), one per "
                         f"image, got {len(weights)}: {list(weights)}")
    return [pb.WeightedImage(data=image_bytes(s, f"{field}[{i}]"),
                             weight=None if weights is None else float(weights[i]))
            for i, s in enumerate(sources)]


def _layer_set(layers: Sequence[str] | Mapping[str, float], weights: Sequence[float] | None,
               field: str) -> pb.LayerSet:
    if isinstance(layers, str):
        layers = [layers]
    if isinstance(layers, Mapping):
        weights, layers = list(layers.values()), list(layers.keys())
    names = [str(name) for name in layers]
    if weights is not None and len(weights) != len(names):
        # The wire format has one weight per layer, so the mismatch is reported here.
        raise ValueError(f"{field[:-1]}_weights: expected {len(names)} value(s), one per layer, "
                         f"got {len(weights)}: {list(weights)}")
    return pb.LayerSet(layers=[
        pb.WeightedLayer(name=name, weight=None if weights is None else float(weights[i]))
        for i, name in enumerate(names)])


def _enum(name: str, value: str | int, table: Mapping[str, int]) -> int:
    if isinstance(value, int):
        return value
    key = str(value).lower()
    if key not in table:
        raise ValueError(f"{name}: must be one of {', '.join(table)}, got {value!r}")
    return table[key]


def merge_options(options: Any, overrides: Mapping[str, Any], names: Sequence[str]
                  ) -> dict[str, Any]:
    """Option values from an options object plus keyword overrides (None: not given)."""
    unknown = set(overrides) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(OPTION_NAMES)}")
    values = {name: getattr(options, name, None) for name in names} if options is not None \
        else {}
    for name, value in overrides.items():
        if value is not None:
            if name not in names:
                raise TypeError(f"{name}: not an option of this call")
            values[name] = value
    return {k: v for k, v in values.items() if v is not None}


def _fill_loss_fields(request, values: Mapping[str, Any]) -> None:
    for field in ("content_layers", "style_layers"):
        if field in values:
            getattr(request, field).CopyFrom(
                _layer_set(values[field], values.get(f"{field[:-1]}_weights"), field))
    for name in ("content_weight", "style_weight", "tv_weight", "style_scale"):
        if name in values:
            setattr(request, name, float(values[name]))
    if "precision" in values:
        request.precision = _enum("precision", values["precision"], _PRECISIONS)


def stylize_request(content, style, *, options: Any = None, init_image: ImageSource | None = None,
                    preview: bool = False, output_format: str = "png", arch: str = "",
                    weights: str = "", **overrides: Any) -> pb.StylizeRequest:
    """A StylizeRequest; see :meth:`gramstyle.client.Client.stylize` for the arguments."""
    values = merge_options(options, overrides, OPTION_NAMES)
    request = pb.StylizeRequest(
        content=_images(content, values.get("content_blend_weights"), "content"),
        style=_images(style, values.get("style_blend_weights"), "style"),
        preview=preview, output_format=_enum("output_format", output_format, _FORMATS),
        arch=arch or "", weights=weights or "")
    _fill_loss_fields(request, values)
    if init_image is not None:
        request.init_image = image_bytes(init_image, "init_image")
    if "init" in values:
        request.init = _enum("init", values["init"], _INITS)
    if "optimizer" in values:
        request.optimizer = _enum("optimizer", values["optimizer"], _OPTIMIZERS)
    for name in ("iterations", "seed", "size", "progress_every", "scales"):
        if name in values:
            setattr(request, name, _int(name, values[name]))
    if "learning_rate" in values:
        request.learning_rate = float(values["learning_rate"])
    request.preserve_colors = bool(values.get("preserve_colors", False))
    return request


def losses_request(candidate: ImageSource, content, style, *, options: Any = None,
                   gradient: bool = False, arch: str = "", weights: str = "",
                   **overrides: Any) -> pb.ComputeLossesRequest:
    """A ComputeLossesRequest; see :meth:`gramstyle.client.Client.compute_losses`."""
    values = merge_options(options, overrides, LOSS_OPTION_NAMES)
    request = pb.ComputeLossesRequest(
        candidate=image_bytes(candidate, "candidate"),
        content=_images(content, values.get("content_blend_weights"), "content"),
        style=_images(style, values.get("style_blend_weights"), "style"),
        gradient=gradient, arch=arch or "", weights=weights or "")
    _fill_loss_fields(request, values)
    return request


def _int(name: str, value: Any) -> int:
    # A proto int32 field raises a bare TypeError/ValueError for 2.5 or 2**40; name the option.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    limit = 2**63 if name == "seed" else 2**31
    if not -limit <= value < limit:
        raise ValueError(f"{name}: out of range, got {value}")
    return value
