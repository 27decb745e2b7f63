"""The objective of one run: target features at one output size, and the loss they define.

    objective = Objective.build(extractor, contents, styles, options)   # checks, then targets
    total, losses = objective.evaluate(x)    # x: [1, 3, H, W] RGB in [0, 1]
    total, terms = objective.evaluate_terms(x)   # the same, as tensors: no host transfer

    total(x) = content_weight * content(x) + style_weight * style(x) + tv_weight * tv(x)

with the terms of :mod:`gramstyle.engine.losses`. An :class:`Objective` is plain data (the
loss modules, their weights, the pixels they were built from); building one runs the network
on the targets once (or takes them from a :class:`~gramstyle.engine.target_cache.TargetCache`),
evaluating it runs the network on ``x``.

The options arrive validated (:meth:`gramstyle.options.StyleOptions.validated`, at the edge:
the codec for a request, ``StyleTransfer.validate`` in-process) and are not checked again.
What needs the network or the images lives here: :func:`resolve_layers` (layer names, once
per request), :func:`check_feature_sizes` (feature maps at the sizes the images give) and
:func:`check_images` (the images given against the options).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from gramstyle.engine.colour import luminance, match_colours
from gramstyle.engine.extractor import VGGFeatures
from gramstyle.engine.losses import (
    ContentLoss,
    LayerSum,
    RegionStyleLoss,
    StyleLoss,
    gram_target,
    tv_loss,
)
from gramstyle.engine.masks import (
    REGION_FIELD,
    SOURCE_FIELD,
    check_count,
    layer_weights,
    mask_tensor,
)
from gramstyle.engine.precision import resolve_precision
from gramstyle.engine.target_cache import TargetCache, image_digest
from gramstyle.engine.tensors import to_tensor
from gramstyle.errors import FieldError
from gramstyle.images import long_side_size
from gramstyle.inputs import output_size, style_side
from gramstyle.options import StyleOptions, check_weights, tile_pixels
from gramstyle.results import Losses


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The network's precision: bf16 autocast for 'bf16', nothing for 'fp32' (resolve 'auto'
    first: :func:`gramstyle.engine.precision.resolve_precision`)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_images(contents: Sequence[Image.Image], styles: Sequence[Image.Image],
                 options: StyleOptions) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Check that the images given suit ``options``; return the content and style blend
    weights (one per image, not yet normalised; their values were checked with the options,
    their number is checked here)."""
    if options.content_weight > 0 and options.content_layers and not contents:
        raise FieldError("content", "at least one content image is needed when "
                         "content_weight > 0 (set content_weight to 0 for pure texture "
                         "synthesis)")
    if options.style_weight > 0 and options.style_layers and not styles:
        raise FieldError("style", "at least one style image is needed when style_weight > 0 "
                         "(set style_weight to 0 for pure feature inversion)")
    if not contents and not styles:
        raise FieldError("content/style", "give at least one content or style image")
    content_blend = check_weights("content_blend_weights", options.content_blend_weights,
                                  len(contents))
    style_blend = check_weights("style_blend_weights", options.style_blend_weights, len(styles))
    if options.preserve_colors and not contents:
        raise FieldError("preserve_colors", "needs a content image to take the colours from")
    if options.colour != "style" and not contents:
        raise FieldError("colour", f"{options.colour!r} needs a content image to take the "
                         "colours from; use 'style' without one", options.colour)
    return content_blend, style_blend


def resolve_layers(extractor: VGGFeatures, options: StyleOptions) -> dict[str, tuple[str, ...]]:
    """The canonical names (``"22"`` -> ``"relu4_2"``) of ``content_layers`` and
    ``style_layers``, by option name; each layer must exist and be listed once."""
    return {name: extractor.resolve_all(getattr(options, name), name)
            for name in ("content_layers", "style_layers")}


