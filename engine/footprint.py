"""The model-dependent part of a run's peak-memory estimate, from sizes and options alone.

Both the in-process engine (``tile`` "auto": tile when the untiled run would not fit the
memory available, :func:`choose_tile`) and the service (admission,
:mod:`gramstyle.server.memory`, which adds what only a server holds: the request message,
the encoded images and their metadata) size a run with this model. In bytes, for images of
P pixels (RGB float32 tensors are 12 bytes per pixel; a feature map of C channels is
C * P * element size, 4 bytes for fp32 and 2 for bf16):

- **targets**: the resized copies of the inputs as float tensors (kept), as each input's
  declaration says (:data:`gramstyle.inputs.MEMORY`: the content images at the output
  size, the style images at their style size), the resize and conversion transients of one
  image, the content feature maps at the content layers (kept, plus their blend), and one
  no-grad network pass (:func:`_forward_peak`);
- **activations**: the optimised image's forward pass with autograd: every ReLU and pooling
  output up to the deepest loss layer is kept for the backward pass (and a convolution
  output a loss reads; max-pool indices are int64), the losses' copies of the feature maps
  they read, and the backward pass's gradient buffers;
- **optimiser** (:func:`optimiser_bytes`): L-BFGS keeps
  :func:`gramstyle.engine.optimise.lbfgs_history` curvature pairs, each two copies of the
  image (12 bytes per pixel each), plus a few working copies; Adam two moments;
- **tiles** (``tile`` a side in pixels, :mod:`gramstyle.engine.tiles`): every network pass is
  sized for the largest tile (interior plus halo; pass 1 of the tiled objective for its
  larger tile, :func:`gramstyle.engine.tiles.first_pass_tile`) instead of the image, and
  the tiled objective adds three image-sized float32 vectors (its gradient); the
  image-sized parts (images, content targets at the output size, the optimiser's history)
  stay as they are, and the masks at the style layers' resolutions are counted with the
  targets (each region mask's maps twice: the loss's and the tiled objective's normalised
  copy);
- **output**: the output image (and for ComputeLosses the float32 gradient and copies).

These do not all peak at once: the estimate is the costliest *phase* -- building one
scale's targets (images and targets, with the coarser scale's targets still held),
optimising one scale (images, the kept targets, activations, optimiser, output) -- times
``MARGIN``, plus a fixed ``OVERHEAD`` for the allocator, oneDNN's scratch buffers and
thread stacks (:func:`peak`). ``tests/server/test_hardening.py`` and
``tests/engine/test_footprint.py`` check the estimate against the measured peak RSS of real
runs (it must never be below it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from gramstyle.engine.optimise import lbfgs_history
from gramstyle.engine.tiles import first_pass_tile, receptive_field
from gramstyle.images import ImageHeader
from gramstyle.inputs import input_named, output_size, resized_size
from gramstyle.options import MIN_TILE, StyleOptions, schedule, tile_pixels
from gramstyle.sizes import format_size

#: Fixed cost of any request (allocator arenas, oneDNN scratch, stacks), bytes.
OVERHEAD = 64 * 2**20
#: Multiplier on the modelled bytes (fragmentation, reorder buffers of the convolutions).
MARGIN = 1.25

_RGB_TENSOR = 12  # float32 [1, 3, H, W], bytes per pixel
_PIL_RGB = 4  # Pillow stores RGB as 32 bits per pixel
@dataclass
class Estimate:
    """A request's estimated peak memory, in bytes, and its parts (see the module doc)."""

    total: int
    parts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """'about 1.20 GiB (activations 800 MiB, optimiser 300 MiB, ...)', largest first."""
        parts = sorted(self.parts.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{name} {format_size(n)}" for name, n in parts if n >= 2**20)
        return f"about {format_size(self.total)}" + (f" ({shown})" if shown else "")

    @property
    def largest(self) -> str:
        return max(self.parts, key=self.parts.get) if self.parts else ""


@dataclass(frozen=True)
class _Layer:
    name: str
    kind: str  # conv, relu, pool
    channels: int
    #: Spatial divisor of this layer's output: 2 ** (pools up to and including it).
    stride: int


def _layers(extractor: nn.Module) -> list[_Layer]:
    """The network as (name, kind, output channels, stride) rows."""
    rows, channels, stride = [], 3, 1
    for name, module in zip(extractor.layer_names, extractor.layers, strict=True):
        if isinstance(module, nn.Conv2d):
            channels, kind = module.out_channels, "conv"
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            stride, kind = stride * 2, "pool"
        else:
            kind = "relu"
        rows.append(_Layer(name, kind, channels, stride))
    return rows


def _elements(layer: _Layer, width: int, height: int) -> int:
    return layer.channels * max(1, width // layer.stride) * max(1, height // layer.stride)


def _upto(extractor: nn.Module, layers: Sequence[str]) -> tuple[list[_Layer], set[str]]:
    """The layers a pass to the deepest of ``layers`` runs, and the wanted names."""
    rows = _layers(extractor)
    wanted = {extractor.resolve(n) for n in layers}
    if not wanted:
        return [], wanted
    deepest = max(i for i, row in enumerate(rows) if row.name in wanted)
    return rows[: deepest + 1], wanted


def _forward_peak(extractor: nn.Module, layers: Sequence[str], width: int, height: int,
                  element: int) -> int:
    """Peak bytes of one no-grad pass: the normalised input, each layer's input and output
    (twice for a convolution: oneDNN may reorder both), and the outputs captured so far."""
    rows, wanted = _upto(extractor, layers)
    pixels = width * height
    peak, held, previous = 0, 0, 2 * _RGB_TENSOR * pixels
    for row in rows:
        out = _elements(row, width, height) * element
        factor = 2 if row.kind == "conv" else 1
        peak = max(peak, held + factor * (previous + out))
        if row.name in wanted:
            held += out
        previous = out
    return peak + 2 * _RGB_TENSOR * pixels


def _captured(extractor: nn.Module, layers: Sequence[str], width: int, height: int,
              element: int) -> int:
    """Bytes of the feature maps of ``layers`` at ``element`` bytes per value."""
    rows, wanted = _upto(extractor, layers)
    return sum(_elements(r, width, height) * element for r in rows if r.name in wanted)


def _gram_factor(element: int) -> int:
    """Transient bytes of a style target's Gram per byte of its feature map: a float32 copy;
    under bf16 autocast the Gram's matmul path takes about nine times the bf16 map
    (measured; see tests/server/test_hardening.py)."""
    return 10 if element == 2 else 2


def _backprop(extractor: nn.Module, options: StyleOptions, content: bool, style: bool,
              width: int, height: int, element: int) -> int:
    """Bytes of a forward pass with autograd plus its backward pass: what autograd keeps
    (every ReLU and pooling output, int64 max-pool indices, a convolution output when a loss
    reads it), the content losses' float32 differences, the style losses' Gram transients,
    and the backward pass's gradient buffers for the largest layer (three, for the
    convolutions' reorders)."""
    content_layers = list(options.content_layers) if content else []
    style_layers = list(options.style_layers) if style else []
    rows, wanted = _upto(extractor, content_layers + style_layers)
    kept = largest = 0
    for row in rows:
        out = _elements(row, width, height)
        if row.kind != "conv" or row.name in wanted:
            kept += out * element
        if row.kind == "pool":
            kept += out * 8
        largest = max(largest, out * 4)
    losses = 2 * _captured(extractor, content_layers, width, height, 4)
    if style_layers:
        losses += max(_captured(extractor, [n], width, height, element)
                      for n in style_layers) * _gram_factor(element) // 2
    return kept + losses + 3 * largest + 4 * _RGB_TENSOR * width * height


def _tile_input(extractor: nn.Module, layers: Sequence[str], tile: int, width: int,
                height: int) -> tuple[int, int]:
    """The largest input (width, height) of a tile of ``tile`` px for an image of width x
    height (:func:`gramstyle.engine.tiles.plan`): an interior of at most 1.5 tiles (rounded
    to the stride) plus the halo on each side, clipped to the image."""
    field = receptive_field(extractor, layers)
    side = max(field.stride, tile // field.stride * field.stride)
    return tuple(min(n, side * 3 // 2 + field.stride + 2 * field.halo) for n in (width, height))


def tile_sides(extractor: nn.Module, options: StyleOptions, content: bool, style: bool,
               long_side: int) -> list[int]:
    """The tile sides ``tile`` "auto" chooses from (px), smallest first: the multiples of
    the loss layers' total stride S from :data:`~gramstyle.options.MIN_TILE` (rounded up to
    S) up to the first one reaching ``long_side`` (a larger tile is the same single tile)."""
    layers = [*(options.content_layers if content else ()),
              *(options.style_layers if style else ())]
    stride = receptive_field(extractor, layers).stride if layers else 1
    first = -(-MIN_TILE // stride) * stride
    return list(range(first, max(first, long_side) + stride, stride))


def _tiled_network(extractor: nn.Module, options: StyleOptions, content: bool, style: bool,
                   width: int, height: int, element: int, gradient: bool) -> int:
    """Bytes of the tiled objective (``options.tile``): the larger of pass 1 (a no-grad
    pass over one of its tiles) and pass 2 (one tile's forward with autograd and backward), plus the
    image-sized float32 vectors it keeps: the gradient being summed, the one autograd is
    handed, and its product with the upstream gradient (12 bytes per pixel each)."""
    layers = [*(options.content_layers if content else ()),
              *(options.style_layers if style else ())]
    tile = tile_pixels(options.tile)
    # Pass 1 runs on larger tiles than pass 2 (first_pass_tile) when a gradient is wanted.
    first = first_pass_tile(tile, options.precision) if gradient else tile
    network = _forward_peak(extractor, layers, *_tile_input(extractor, layers, first, width,
                                                            height), element)
    if gradient:
        w, h = _tile_input(extractor, layers, tile, width, height)
        network = max(network, _backprop(extractor, options, content, style, w, h, element))
    return network + (3 * _RGB_TENSOR * width * height if gradient else 0)


def _resize_bytes(src: ImageHeader, width: int, height: int) -> int:
    """Transient bytes of resizing ``src`` to width x height and making it a tensor:
    Pillow's intermediate pass, the resized image, uint8 and two float copies."""
    return (_PIL_RGB * width * max(src.height, height) + (_PIL_RGB + 3 + 2 * _RGB_TENSOR)
            * width * height)


def resized_inputs(images: Mapping[str, Sequence[ImageHeader]], width: int, height: int,
                    style_scale: float) -> tuple[int, list[int]]:
    """The bytes of the inputs' resized copies for a width x height output (kept for the
    run; which inputs are resized, and to what size, is declared in gramstyle.inputs), and
    the transient of making each."""
    kept, transients = 0, []
    for name, headers in images.items():
        entry = input_named(name)
        for header in headers:
            size = resized_size(entry, header, (width, height), style_scale)
            if size is not None:
                kept += 4 * entry.channels * size[0] * size[1]  # float32 per channel
                transients.append(_resize_bytes(header, *size))
    return kept, transients


def _pass_size(extractor: nn.Module, options: StyleOptions, layers: Sequence[str],
               width: int, height: int) -> tuple[int, int]:
    """The input size of one network pass over a width x height image: the image, or with
    ``options.tile`` set to a side its largest tile."""
    if not tile_pixels(options.tile):
        return width, height
    return _tile_input(extractor, layers, tile_pixels(options.tile), width, height)


def _targets(extractor: nn.Module, options: StyleOptions,
             images: Mapping[str, Sequence[ImageHeader]], width: int, height: int,
             element: int) -> tuple[int, int]:
    """(kept, transient) bytes of one objective at output size width x height: the tensors
    and target feature maps it keeps, and the largest transient of building it (one image's
    resize and network pass)."""
    contents, styles = images["content"], images["style"]
    content_layers = list(options.content_layers) if contents else []
    style_layers = list(options.style_layers) if styles else []
    style_sizes = [resized_size(input_named("style"), s, (width, height), options.style_scale)
                   for s in styles]
    kept, transients = resized_inputs(images, width, height, options.style_scale)
    if tile_pixels(options.tile) and style_layers:
        kept += _tiled_masks(extractor, options, images, width, height)
    transients.append(0)
    if content_layers:
        features = _captured(extractor, content_layers, width, height, element)
        # Every content image's feature maps, then their float32 blend (kept as the target).
        kept += features * len(contents) + 2 * _captured(extractor, content_layers, width,
                                                         height, 4)
        transients.append(_forward_peak(extractor, content_layers, *_pass_size(
            extractor, options, content_layers, width, height), element))
    for w, h in style_sizes if style_layers else ():
        # The pass, then one Gram at a time while every captured map is still held.
        pw, ph = _pass_size(extractor, options, style_layers, w, h)
        largest = max(_captured(extractor, [n], pw, ph, element) for n in style_layers)
        transients.append(max(_forward_peak(extractor, style_layers, pw, ph, element),
                              _captured(extractor, style_layers, pw, ph, element)
                              + largest * _gram_factor(element)))
    return kept, max(transients)


def _mask_maps(extractor: nn.Module, layers: Sequence[str], width: int, height: int) -> int:
    """Bytes of one mask at the resolution of each of ``layers`` for a width x height image
    (float32 [1, N_l] each, :func:`gramstyle.engine.masks.layer_weights`)."""
    rows, wanted = _upto(extractor, layers)
    return sum(4 * max(1, width // r.stride) * max(1, height // r.stride)
               for r in rows if r.name in wanted)


def _tiled_masks(extractor: nn.Module, options: StyleOptions,
                 images: Mapping[str, Sequence[ImageHeader]], width: int, height: int) -> int:
    """Bytes of the masks at the style layers' resolutions in a tiled run: image-sized
    buffers that no tile bounds. Each region mask's maps (kept by the loss for the run) and
    the tiled objective's normalised copy of them (:mod:`gramstyle.engine.tiles`, made at
    each evaluation), at the output size; each source mask's maps at its style's size
    (held while the targets are built). Untiled, the same maps are small next to the
    activations, which :data:`MARGIN` covers."""
    layers = list(options.style_layers)
    regions = len(images.get("style_mask", ()))
    total = 2 * regions * _mask_maps(extractor, layers, width, height)
    entry = input_named("style_source_mask")
    for header in images.get("style_source_mask", ()):
        total += _mask_maps(extractor, layers, *resized_size(
            entry, header, (width, height), options.style_scale))
    return total


def _element(options: StyleOptions) -> int:
    return 2 if options.precision == "bf16" else 4


def peak(phases: dict[str, dict[str, int]]) -> Estimate:
    """The estimate of the costliest phase (decoding, targets, optimising), whose parts are
    reported, with the margin and the fixed overhead."""
    name = max(phases, key=lambda k: sum(phases[k].values()))
    parts = {k: int(MARGIN * v) for k, v in phases[name].items() if v}
    return Estimate(int(OVERHEAD + MARGIN * sum(phases[name].values())), parts)


def optimiser_bytes(options: StyleOptions, pixels: int, iterations: int) -> int:
    """Bytes of the optimiser's state over an image of ``pixels`` run for ``iterations``
    steps: L-BFGS keeps min(iterations, :func:`lbfgs_history`) curvature pairs of two
    image-sized vectors, plus six working copies (the gradient's, the direction, the step,
    the two-loop's); Adam its two moments, the gradient and a working copy."""
    if options.optimizer == "lbfgs":
        return (2 * min(iterations, lbfgs_history(pixels)) + 6) * _RGB_TENSOR * pixels
    return 4 * _RGB_TENSOR * pixels


def stylize_phases(extractor: nn.Module, options: StyleOptions,
                   inputs: Mapping[str, Sequence[ImageHeader]], images: int
                   ) -> dict[str, dict[str, int]]:
    """Bytes of each phase of a Stylize after decoding (building each scale's targets,
    optimising each scale) by part; ``inputs``: the headers (or images: anything with
    ``width`` and ``height``) of the request's inputs by name, "content" and "style"
    included; ``images``: the bytes held for the inputs throughout."""
    element = _element(options)
    contents, styles = inputs["content"], inputs["style"]
    phases = {}
    previous = 0  # the coarser scale's targets, held while the next ones are built
    for k, (side, iterations) in enumerate(schedule(options.size, options.scales,
                                                    options.iterations)):
        width, height = output_size(contents, styles, side)
        pixels = width * height
        kept, transient = _targets(extractor, options, inputs, width, height, element)
        phases[f"targets{k}"] = {"images": images, "targets": previous + kept + transient}
        phases[f"optimise{k}"] = {
            "images": images, "targets": kept,
            "activations": _tiled_network(extractor, options, bool(contents), bool(styles),
                                          width, height, element, True)
            if tile_pixels(options.tile)
            else _backprop(extractor, options, bool(contents), bool(styles), width, height,
                           element),
            "optimiser": optimiser_bytes(options, pixels, iterations), "output": 24 * pixels}
        previous = kept
    return phases


def losses_phases(extractor: nn.Module, options: StyleOptions,
                  inputs: Mapping[str, Sequence[ImageHeader]], images: int, gradient: bool
                  ) -> dict[str, dict[str, int]]:
    """Bytes of each phase of a ComputeLosses after decoding (the targets, the evaluation)
    by part; ``inputs`` as in :func:`stylize_phases`, "candidate" included (it fixes the
    size)."""
    element = _element(options)
    candidate, contents, styles = inputs["candidate"][0], inputs["content"], inputs["style"]
    width, height = candidate.width, candidate.height
    pixels = width * height
    kept, transient = _targets(extractor, options, inputs, width, height, element)
    kept += 2 * _RGB_TENSOR * pixels  # the candidate as a tensor
    if tile_pixels(options.tile):
        network = _tiled_network(extractor, options, bool(contents), bool(styles), width,
                                 height, element, gradient)
        out = 6 * _RGB_TENSOR * pixels if gradient else 0
    elif gradient:
        network = _backprop(extractor, options, bool(contents), bool(styles), width, height,
                            element)
        out = 6 * _RGB_TENSOR * pixels  # the gradient, contiguous, numpy, bytes, message
    else:
        layers = [*(options.content_layers if contents else ()),
                  *(options.style_layers if styles else ())]
        network = _forward_peak(extractor, layers, width, height, element)
        out = 0
    return {"targets": {"images": images, "targets": kept + transient},
            "evaluate": {"images": images, "targets": kept, "activations": network,
                         "output": out}}


def choose_tile(estimate_of: Callable[[StyleOptions], Estimate], options: StyleOptions,
                sides: Callable[[], Sequence[int]], limit: int | None
                ) -> tuple[Estimate, StyleOptions, bool]:
    """Resolve ``tile`` "auto" against a memory ``limit`` (bytes; None: no limit): "off"
    when the untiled estimate fits, else the largest of ``sides()`` (ascending,
    :func:`tile_sides`) whose estimate fits -- the estimate grows with the tile, so a binary
    search. Returns the estimate, the options to run with, and whether they fit (when even
    the smallest tile does not, its options and estimate, and False). ``estimate_of``: the
    run's estimate with these options; options with ``tile`` not "auto" are only
    estimated."""
    estimate = estimate_of(options)
    fits = limit is None or estimate.total <= limit
    if options.tile != "auto":
        return estimate, options, fits
    if fits:
        return estimate, options.resolved(options.network, tile="off"), True
    sides = sides()
    low, high, best = 0, len(sides) - 1, None
    while low <= high:
        middle = (low + high) // 2
        tiled = options.resolved(options.network, tile=sides[middle])
        tried = estimate_of(tiled)
        if tried.total <= limit:
            best, low = (tried, tiled), middle + 1
        else:
            high = middle - 1
    if best is None:
        smallest = options.resolved(options.network, tile=sides[0])
        return estimate_of(smallest), smallest, False
    return *best, True


__all__ = ["MARGIN", "OVERHEAD", "Estimate", "choose_tile", "losses_phases",
           "optimiser_bytes", "peak", "resized_inputs", "stylize_phases", "tile_sides"]
