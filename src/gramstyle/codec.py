"""The one translation between the Python types and the wire messages (gramstyle.v1).

Both sides use it: the client builds requests and reads answers with it, the server reads
requests and builds answers with it. Nothing else names a message field.

- Options travel in the request field of the same name (see :mod:`gramstyle.options`);
  the conversion is driven by each option's declared kind, so a new option needs no code
  here. An option the caller did not give is not sent, and the server applies its default.
- Enum values are derived from the proto descriptors: ``Precision.PRECISION_BF16`` is
  ``"bf16"``, ``ImageFormat.IMAGE_FORMAT_JPEG`` is ``"jpeg"``; ``*_UNSPECIFIED`` is the
  option's declared default.
- Image inputs are driven by their declarations (:mod:`gramstyle.inputs`): the request
  builders take each input of their call as the keyword argument of its name, and
  :func:`request_images` / :func:`engine_images` read them back, so a new image input needs
  no code here either.
- Errors are :class:`~gramstyle.errors.FieldError` (a ``ValueError``; ``TypeError`` for an
  unknown keyword) carrying the option or request field name in ``.field``; the message
  starts with it.
- Reading a request is the service's edge: :func:`stylize_options` and
  :func:`losses_options` return validated, frozen options, checked once against the
  server's limits (the engine trusts them and checks only what needs its network).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from PIL import Image

from gramstyle.errors import FieldError
from gramstyle.images import FORMATS, ImageSource, encode_image, read_image_bytes
from gramstyle.inputs import ImageInput, input_named, inputs_of, skipped
from gramstyle.options import (
    MAX_ITERATIONS,
    MAX_SIZE,
    TILE_CHOICES,
    OptionSpec,
    StyleOptions,
    enum_choices,
    enum_prefix,
    split_list,
)
from gramstyle.results import (
    Losses,
    LossReport,
    ModelInfo,
    Progress,
    ServerInfo,
    StylizeResult,
)
from gramstyle.v1 import gramstyle_pb2 as pb

#: Longest side of a progress preview, pixels: a PNG of it is at most ~3.2 MB, inside
#: gRPC's common default message limit of 4 MiB.
PREVIEW_MAX_SIDE = 1024
#: Default largest piece of a Stylize result image per stream message, bytes: a result
#: image larger than this arrives as ResultChunk messages (:func:`result_messages`).
RESULT_CHUNK_BYTES = 2**20

_SPECS: dict[str, OptionSpec] = {name: spec for name, spec, _ in StyleOptions.specs()}
_DEFAULTS: dict[str, Any] = {name: default for name, _, default in StyleOptions.specs()}
#: The options each request takes.
STYLIZE_OPTIONS = tuple(_SPECS)
LOSS_OPTIONS = tuple(name for name, _, _ in StyleOptions.specs("losses"))
#: The blend-weights option of each weighted image input ("content": content_blend_weights).
_BLEND_WEIGHTS = {spec.of: name for name, spec in _SPECS.items() if spec.kind == "blend_weights"}
#: The RPC each request message is the input of ("gramstyle.v1.StylizeRequest": "Stylize").
_RPC_OF = {method.input_type.full_name: method.name
           for method in pb.DESCRIPTOR.services_by_name["StyleTransferService"].methods}

# ---------------------------------------------------------------------------- enums


def enum_number(enum: Any, field: str, value: str | int) -> int:
    """The enum number for an option value (a name like 'bf16', or a number as is)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    choices = enum_choices(enum)
    key = str(value).lower()
    if key not in choices:
        raise FieldError(field, f"must be one of {', '.join(choices)}, got {value!r}", value)
    return enum.Value(enum_prefix(enum) + key.upper())


def enum_value(enum: Any, field: str, number: int, default: Any) -> Any:
    """The option value for an enum number; UNSPECIFIED gives ``default``."""
    # proto3 enums are open: an unknown number arrives as a plain int.
    if number not in enum.values():
        known = ", ".join(enum.keys())
        raise FieldError(field, f"unknown value {number}; use one of {known}", number)
    name = enum.Name(number)
    if name.endswith("_UNSPECIFIED"):
        return default
    return name.removeprefix(enum_prefix(enum)).lower()


def format_name(fmt: str, field: str = "output_format") -> str:
    """The canonical image format name ('png', 'jpeg', 'webp') for a name or alias ('jpg')."""
    pillow = FORMATS.get(str(fmt).lower())
    for name in enum_choices(pb.ImageFormat):
        if FORMATS[name] == pillow:
            return name
    raise FieldError(field, f"must be one of {', '.join(FORMATS)}, got {fmt!r}", fmt)