def check_feature_sizes(extractor: VGGFeatures, options: StyleOptions,
                        output: tuple[int, int], *, content: bool = True,
                        styles: Sequence[tuple[int, int]] = (),
                        output_field: str = "size") -> None:
    """Every feature map used keeps at least one pixel, for the ``output`` image (width,
    height in px; named ``output_field`` in errors; its layers are the content layers when
    ``content`` images are used and the style layers when ``styles`` are) and for each style
    image at its resized (width, height) ``styles[i]``. This runs before the network does, so
    a too-small image is a clear FieldError rather than a failed convolution. The layer
    names of ``options`` are canonical (:func:`resolve_layers`)."""
    width, height = output
    layer, need = extractor.min_side((options.content_layers if content else ())
                                     + (options.style_layers if styles else ()))
    if min(width, height) < need:
        raise FieldError(output_field, f"the image would be {width}x{height} px, too "
                         f"small for layer {layer} (its short side must be at least {need} "
                         f"px); use a larger size or shallower layers", (width, height))
    if styles:
        layer, need = extractor.min_side(options.style_layers)
        for i, (w, h) in enumerate(styles):
            if min(w, h) < need:
                raise FieldError(f"style[{i}]", f"resized to {w}x{h} px (long side "
                                 f"size*style_scale = {max(w, h)}), too small for layer "
                                 f"{layer} (short side at least {need} px); raise "
                                 f"style_scale or size", (w, h))


def _layer_weights(weights: Sequence[float] | None, layers: Sequence[str]) -> Sequence[float]:
    """The layer weights of validated options: None means equal."""
    return (1.0,) * len(layers) if weights is None else weights


def region_loss(layer: str, grams: Sequence[dict[str, torch.Tensor]],
                region: Sequence[dict[str, torch.Tensor] | None],
                blend: Sequence[float]) -> RegionStyleLoss:
    """The style loss of ``layer`` when some styles have region masks: the styles without
    one stay a blend over the whole output, each style with one gets its own guided term,
    weighted by its share of the blend weights (see :mod:`gramstyle.engine.losses`)."""
    total = float(sum(blend))
    everywhere = [j for j, r in enumerate(region) if r is None]
    terms: list[tuple[float, StyleLoss]] = []
    if everywhere:
        terms.append((sum(blend[j] for j in everywhere) / total,
                      StyleLoss([grams[j][layer] for j in everywhere],
                                           [blend[j] for j in everywhere])))
    for j, weights in enumerate(region):
        if weights is not None:
            terms.append((blend[j] / total,
                          StyleLoss([grams[j][layer]], [1.0], weights[layer])))
    return RegionStyleLoss(terms)


@dataclass
class LossTerms:
    """The loss terms of one image as 0-dim float32 tensors on the device (see
    :class:`~gramstyle.results.Losses` for their meaning).

    Keeping them as tensors lets the optimisation loop run without host synchronisation;
    :meth:`losses` fetches all of them in one transfer when a report needs them.
    """

    total: torch.Tensor
    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor
    content_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    style_layers: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> LossTerms:
        """The same terms cut from the autograd graph (so keeping them keeps no graph)."""
        return LossTerms(self.total.detach(), self.content.detach(), self.style.detach(),
                         self.tv.detach(), {n: v.detach() for n, v in self.content_layers.items()},
                         {n: v.detach() for n, v in self.style_layers.items()})

    def tensors(self) -> list[torch.Tensor]:
        """Every term, in the order :meth:`losses` reads them back."""
        return [self.total, self.content, self.style, self.tv, *self.content_layers.values(),
                *self.style_layers.values()]

    def losses(self, values: Sequence[float] | None = None) -> Losses:
        """The terms as floats: from ``values`` (what :func:`fetch` gave for
        :meth:`tensors`), or fetched now in one transfer."""
        values = fetch(self.tensors()) if values is None else list(values)
        total, content, style, tv = values[:4]
        rest = values[4:]
        n = len(self.content_layers)
        return Losses(total=total, content=content, style=style, tv=tv,
                      content_layers=dict(zip(self.content_layers, rest[:n], strict=True)),
                      style_layers=dict(zip(self.style_layers, rest[n:], strict=True)))


