"""Translation between the wire messages (gramstyle.v1) and the engine's Python types.

Only shape-level checks live here (enum values, an ``init_image`` without INIT_IMAGE); value
checks are :meth:`StyleOptions.validated`'s and the engine's, so every entry point (CLI,
library, gRPC) rejects bad values with the same message. Errors are ``ValueError`` whose
message starts with the request field name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gramstyle.server.engine import Losses
from gramstyle.server.options import StyleOptions
from gramstyle.v1 import gramstyle_pb2 as pb

INITS = {pb.INIT_UNSPECIFIED: None, pb.INIT_CONTENT: "content", pb.INIT_NOISE: "noise",
         pb.INIT_STYLE: "style", pb.INIT_IMAGE: "image"}
OPTIMIZERS = {pb.OPTIMIZER_UNSPECIFIED: "lbfgs", pb.OPTIMIZER_LBFGS: "lbfgs",
              pb.OPTIMIZER_ADAM: "adam"}
PRECISIONS = {pb.PRECISION_UNSPECIFIED: "fp32", pb.PRECISION_FP32: "fp32",
              pb.PRECISION_BF16: "bf16"}
#: ImageFormat -> the name gramstyle.images.encode_image takes.
FORMATS = {pb.IMAGE_FORMAT_UNSPECIFIED: "png", pb.IMAGE_FORMAT_PNG: "png",
           pb.IMAGE_FORMAT_JPEG: "jpeg", pb.IMAGE_FORMAT_WEBP: "webp"}
FORMAT_ENUMS = {"png": pb.IMAGE_FORMAT_PNG, "jpeg": pb.IMAGE_FORMAT_JPEG,
                "webp": pb.IMAGE_FORMAT_WEBP}


def _enum(field: str, value: int, table: dict[int, str | None], enum_type) -> str | None:
    # proto3 enums are open: an unknown number arrives as a plain int.
    if value not in table:
        known = ", ".join(enum_type.Name(v) for v in table)
        raise ValueError(f"{field}: unknown value {value}; use one of {known}")
    return table[value]


def output_format(value: int) -> str:
    """The encoder name for an ``ImageFormat``."""
    return _enum("output_format", value, FORMATS, pb.ImageFormat)  # type: ignore[return-value]


def _layers(message, field: str, default: Sequence[str]
            ) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """(names, weights) from an optional LayerSet; weights None means equal."""
    if not message.HasField(field):
        return tuple(default), None
    layers = getattr(message, field).layers
    names = tuple(layer.name for layer in layers)
    if not any(layer.HasField("weight") for layer in layers):
        return names, None
    return names, tuple(layer.weight if layer.HasField("weight") else 1.0 for layer in layers)


def blend_weights(images: Sequence[pb.WeightedImage]) -> tuple[float, ...] | None:
    """Per-image weights; None (equal) when no image sets one, unset ones count as 1."""
    if not any(image.HasField("weight") for image in images):
        return None
    return tuple(image.weight if image.HasField("weight") else 1.0 for image in images)


def _loss_options(request, options: StyleOptions) -> StyleOptions:
    """Fill the fields StylizeRequest and ComputeLossesRequest share."""
    options.content_layers, options.content_layer_weights = _layers(
        request, "content_layers", options.content_layers)
    options.style_layers, options.style_layer_weights = _layers(
        request, "style_layers", options.style_layers)
    options.content_blend_weights = blend_weights(request.content)
    options.style_blend_weights = blend_weights(request.style)
    for name in ("content_weight", "style_weight", "tv_weight", "style_scale"):
        if request.HasField(name):
            setattr(options, name, getattr(request, name))
    options.precision = _enum("precision", request.precision, PRECISIONS, pb.Precision)
    return options


def stylize_options(request: pb.StylizeRequest) -> StyleOptions:
    """The engine options a StylizeRequest asks for (not yet validated)."""
    options = _loss_options(request, StyleOptions())
    init = _enum("init", request.init, INITS, pb.Init)  # None: the engine's default
    if init is not None and request.init_image and init != "image":
        raise ValueError(f"init_image: given, but init is {pb.Init.Name(request.init)}; set "
                         "init to INIT_IMAGE or leave it unspecified")
    options.init = init
    options.optimizer = _enum("optimizer", request.optimizer, OPTIMIZERS, pb.Optimizer)
    for name in ("iterations", "learning_rate", "seed", "size", "progress_every", "scales"):
        if request.HasField(name):
            setattr(options, name, getattr(request, name))
    options.preserve_colors = request.preserve_colors
    output_format(request.output_format)  # reject an unknown format before any work
    return options


def losses_options(request: pb.ComputeLossesRequest) -> StyleOptions:
    """The engine options a ComputeLossesRequest asks for (not yet validated)."""
    return _loss_options(request, StyleOptions())


def losses_message(losses: Losses) -> pb.Losses:
    return pb.Losses(total=losses.total, content=losses.content, style=losses.style,
                     tv=losses.tv, content_layers=losses.content_layers,
                     style_layers=losses.style_layers)


def tensor_message(array: np.ndarray) -> pb.Tensor:
    """A float32 little-endian row-major Tensor message."""
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(array.shape), data=array.tobytes())