def output_format(number: int) -> str:
    """The format name a request's ``output_format`` asks for (UNSPECIFIED: png)."""
    return enum_value(pb.ImageFormat, "output_format", number, "png")


# ---------------------------------------------------------------------------- options -> wire

def _int(name: str, value: Any) -> int:
    # A proto int field raises a bare TypeError/ValueError for 2.5 or 2**40; name the option.
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"must be an integer, got {value!r}", value)
    limit = 2**63 if name == "seed" else 2**31
    if not -limit <= value < limit:
        raise FieldError(name, f"out of range, got {value}", value)
    return value


def _as_list(sources: Sequence[ImageSource] | ImageSource | None) -> list[ImageSource]:
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, bytearray, memoryview, Image.Image)) or hasattr(
            sources, "__fspath__"):
        return [sources]
    return list(sources)


def _check_pairs(entry: ImageInput, given: int, counts: Mapping[str, int]) -> None:
    """A paired input (one image per image of another) has as many entries as that one has
    images (a skipped entry of a skippable input counts: it stands for one image)."""
    if entry.paired_with and given and given != counts[entry.paired_with]:
        skip = (f"; an empty entry stands for a {entry.paired_with} image without one"
                if entry.skippable else "")
        raise FieldError(entry.name, f"expected {counts[entry.paired_with]} image(s), one "
                         f"per {entry.paired_with} image, got {given}{skip}", given)


def _encode_images(message: Any, sources: Mapping[str, Any], values: Mapping[str, Any]
                   ) -> None:
    """Write the image inputs of ``message``'s call (by declaration) into it: the encoded
    bytes of each source (a path, bytes or a PIL image), with its blend weight if any."""
    rpc = _RPC_OF[message.DESCRIPTOR.full_name]
    given = {entry.name: _as_list(sources.get(entry.name)) for entry in inputs_of(rpc)}
    counts = {name: len(items) for name, items in given.items()}
    for entry in inputs_of(rpc):
        items = given[entry.name]
        if entry.required and not items:
            items = [sources.get(entry.name)]  # read_image_bytes names what is missing
        _check_pairs(entry, len(items), counts)
        weights_name = _BLEND_WEIGHTS.get(entry.name)
        weights = values.get(weights_name) if weights_name else None
        if weights is not None and len(weights) != len(items):
            # The server would say the same; saying it here saves uploading the images.
            raise FieldError(weights_name, f"expected {len(items)} value(s), one per image, "
                             f"got {len(weights)}: {list(weights)}", weights)
        data = [b"" if skipped(entry, s) else read_image_bytes(s, entry.error_field(i))
                for i, s in enumerate(items)]
        field = getattr(message, entry.field)
        if entry.part is not None:  # WeightedImage messages
            for i, encoded in enumerate(data):
                weight = {} if weights is None else {"weight": float(weights[i])}
                field.add(**{entry.part: encoded}, **weight)
        elif entry.repeated:
            field.extend(data)
        elif data:
            setattr(message, entry.field, data[0])


def _layer_set(layers: Sequence[str] | Mapping[str, float] | str,
               weights: Sequence[float] | None, weights_name: str) -> pb.LayerSet:
    if isinstance(layers, str):
        layers = split_list(layers)
    if isinstance(layers, Mapping):
        weights, layers = list(layers.values()), list(layers.keys())
    names = [str(name) for name in layers]
    if weights is not None and len(weights) != len(names):
        # The wire format has one weight per layer, so the mismatch is reported here.
        raise FieldError(weights_name, f"expected {len(names)} value(s), one per layer, "
                         f"got {len(weights)}: {list(weights)}", weights)
    return pb.LayerSet(layers=[
        pb.WeightedLayer(name=name, weight=None if weights is None else float(weights[i]))
        for i, name in enumerate(names)])


def option_values(options: Any, overrides: Mapping[str, Any], names: Sequence[str]
                  ) -> dict[str, Any]:
    """The options to send: the fields of ``options`` (a StyleOptions or any object with its
    attributes) overridden by keyword arguments; None means "not given"."""
    unknown = set(overrides) - set(_SPECS)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(_SPECS)}")
    values = {name: getattr(options, name, None) for name in names} if options is not None \
        else {}
    for name, value in overrides.items():
        if value is not None:
            if name not in names:
                raise TypeError(f"{name}: not an option of this call")
            values[name] = value
    return {k: v for k, v in values.items() if v is not None}