def fetch(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Several 0-dim tensors as floats, in one device-to-host transfer."""
    return torch.stack([t.detach().float() for t in tensors]).tolist()


@dataclass
class Objective:
    """What one run minimises at one output size. Build it with :meth:`build`."""

    extractor: VGGFeatures
    #: Per-layer losses against the targets; None when the kind has no images or no layers.
    content: LayerSum | None
    style: LayerSum | None
    content_weight: float
    style_weight: float
    tv_weight: float
    #: 'fp32' or 'bf16' (autocast of the network; losses stay float32), never 'auto'.
    precision: str
    #: The output size in px.
    width: int
    height: int
    #: The target images as used, [1, 3, H, W] RGB in [0, 1]: the contents at the output
    #: size, the styles at long side :func:`style_side`. The start image and colour
    #: preservation take their pixels from here.
    contents: list[torch.Tensor]
    styles: list[torch.Tensor]
    #: The pixels whose colours (chroma) the output keeps, or None to keep its own.
    colours_of: torch.Tensor | None = None
    #: Called between network layers (and bands of large ones, forward and backward); it
    #: raises to stop a cancelled request (see :func:`gramstyle.engine.bands.run_layer`).
    check: Callable[[float], None] | None = field(default=None, repr=False)
    #: Tile side (px) of the loss and gradient computation, 0 for the whole image at once
    #: (:mod:`gramstyle.engine.tiles`; ``options.tile``).
    tile: int = 0
    #: Called with (pass, tile, tiles) at each tile of a tiled evaluation: pass 1
    #: (no graph) or 2 (with one), the 1-based tile and the pass's count (progress reports).
    on_tile: Callable[[int, int, int], None] | None = field(default=None, repr=False)
    #: Luminance-only transfer (``options.colour == 'luminance'``): the network sees
    #: :func:`~gramstyle.engine.colour.luminance` of ``x``, as its targets were computed.
    luminance: bool = False

    @classmethod
    def build(cls, extractor: VGGFeatures, contents: Sequence[Image.Image],
              styles: Sequence[Image.Image], options: StyleOptions,
              size: tuple[int, int] | None = None, output_field: str = "size", *,
              cache: TargetCache | None = None, model_key: Hashable = (),
              check: Callable[[float], None] | None = None,
              keep_pixels: bool = True,
              style_masks: Sequence[Image.Image | None] = (),
              style_source_masks: Sequence[Image.Image | None] = ()) -> Objective:
        """Check the images against ``options`` and the network, then compute the targets.

        ``options`` must be checked (:meth:`StyleTransfer.validate`). ``size`` = (width,
        height) of the output in px; by default the first content (or style) image resized
        to long side ``options.size``. Content images are resized to exactly ``size``, style
        images to long side ``max(size) * style_scale``.

        With ``cache``, each image's targets are looked up there first (and stored after a
        miss) under ``model_key`` (what identifies the network; see
        :mod:`gramstyle.engine.target_cache` for the whole key).

        ``check`` is told the estimated seconds of each resize and of each layer (and band)
        of the network passes before they run; it raises to stop (a cancelled request), and
        is kept for :meth:`evaluate_terms`.

        ``keep_pixels=False`` (ComputeLosses, which needs no start image and no colours)
        leaves :attr:`contents` and :attr:`styles` empty, so that images whose targets are
        cached are not even resized.

        ``style_masks`` / ``style_source_masks``: empty, or one per style image (None for a
        style without one): the region mask on the output and the source mask on the style
        image of each style (:mod:`gramstyle.engine.masks`; the loss is in
        :mod:`gramstyle.engine.losses`). A style without masks applies everywhere.

        ``options.colour`` (:mod:`gramstyle.engine.colour`): 'luminance' computes every
        target from the luminance of its image (and :meth:`evaluate_terms` sees the
        luminance of ``x``); 'match' computes the style targets from the style pixels with
        the first content image's colour mean and covariance (at the output size). The
        stored :attr:`contents` / :attr:`styles` stay the images as given (resized), and
        :attr:`colours_of` is the first content image for 'luminance'.
        """
        # Imported here: tiles builds on this module.
        from gramstyle.engine import tiles

        tick = check or (lambda seconds: None)
        content_blend, style_blend = check_images(contents, styles, options)
        check_count(style_masks, len(styles), REGION_FIELD)
        check_count(style_source_masks, len(styles), SOURCE_FIELD)
        if size is None:
            size = output_size(contents, styles, options.size)
        width, height = size
        side = style_side(width, height, options.style_scale)

        def resized(image: Image.Image, to: tuple[int, int]) -> Image.Image:
            # Lanczos costs about 40 ns per source pixel on a CPU core.
            tick(image.width * image.height * 4e-8)
            return image.resize(to, Image.Resampling.LANCZOS) if image.size != to else image

        style_sizes = [long_side_size(s.width, s.height, side) for s in styles]
        check_feature_sizes(extractor, options, size, content=bool(contents),
                            styles=style_sizes, output_field=output_field)

        device = extractor.mean.device
        precision = resolve_precision(options.precision, device)
        content_layers = list(options.content_layers) if contents else []
        style_layers = list(options.style_layers) if styles else []

        # Each mask at each style layer's resolution, [1, N_l] (None: no mask).
        region: list[dict[str, torch.Tensor] | None] = [None] * len(styles)
        source: list[dict[str, torch.Tensor] | None] = [None] * len(styles)
        for j, mask in enumerate(style_masks if style_layers else ()):
            if mask is not None:
                tick(mask.width * mask.height * 4e-8)
                region[j] = layer_weights(
                    mask_tensor(mask, size, device, f"{REGION_FIELD}[{j}]", "the output"),
                    extractor, style_layers)
        tile = tile_pixels(options.tile)
        for j, mask in enumerate(style_source_masks if style_layers else ()):
            if mask is not None:
                tick(mask.width * mask.height * 4e-8)
                source[j] = layer_weights(
                    mask_tensor(mask, style_sizes[j], device, f"{SOURCE_FIELD}[{j}]",
                                f"style[{j}] resized to size*style_scale"),
                    extractor, style_layers)
        content_t = [to_tensor(resized(c, size), device) for c in contents] if keep_pixels \
            else []
        style_t = [to_tensor(resized(s, to), device)
                   for s, to in zip(styles, style_sizes, strict=True)] if keep_pixels else []

        colour = options.colour
        # What the targets also depend on under colour control: the mode, and for 'match'
        # the content image the style colours are taken from, at the size it is used at.
        colour_key: tuple = () if colour == "style" else (
            ("colour", colour) if colour == "luminance" else
            ("colour", colour, image_digest(contents[0]), tuple(size)))

        def coloured(kind: str, pixels: torch.Tensor) -> torch.Tensor:
            """The pixels the network sees for a target image of ``kind``."""
            if colour == "luminance":
                return luminance(pixels)
            if colour == "match" and kind == "style":
                reference = content_t[0] if content_t else to_tensor(
                    resized(contents[0], size), device)
                return match_colours(pixels, reference)
            return pixels

        def targets(kind: str, index: int, layers: list[str], compute, tiled,
                    extra: tuple = ()) -> dict[str, torch.Tensor]:
            image, to, kept = ((contents[index], size, content_t) if kind == "content"
                               else (styles[index], style_sizes[index], style_t))

            def run() -> dict[str, torch.Tensor]:
                pixels = coloured(kind, kept[index] if kept
                                  else to_tensor(resized(image, to), device))
                if tile and tiled is not None:  # memory bounded by one tile
                    return tiled(extractor, pixels, layers, tile, precision, check)
                with torch.no_grad(), autocast(device, precision):
                    return compute(extractor(pixels, layers, check))
            if cache is None:
                return run()
            # The original image and the size it is resized to: a hit needs no resize.
            # ``extra``: what else the targets depend on (a source mask's digest).
            key = (kind, model_key, precision, image_digest(image), tuple(to), tuple(layers),
                   *extra, *(colour_key if kind == "style" or colour == "luminance" else ()))
            return cache.get_or_compute(key, run)

        content_loss = style_loss = None
        if content_layers:
            feats = [targets("content", i, content_layers, lambda f: f, tiles.feature_maps)
                     for i in range(len(contents))]
            content_loss = LayerSum({n: ContentLoss([f[n] for f in feats], content_blend)
                                     for n in content_layers},
                                    _layer_weights(options.content_layer_weights, content_layers))
        if style_layers:
            def style_grams(j: int) -> dict[str, torch.Tensor]:
                if source[j] is None:
                    return targets("style", j, style_layers,
                                   lambda f: {n: gram_target(v) for n, v in f.items()},
                                   tiles.grams)
                weights = source[j]
                return targets("style", j, style_layers,
                               lambda f: {n: gram_target(v, weights[n]) for n, v in f.items()},
                               lambda *run: tiles.grams(*run, weights=weights),
                               extra=(image_digest(style_source_masks[j]),))

            grams = [style_grams(j) for j in range(len(styles))]
            if not any(r is not None for r in region):
                style_loss = LayerSum({n: StyleLoss([g[n] for g in grams], style_blend)
                                       for n in style_layers},
                                      _layer_weights(options.style_layer_weights, style_layers))
            else:
                style_loss = LayerSum({n: region_loss(n, grams, region, style_blend)
                                       for n in style_layers},
                                      _layer_weights(options.style_layer_weights, style_layers))
        return cls(extractor, content_loss, style_loss, options.content_weight,
                   options.style_weight, options.tv_weight, precision, width, height,
                   content_t, style_t,
                   content_t[0] if (options.preserve_colors or colour == "luminance")
                   and content_t else None,
                   check=check, tile=tile, luminance=colour == "luminance")

    @property
    def device(self) -> torch.device:
        return self.extractor.mean.device

    @property
    def layers(self) -> set[str]:
        """The layers the losses read."""
        return {name for term in (self.content, self.style) if term for name in term.layers}

    def evaluate_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, LossTerms]:
        """The total loss of pixels ``x`` ([1, 3, height, width], RGB in [0, 1]) as a 0-dim
        float32 tensor (differentiable in ``x``), and all its terms as tensors. Nothing is
        copied to the host, so on CUDA this does not synchronise.

        With :attr:`tile` set, the same values and gradient are computed tile by tile
        (:func:`gramstyle.engine.tiles.evaluate_terms`)."""
        if self.luminance:  # the loss sees only x's luminance; its gradient flows back to x
            x = luminance(x)
        if self.tile:
            # Imported here: tiles builds on this module.
            from gramstyle.engine.tiles import evaluate_terms
            return evaluate_terms(self, x, self.tile)
        with autocast(x.device, self.precision):
            feats = self.extractor(x, self.layers, self.check)
            content_layers = self.content(feats) if self.content else {}
            style_layers = self.style(feats) if self.style else {}
        zero = torch.zeros((), device=x.device)
        content = self.content.weighted(content_layers) if self.content else zero
        style = self.style.weighted(style_layers) if self.style else zero
        tv = tv_loss(x)
        total = self.content_weight * content + self.style_weight * style + self.tv_weight * tv
        return total, LossTerms(total, content, style, tv, content_layers, style_layers)

    def evaluate(self, x: torch.Tensor) -> tuple[torch.Tensor, Losses]:
        """:meth:`evaluate_terms` with the terms as floats (one host transfer)."""
        total, terms = self.evaluate_terms(x)
        return total, terms.losses()