def _encode_options(message: Any, values: Mapping[str, Any]) -> None:
    """Write option values into a request, by each option's declared kind."""
    for name, spec in _SPECS.items():
        if spec.kind in ("blend_weights", "layer_weights"):
            continue  # travel inside the WeightedImage / LayerSet messages they weigh
        if spec.kind == "layers":
            weights_name = next(n for n, s in _SPECS.items() if s.of == name)
            if name in values or weights_name in values:
                layers = values.get(name, _DEFAULTS[name])
                getattr(message, name).CopyFrom(
                    _layer_set(layers, values.get(weights_name), weights_name))
            continue
        if name not in values:
            continue
        value = values[name]
        if spec.kind == "tile":  # unset: auto; 0: off; N: pixels (the proto's comment)
            if isinstance(value, str) and value not in TILE_CHOICES:
                raise FieldError(name, f"must be auto, off or an integer (pixels), got "
                                 f"{value!r}", value)
            if value != "auto":
                setattr(message, name, 0 if value == "off" else _int(name, value))
            continue
        if spec.kind == "choice":
            value = enum_number(spec.enum, name, value)
        elif spec.kind == "int":
            value = _int(name, value)
        elif spec.kind == "float":
            value = float(value)
        else:
            value = bool(value)
        setattr(message, name, value)


def _split_images(rpc: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the image inputs of ``rpc`` out of keyword arguments (the rest are options)."""
    return {entry.name: kwargs.pop(entry.name) for entry in inputs_of(rpc)
            if entry.name in kwargs}


def stylize_request(content: Any, style: Any = (), *, options: Any = None,
                    preview: bool = False, output_format: str = "png", arch: str = "",
                    weights: str = "", **kwargs: Any) -> pb.StylizeRequest:
    """A StylizeRequest from images (paths, bytes or PIL images) and options.

    ``options`` (a StyleOptions) and keyword overrides give the options; the other image
    inputs of Stylize (:func:`gramstyle.inputs.inputs_of`) are keywords of their names; see
    :meth:`gramstyle.client.Client.stylize_stream` for the rest.
    """
    images = {"content": content, "style": style, **_split_images("Stylize", kwargs)}
    values = option_values(options, kwargs, STYLIZE_OPTIONS)
    request = pb.StylizeRequest(
        preview=preview,
        output_format=enum_number(pb.ImageFormat, "output_format",
                                  format_name(output_format)),
        arch=arch or "", weights=weights or "")
    _encode_options(request, values)
    _encode_images(request, images, values)
    return request


def losses_request(candidate: ImageSource, content: Any = (), style: Any = (), *,
                   options: Any = None, gradient: bool = False, arch: str = "",
                   weights: str = "", **kwargs: Any) -> pb.ComputeLossesRequest:
    """A ComputeLossesRequest (see :meth:`gramstyle.client.Client.compute_losses`)."""
    images = {"candidate": candidate, "content": content, "style": style,
              **_split_images("ComputeLosses", kwargs)}
    values = option_values(options, kwargs, LOSS_OPTIONS)
    request = pb.ComputeLossesRequest(gradient=gradient, arch=arch or "", weights=weights or "")
    _encode_options(request, values)
    _encode_images(request, images, values)
    return request


# ---------------------------------------------------------------------------- wire -> options

def _has(message: Any, name: str) -> bool:
    """Whether a field was sent; fields without presence (plain proto3 scalars) always are."""
    try:
        return message.HasField(name)
    except ValueError:
        return True


def _given_options(request: Any, names: Sequence[str]) -> dict[str, Any]:
    """The options a request gives, by name; an option it leaves unset is absent."""
    given: dict[str, Any] = {}
    for name in names:
        spec = _SPECS[name]
        if spec.kind == "blend_weights":
            images = getattr(request, spec.of)
            if any(image.HasField("weight") for image in images):  # else absent: equal
                given[name] = tuple(image.weight if image.HasField("weight") else 1.0
                                    for image in images)
        elif spec.kind == "layers":
            if request.HasField(name):  # absent: the default layers
                layers = getattr(request, name).layers
                given[name] = tuple(layer.name for layer in layers)
                if any(layer.HasField("weight") for layer in layers):
                    weights_name = next(n for n, s in _SPECS.items() if s.of == name)
                    given[weights_name] = tuple(
                        layer.weight if layer.HasField("weight") else 1.0 for layer in layers)
        elif spec.kind == "choice":
            value = enum_value(spec.enum, name, getattr(request, name), None)
            if value is not None:  # UNSPECIFIED: the default
                given[name] = value
        elif spec.kind == "tile":
            if request.HasField(name):  # absent: auto (the default)
                value = getattr(request, name)
                given[name] = "off" if value == 0 else value
        elif spec.kind != "layer_weights" and _has(request, name):
            given[name] = getattr(request, name)
    return given


def request_images(request: Any) -> dict[str, list[bytes]]:
    """The encoded images of each image input of ``request``'s call, by input name, in
    :data:`gramstyle.inputs.INPUTS` order. A single input is a list of zero or one; a
    required one is always there, empty when missing (and refused as such when probed). A
    skippable input keeps its empty entries (:func:`gramstyle.inputs.skipped`), so that
    they still pair with the images of its pair."""
    images = {}
    for entry in inputs_of(_RPC_OF[request.DESCRIPTOR.full_name]):
        value = getattr(request, entry.field)
        if not entry.repeated:
            images[entry.name] = [value] if value or entry.required else []
        elif entry.part is None:
            images[entry.name] = list(value)
        else:
            images[entry.name] = [getattr(item, entry.part) for item in value]
    return images


def engine_images(request: Any) -> dict[str, list[bytes | None] | bytes | None]:
    """The image inputs of ``request`` as the engine's keyword arguments: a list for a
    repeated input (None for a skipped entry: a style without a mask), the bytes or None
    for a single one."""
    out: dict[str, list[bytes | None] | bytes | None] = {}
    for name, data in request_images(request).items():
        entry = input_named(name)
        if not entry.repeated:
            out[name] = data[0] if data else None
        elif entry.skippable and any(skipped(entry, d) for d in data):
            out[name] = [None if skipped(entry, d) else d for d in data]
        else:
            out[name] = data
    return out


def _check_images(request: Any, given: Mapping[str, Any]) -> None:
    """The checks of the image inputs that need no decoding: paired inputs have one image
    per image of their pair, and an input tied to an option value (``given``: the options the
    request sets) is given only with it."""
    images = request_images(request)
    counts = {name: len(data) for name, data in images.items()}
    for name, data in images.items():
        entry = input_named(name)
        _check_pairs(entry, len(data), counts)
        if entry.only_with and data:
            option, value = entry.only_with
            if given.get(option) not in (None, value):
                enum = _SPECS[option].enum
                raise FieldError(
                    name, f"given, but {option} is {enum.Name(getattr(request, option))}; "
                    f"set {option} to {enum_prefix(enum)}{value.upper()} or leave it "
                    "unspecified")


def stylize_options(request: pb.StylizeRequest, max_size: int = MAX_SIZE,
                    max_iterations: int = MAX_ITERATIONS) -> StyleOptions:
    """The validated options a StylizeRequest asks for, within these limits; an unset
    ``size`` or ``iterations`` takes the most the limits allow up to its default
    (:meth:`StyleOptions.from_given`)."""
    given = _given_options(request, STYLIZE_OPTIONS)
    _check_images(request, given)
    output_format(request.output_format)  # reject an unknown format before any work
    return StyleOptions.from_given(given, max_size, max_iterations)


def losses_options(request: pb.ComputeLossesRequest, size: int | None = None,
                   max_size: int = MAX_SIZE) -> StyleOptions:
    """The validated options a ComputeLossesRequest asks for; ``size``: the candidate's long
    side in px (at least 16), which stands in for the output size (the style images are
    scaled from it); None: the default size (the server always knows the candidate's)."""
    given = _given_options(request, LOSS_OPTIONS)
    _check_images(request, given)
    if size is not None:
        given["size"] = size
    return StyleOptions.from_given(given, max_size, MAX_ITERATIONS)


# ---------------------------------------------------------------------------- results

def _scalar(f: Any) -> bool:
    repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
    return f.message_type is None and not repeated


def _enum_class(f: Any) -> Any:
    """The generated enum wrapper of an enum field (``pb.Precision`` for ``precision``)."""
    return getattr(pb, f.enum_type.name)


def _copy_fields(source: Any, message: Any) -> Any:
    """Set each scalar message field from the attribute of the same name; an enum field
    takes its value's name ('bf16' -> PRECISION_BF16, '' -> UNSPECIFIED)."""
    for f in message.DESCRIPTOR.fields:
        if _scalar(f) and hasattr(source, f.name):
            value = getattr(source, f.name)
            if f.enum_type is not None and isinstance(value, str):
                value = enum_number(_enum_class(f), f.name, value) if value else 0
            setattr(message, f.name, value)
    return message


def _field_values(message: Any, cls: type) -> dict[str, Any]:
    """The scalar message fields that are also fields of dataclass ``cls``; an enum field
    gives its value's name ('bf16'; '' for UNSPECIFIED)."""
    names = {f.name for f in fields(cls)}
    values = {}
    for f in message.DESCRIPTOR.fields:
        if f.name in names and _scalar(f):
            value = getattr(message, f.name)
            if f.enum_type is not None:
                enum = _enum_class(f)
                value = enum_value(enum, f.name, value, "") if value in enum.values() else ""
            values[f.name] = value
    return values


def losses_message(losses: Losses) -> pb.Losses:
    message = _copy_fields(losses, pb.Losses())
    message.content_layers.update(losses.content_layers)
    message.style_layers.update(losses.style_layers)
    return message


def losses_from(message: pb.Losses) -> Losses:
    return Losses(**_field_values(message, Losses), content_layers=dict(message.content_layers),
                  style_layers=dict(message.style_layers))


def image_message(image: Image.Image, fmt: str) -> pb.Image:
    """An encoded Image message (``fmt``: 'png', 'jpeg' or 'webp')."""
    return pb.Image(data=encode_image(image, fmt), width=image.width, height=image.height,
                    format=enum_number(pb.ImageFormat, "output_format", fmt))


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def preview_image(image: Image.Image) -> Image.Image:
    """``image`` downscaled (aspect kept) to at most :data:`PREVIEW_MAX_SIDE` pixels a side;
    a smaller one as it is."""
    if max(image.size) <= PREVIEW_MAX_SIDE:
        return image
    small = image.copy()
    small.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), Image.Resampling.LANCZOS)
    return small


def progress_message(progress: Progress, fmt: str) -> pb.StylizeResponse:
    """A Progress message; its preview (when the progress has an image) downscaled by
    :func:`preview_image`, so that it stays a small message at any output size."""
    message = _copy_fields(progress, pb.Progress(losses=losses_message(progress.losses)))
    if progress.image is not None:
        message.preview.CopyFrom(image_message(preview_image(progress.image), fmt))
    return pb.StylizeResponse(progress=message)


def progress_from(message: pb.Progress) -> Progress:
    return Progress(**_field_values(message, Progress), losses=losses_from(message.losses),
                    image=_decode(message.preview.data) if message.HasField("preview")
                    else None)


def _result_response(result: StylizeResult, fmt: str, data: bytes, image_bytes: int
                     ) -> pb.StylizeResponse:
    stats = _copy_fields(result, pb.Stats(losses=losses_message(result.losses)))
    image = pb.Image(data=data, width=result.image.width, height=result.image.height,
                     format=enum_number(pb.ImageFormat, "output_format", fmt))
    return pb.StylizeResponse(result=pb.Result(image=image, stats=stats,
                                               image_bytes=image_bytes))


def result_message(result: StylizeResult, fmt: str) -> pb.StylizeResponse:
    """The whole result in one message (its image encoded in ``image.data``); see
    :func:`result_messages` for the stream's form."""
    data = encode_image(result.image, fmt)
    return _result_response(result, fmt, data, len(data))


def result_messages(result: StylizeResult, fmt: str,
                    chunk_bytes: int = RESULT_CHUNK_BYTES) -> list[pb.StylizeResponse]:
    """The end of a Stylize stream: one Result holding the image when its encoding is at
    most ``chunk_bytes`` long, else ResultChunk messages of at most ``chunk_bytes`` bytes
    each and then the Result with empty ``image.data`` (and ``image_bytes`` the total).
    :class:`ResultAssembly` reads them back."""
    if chunk_bytes < 1:
        raise FieldError("chunk_bytes", f"must be >= 1, got {chunk_bytes}", chunk_bytes)
    data = encode_image(result.image, fmt)
    if len(data) <= chunk_bytes:
        return [_result_response(result, fmt, data, len(data))]
    chunks = [pb.StylizeResponse(result_chunk=pb.ResultChunk(
        offset=start, data=data[start:start + chunk_bytes]))
        for start in range(0, len(data), chunk_bytes)]
    return [*chunks, _result_response(result, fmt, b"", len(data))]


class ResultAssembly:
    """Reassembles the result of a Stylize stream from :func:`result_messages`' form.

    Feed it the stream's ResultChunk messages (:meth:`add`) and then its Result
    (:meth:`complete`), which returns the Result with the whole image in ``image.data``.
    A broken stream -- a chunk whose offset is not the number of bytes received so far, a
    total that is not ``image_bytes``, image data both chunked and inline -- raises
    :class:`~gramstyle.errors.FieldError` (a ValueError) naming ``result_chunk`` or
    ``result``: never a silently truncated image. Use a new one for each attempt of a call.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self.chunks = 0

    def add(self, chunk: pb.ResultChunk) -> None:
        """Append one chunk (in stream order)."""
        if chunk.offset != len(self._data):
            raise FieldError("result_chunk", f"chunk {self.chunks + 1} starts at byte "
                             f"{chunk.offset}, but {len(self._data)} bytes of the image "
                             f"came before it: the result stream is broken", chunk.offset)
        self._data += chunk.data
        self.chunks += 1

    def complete(self, result: pb.Result) -> pb.Result:
        """``result`` with the image's bytes in ``image.data`` (the chunks', or its own)."""
        if not self.chunks:
            data = result.image.data
            if result.image_bytes and result.image_bytes != len(data):
                raise FieldError("result", f"the result image holds {len(data)} bytes, but "
                                 f"image_bytes says {result.image_bytes}: the result stream "
                                 f"is broken", result.image_bytes)
            return result
        if result.image.data:
            raise FieldError("result", f"the result image came both in {self.chunks} chunks "
                             f"and inline ({len(result.image.data)} bytes): the result "
                             f"stream is broken")
        if result.image_bytes != len(self._data):
            raise FieldError("result", f"the result image came in {self.chunks} chunks of "
                             f"{len(self._data)} bytes together, but image_bytes says "
                             f"{result.image_bytes}: the result stream is broken",
                             result.image_bytes)
        whole = pb.Result()
        whole.CopyFrom(result)
        whole.image.data = bytes(self._data)
        return whole


def result_from(message: pb.Result) -> StylizeResult:
    stats = message.stats
    return StylizeResult(image=_decode(message.image.data), **_field_values(stats, StylizeResult),
                         losses=losses_from(stats.losses), data=message.image.data,
                         format=output_format(message.image.format))


def loss_report_message(report: LossReport) -> pb.ComputeLossesResponse:
    message = _copy_fields(report, pb.ComputeLossesResponse(losses=losses_message(report.losses)))
    if report.gradient_bytes is not None:
        message.gradient.CopyFrom(pb.Tensor(shape=list(report.gradient_shape),
                                            data=report.gradient_bytes))
    return message


def loss_report_from(message: pb.ComputeLossesResponse) -> LossReport:
    has_gradient = message.HasField("gradient")
    return LossReport(**_field_values(message, LossReport), losses=losses_from(message.losses),
                      gradient_shape=tuple(message.gradient.shape) if has_gradient else None,
                      gradient_bytes=message.gradient.data if has_gradient else None)


def server_info_message(info: ServerInfo) -> pb.GetServerInfoResponse:
    message = _copy_fields(info, pb.GetServerInfoResponse(limits=pb.Limits(**info.limits)))
    for model in info.models:
        message.models.append(_copy_fields(model, pb.ModelInfo(layer_names=model.layer_names)))
    return message


def server_info_from(message: pb.GetServerInfoResponse) -> ServerInfo:
    return ServerInfo(**_field_values(message, ServerInfo),
                      limits={f.name: getattr(message.limits, f.name)
                              for f in message.limits.DESCRIPTOR.fields},
                      models=[ModelInfo(**_field_values(m, ModelInfo),
                                        layer_names=list(m.layer_names)) for m in message.models])


__all__ = [
    "LOSS_OPTIONS", "PREVIEW_MAX_SIDE", "RESULT_CHUNK_BYTES", "STYLIZE_OPTIONS",
    "ResultAssembly", "engine_images", "enum_number", "enum_value",
    "format_name", "image_message", "loss_report_from", "loss_report_message",
    "losses_from", "losses_message", "losses_options", "losses_request", "option_values",
    "output_format", "preview_image", "progress_from", "progress_message", "request_images",
    "result_from", "result_message", "result_messages",
    "server_info_from", "server_info_message", "stylize_options", "stylize_request",
]
