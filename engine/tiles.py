"""The tiled objective: the full-image loss and its exact gradient, one tile at a time.

Every term of the loss (:mod:`gramstyle.engine.losses`) is a sum over positions: the Gram
matrix of a layer, the content MSE and the TV term. So split the image into tiles whose
*interiors* partition its pixels -- and, at every layer used, its feature positions:

- the Gram of the image is the sum of the Grams of the interiors' features;
- with the style residual R = G - A of a layer known for the whole image, the gradient of
  ``mean((G - A)^2)`` with respect to the features F ([C, N], N the whole image's
  positions, G = s F F^T, s = 1 / (C N)) is ``2 s / C^2 (R + R^T) F`` -- the backward GEMM
  of :func:`gramstyle.kernels.style_loss` -- which at each position needs only that
  position's features;
- so two passes give the exact loss and gradient with the network's memory bounded by one
  tile: pass 1, without autograd, accumulates the Grams (and the content and TV sums) over
  the tiles' interiors; pass 2 runs each tile forward with autograd and backpropagates into
  the tile, from each loss layer's maps, the whole image's gradient in its interior
  features. The *whole* tile's input gradient (halo included) is added into the image's
  gradient: a halo pixel influences interior features of this tile, and that share of its
  gradient is computed here and nowhere else.

**Halo and stride rule** (:func:`receptive_field`, computed from the modules): a feature at
position q of a layer with total stride J reads the pixels [q J - P, q J - P + r - 1], with r
the receptive field and P the padding the layers before it add up to. A tile whose interior
is [a, b) therefore needs P pixels before a and r - J - P after b at that layer; the halo
is the largest of these over the layers used, rounded up to the deepest layer's total
stride S. Interior offsets (and hence tile offsets) are multiples of S, so that every
pooling window of the tile is a pooling window of the whole image, and a tile's zero padding
falls only where the image's does or outside what its interior reads. For VGG16/19 up to
relu5_1: r = 132, P = r - J - P = 58, S = 16, so the halo is 64 px.

Region and source masks (guided Grams) tile the same way: each tile takes the whole image's
mask at the layer's resolution cropped to its interior, with the whole image's normaliser
(the "masks" section below; docs/tiling.md).

Pixels are [1, 3, H, W] RGB in [0, 1]; sizes are in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gramstyle import kernels
from gramstyle.engine.extractor import VGGFeatures
from gramstyle.engine.losses import RegionStyleLoss, StyleLoss
from gramstyle.engine.objective import LossTerms, Objective, autocast


@dataclass(frozen=True)
class Field:
    """What a tile must carry for its interior features to equal the whole image's.

    ``stride``: total stride S of the deepest layer (interior offsets are multiples of it);
    ``before``/``after``: pixels read before an interior's first pixel and after its last,
    at the worst layer; ``size``: the deepest layer's receptive field; ``jumps``: each
    layer's total stride by name.
    """

    stride: int
    before: int
    after: int
    size: int
    jumps: dict[str, int]

    @property
    def halo(self) -> int:
        """The halo (px) each side: max(before, after) rounded up to a multiple of S."""
        return math.ceil(max(self.before, self.after) / self.stride) * self.stride


def _window(module: nn.Module) -> tuple[int, int, int]:
    """(kernel, stride, padding) of one layer along one axis; square layers only."""
    if isinstance(module, nn.ReLU):
        return 1, 1, 0
    if not isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        raise TypeError(f"tiles: no receptive-field rule for {module!r}")
    pair = [v if isinstance(v, tuple) else (v, v)
            for v in (module.kernel_size, module.stride, module.padding,
                      getattr(module, "dilation", 1))]
    if any(a != b for a, b in pair) or getattr(module, "ceil_mode", False):
        raise TypeError(f"tiles: {module!r} is not square (or uses ceil_mode)")
    (k, _), (s, _), (p, _), (d, _) = pair
    return d * (k - 1) + 1, s, p


def receptive_field(extractor: VGGFeatures, layers: Sequence[str]) -> Field:
    """The :class:`Field` of ``extractor`` up to the deepest of ``layers``, from the modules'
    kernels, strides and paddings (not hard-coded)."""
    names = extractor.layer_names
    deepest = max(names.index(extractor.resolve(n)) for n in layers)
    jump, size, pad, before, after, jumps = 1, 1, 0, 0, 0, {}
    for name, module in zip(names[: deepest + 1], extractor.layers[: deepest + 1],
                            strict=True):
        k, s, p = _window(module)
        size += (k - 1) * jump
        pad += p * jump
        jump *= s
        jumps[name] = jump
        before, after = max(before, pad), max(after, size - jump - pad)
    return Field(jump, before, after, size, jumps)


@dataclass(frozen=True)
class Tile:
    """One tile: its interior [y0, y1) x [x0, x1) and the input it reads, interior plus
    halo clipped to the image, [ty0, ty1) x [tx0, tx1] (pixels)."""

    y0: int
    y1: int
    x0: int
    x1: int
    ty0: int
    ty1: int
    tx0: int
    tx1: int

    def crop(self, features: torch.Tensor, jump: int) -> tuple[torch.Tensor, int, int]:
        """The interior of a tile's feature map of total stride ``jump`` ([1, C, h, w]), and
        the interior's first row and column in the whole image's map."""
        r0, r1 = (self.y0 - self.ty0) // jump, (self.y1 - self.ty0) // jump
        c0, c1 = (self.x0 - self.tx0) // jump, (self.x1 - self.tx0) // jump
        return features[:, :, r0:r1, c0:c1], self.y0 // jump, self.x0 // jump


def _spans(length: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(interior start, end, input start, end) along one axis: round(length / tile)
    interiors of ``tile`` px, the last one taking the rest, between half a tile and one and
    a half (so a tile's input is at most 1.5 * tile + 2 * halo px a side)."""
    count = max(1, (2 * length + tile) // (2 * tile))
    starts = [i * tile for i in range(count)] + [length]
    return [(a, b, max(0, a - halo), min(length, b + halo))
            for a, b in zip(starts, starts[1:], strict=False)]


def plan(height: int, width: int, tile: int, field: Field) -> list[Tile]:
    """The tiles of a ``height`` x ``width`` image with interiors of about ``tile`` px
    (rounded down to a multiple of the stride, at least one stride) and the halo of
    ``field``; row-major."""
    side = max(field.stride, tile // field.stride * field.stride)
    return [Tile(a, b, c, d, ta, tb, tc, td)
            for a, b, ta, tb in _spans(height, side, field.halo)
            for c, d, tc, td in _spans(width, side, field.halo)]


#: Pass 1 (no autograd graph) runs on tiles this many times the side of pass 2's, by
#: precision: a no-grad pass keeps only the maps in flight, less than a pass with a graph
#: and its backward keep, so fewer, larger tiles (reading less halo) fit in the same
#: memory. The factors keep pass 1's estimated peak below pass 2's
#: (:mod:`gramstyle.engine.footprint`; VGG16/19, tiles of 128 to 512 px: at most 0.96 of
#: it in bf16, 1.03 in fp32). The interiors still partition the image: the same sums.
FIRST_PASS_SCALE = {"bf16": 2.0, "fp32": 1.5}


def first_pass_tile(tile: int, precision: str = "fp32") -> int:
    """The tile side (px) pass 1 of :func:`evaluate_terms` uses when pass 2 uses ``tile``,
    in ``precision`` ('fp32' or 'bf16'): ``FIRST_PASS_SCALE`` times it."""
    return int(FIRST_PASS_SCALE.get(precision, 1.0) * tile)


def _tv_sums(pixels: torch.Tensor, tile: Tile, height: int, width: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of squared vertical and horizontal neighbour differences of the pairs whose
    first pixel is in the tile's interior (each pair of the image is owned by one tile);
    ``pixels`` is the tile's input."""
    r0, c0 = tile.y0 - tile.ty0, tile.x0 - tile.tx0
    r1, c1 = tile.y1 - tile.ty0, tile.x1 - tile.tx0
    rows = pixels[:, :, r0:min(r1 + 1, height - tile.ty0), c0:c1]
    cols = pixels[:, :, r0:r1, c0:min(c1 + 1, width - tile.tx0)]
    return ((rows[:, :, 1:] - rows[:, :, :-1]).pow(2).sum(),
            (cols[..., 1:] - cols[..., :-1]).pow(2).sum())


def _tv(dy: torch.Tensor, dx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`gramstyle.engine.losses.tv_loss` from its two sums over the whole image."""
    zero = torch.zeros((), device=dy.device)
    return ((dy / (3 * (height - 1) * width) if height > 1 else zero)
            + (dx / (3 * height * (width - 1)) if width > 1 else zero)).float()


def interiors(extractor: VGGFeatures, x: torch.Tensor, layers: Sequence[str], tile: int,
              precision: str = "fp32", check: Callable[[float], None] | None = None
              ) -> Iterator[tuple[Tile, torch.Tensor, dict[str, tuple[torch.Tensor, int, int]]]]:
    """Without autograd, for each tile of ``x``: the tile, its input pixels, and per layer
    its interior features with their first row and column in the whole image's map
    (:meth:`Tile.crop`). The interiors of all tiles make up the whole image's feature maps
    exactly."""
    field = receptive_field(extractor, layers)
    for t in plan(x.shape[2], x.shape[3], tile, field):
        if check is not None:
            check()  # polls at once: a stop requested during a tile ends the run before the next
        pixels = x[:, :, t.ty0:t.ty1, t.tx0:t.tx1]
        with torch.no_grad(), autocast(x.device, precision):
            feats = extractor(pixels, layers, check)
        crops = {n: t.crop(f, field.jumps[n]) for n, f in feats.items()}
        del feats
        yield t, pixels, crops
        # Dropped before the next tile runs (callers drop theirs too): one tile's maps at a
        # time.
        del crops


def feature_maps(extractor: VGGFeatures, x: torch.Tensor, layers: Sequence[str], tile: int,
                 precision: str = "fp32", check: Callable[[float], None] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The whole image's feature maps at ``layers`` ([1, C, H_l, W_l], as
    ``extractor(x, layers)`` gives them), assembled from tiles: the network's transient
    memory is one tile's."""
    out: dict[str, torch.Tensor] = {}
    for _, _, crops in interiors(extractor, x, layers, tile, precision, check):
        for name, (f, r, c) in crops.items():
            if name not in out:
                field = receptive_field(extractor, [name])
                size = [n // field.jumps[name] for n in x.shape[2:]]
                out[name] = f.new_empty(*f.shape[:2], *size)
            out[name][:, :, r:r + f.shape[2], c:c + f.shape[3]] = f
        crops = f = None  # this tile's maps go before the next tile runs
    return out


def grams(extractor: VGGFeatures, x: torch.Tensor, layers: Sequence[str], tile: int,
          precision: str = "fp32", check: Callable[[float], None] | None = None,
          weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The float32 [C, C] Gram of each layer (:func:`gramstyle.engine.losses.gram_target`
    of the whole image), summed over tiles. ``weights``: a source mask at each layer
    ([1, N_l] over the whole image, :func:`gramstyle.engine.masks.layer_weights`), for the
    guided Grams."""
    guides = {n: _guide(weights[n], extractor, n, x) for n in layers} if weights else {}
    jumps = receptive_field(extractor, layers).jumps
    out: dict[str, torch.Tensor] = {}
    for t, _, crops in interiors(extractor, x, layers, tile, precision, check):
        for name, (f, r, c) in crops.items():
            if not f.numel():  # a last interior under one stride of this layer
                continue
            part = _gram(f, _positions(extractor, name, x),
                         _interior(guides.get(name), t, f, r, c, jumps[name]))
            out[name] = part if name not in out else out[name] + part
        crops = f = None  # this tile's maps go before the next tile runs
    return out


def _positions(extractor: VGGFeatures, layer: str, x: torch.Tensor) -> int:
    """N, the whole image's positions at ``layer``."""
    jump = receptive_field(extractor, [layer]).jumps[layer]
    return (x.shape[2] // jump) * (x.shape[3] // jump)


def _gram(features: torch.Tensor, positions: int, guide: torch.Tensor | None = None
          ) -> torch.Tensor:
    """This tile's share of the whole image's Gram, [C, C] float32: scale 1 / (C N) with N
    the whole image's positions (the normalisation of :func:`gramstyle.kernels.gram`); with
    ``guide`` (:func:`_interior` of a :func:`_guide`: [1, n] for the interior's n positions)
    the share of the guided Gram F diag(m^2) F^T / (C sum m^2), whose normaliser over the
    whole image the guide carries already."""
    with torch.autocast(features.device.type, enabled=False):
        if guide is None:
            return kernels.gram(features.float(), 1.0 / (features.shape[1] * positions))[0]
        return kernels.gram(features.float(), 1.0 / features.shape[1], weights=guide)[0]


# ---------------------------------------------------------------------------- masks
# Region and source masks (guided Grams, gramstyle.engine.masks) tile exactly: the guided
# Gram sum_k m_k^2 F_k F_k^T / (C sum_k m_k^2) is a sum over positions too. Each tile takes
# the whole image's mask at the layer's resolution, cropped to its interior; the normaliser
# sum_k m_k^2 is the whole image's, folded into the mask once (m / sqrt(sum m^2)).


def _style_terms(loss: StyleLoss | RegionStyleLoss) -> list[tuple[float, StyleLoss]]:
    """The (share, :class:`StyleLoss`) terms of one layer's style loss: a plain one is one
    term of share 1; with region masks, one per group (see RegionStyleLoss)."""
    return loss.terms if isinstance(loss, RegionStyleLoss) else [(1.0, loss)]


def _guide(weights: torch.Tensor | None, extractor: VGGFeatures, layer: str,
           x: torch.Tensor) -> torch.Tensor | None:
    """A mask's weights at ``layer`` ([1, N_l] over the whole image x) as the map
    [H_l, W_l] float32, divided by sqrt(sum m^2) (the whole image's normaliser; a zero mask
    stays zero, as in :func:`gramstyle.kernels.gram`); None for no mask."""
    if weights is None:
        return None
    jump = receptive_field(extractor, [layer]).jumps[layer]
    rows, cols = x.shape[2] // jump, x.shape[3] // jump
    if weights.numel() != rows * cols:  # masks.layer_weights pools as the network does
        raise RuntimeError(f"tiles: a mask at {layer} has {weights.numel()} positions, the "
                           f"feature map {rows}x{cols}")
    w = weights.detach().float().reshape(rows, cols)
    return w * w.square().sum().clamp_min(torch.finfo(torch.float32).tiny).rsqrt()


def _interior(guide: torch.Tensor | None, tile: Tile, features: torch.Tensor, row: int,
              col: int, jump: int) -> torch.Tensor | None:
    """The crop of a :func:`_guide` under a tile's interior features ([1, C, h, w] at a
    layer of total stride ``jump``; first row and column ``row``, ``col`` of the whole map,
    :meth:`Tile.crop`), as [1, h * w]. Checks the alignment the crop relies on: the
    interior starts on a position of this layer (its offsets are multiples of the layer's
    stride) and the crop has the features' shape."""
    if guide is None:
        return None
    h, w = features.shape[2:]
    crop = guide[row:row + h, col:col + w]
    if (tile.y0 % jump or tile.x0 % jump or row * jump != tile.y0 or col * jump != tile.x0
            or tuple(crop.shape) != (h, w)):
        raise RuntimeError(f"tiles: the interior of {tile} is not aligned with the mask "
                           f"map {tuple(guide.shape)} of stride {jump} (crop "
                           f"{tuple(crop.shape)}, features {h}x{w})")
    return crop.reshape(1, h * w)


class _WithGradient(torch.autograd.Function):
    """A loss value whose gradient in ``x`` was computed already (by pass 2)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, total: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return total.clone()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return upstream * grad, None, None


def evaluate_terms(objective: Objective, x: torch.Tensor, tile: int
                   ) -> tuple[torch.Tensor, LossTerms]:
    """:meth:`Objective.evaluate_terms` computed over tiles of about ``tile`` px: the same
    total and terms (up to float summation order). When autograd wants the gradient in
    ``x`` (grad mode on, ``x.requires_grad``), pass 2 computes it here, and the returned
    total carries it, so ``total.backward()`` works as for the untiled objective."""
    ex, height, width = objective.extractor, x.shape[2], x.shape[3]
    content = objective.content.losses if objective.content else {}
    style = objective.style.losses if objective.style else {}
    layers = [*content, *style]
    check = objective.check
    # Each style layer's terms (one, or one per region group) and their region masks.
    guides = _region_guides(objective, x)
    jumps = receptive_field(ex, layers).jumps
    # Pass 1: the Grams, and the content and TV sums, without autograd.
    gram_sums: dict[str, list[torch.Tensor]] = {}
    squares = {n: torch.zeros((), device=x.device) for n in content}
    dy = dx = torch.zeros((), device=x.device)
    # Without pass 2 (no gradient wanted) pass 1 is all there is: it keeps ``tile``.
    wanted = torch.is_grad_enabled() and x.requires_grad
    first = first_pass_tile(tile, objective.precision) if wanted else tile
    count = len(plan(height, width, first, receptive_field(ex, layers)))
    for index, (t, pixels, crops) in enumerate(interiors(ex, x.detach(), layers, first,
                                                         objective.precision, check)):
        if objective.on_tile is not None:
            objective.on_tile(1, index + 1, count)
        for name in style:
            f, r, c = crops[name]
            if not f.numel():  # a last interior under one stride of this layer
                continue
            parts = [_gram(f, _positions(ex, name, x), _interior(g, t, f, r, c, jumps[name]))
                     for g in guides[name]]
            gram_sums[name] = parts if name not in gram_sums else [
                a + b for a, b in zip(gram_sums[name], parts, strict=True)]
        for name in content:
            f, r, c = crops[name]
            target = content[name].target.mean[:, :, r:r + f.shape[2], c:c + f.shape[3]]
            squares[name] = squares[name] + (f.float() - target).pow(2).sum()
        a, b = _tv_sums(pixels.float(), t, height, width)
        dy, dx = dy + a, dx + b
        crops = f = target = parts = None  # this tile's maps go before the next tile runs
    content_layers = {n: loss.target.loss(squares[n] / loss.target.mean.numel())
                      for n, loss in content.items()}
    # Per style layer, one residual per term (RegionStyleLoss: sum of share * loss).
    residuals = {n: [g - term.target.mean
                     for g, (_, term) in zip(gram_sums[n], _style_terms(loss), strict=True)]
                 for n, loss in style.items()}
    style_layers = {n: _region_sum([share * term.target.loss(res.pow(2).mean())
                                    for res, (share, term) in zip(
                                        residuals[n], _style_terms(loss), strict=True)])
                    for n, loss in style.items()}
    zero = torch.zeros((), device=x.device)
    content_total = objective.content.weighted(content_layers) if content else zero
    style_total = objective.style.weighted(style_layers) if style else zero
    tv = _tv(dy, dx, height, width)
    total = (objective.content_weight * content_total + objective.style_weight * style_total
             + objective.tv_weight * tv)
    terms = LossTerms(total, content_total, style_total, tv, content_layers, style_layers)
    if not wanted:
        return total, terms
    grad = _gradient(objective, x, tile, residuals, guides)
    total = _WithGradient.apply(x, total, grad)
    terms.total = total
    return total, terms


def _gradient(objective: Objective, x: torch.Tensor, tile: int,
              residuals: dict[str, list[torch.Tensor]],
              guides: dict[str, list[torch.Tensor | None]]) -> torch.Tensor:
    """Pass 2: d total / d x ([1, 3, H, W] float32), tile by tile, with the style residuals
    of the whole image fixed (per layer one per term, with its region mask's
    :func:`_guide` or None)."""
    ex, height, width = objective.extractor, x.shape[2], x.shape[3]
    content = objective.content.losses if objective.content else {}
    style = objective.style.losses if objective.style else {}
    layers = [*content, *style]
    field = receptive_field(ex, layers)
    # d total / dF at a layer is coef * (R + R^T) F: the weights, the blend's scale and the
    # style_loss backward's 2 s / C^2 (s = 1 / (C N)); summed over the layer's terms, a
    # region mask's term times its guide squared per position (s = 1 / C, the whole
    # image's 1 / sum m^2 being in the guide: G = F diag(guide^2) F^T / C).
    directions: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for name, loss in style.items():
        directions[name] = []
        for res, guide, (share, term) in zip(residuals[name], guides[name],
                                             _style_terms(loss), strict=True):
            c = res.shape[0]
            positions = _positions(ex, name, x) if guide is None else 1
            coef = (objective.style_weight * objective.style.layer_weights[name] * share
                    * term.target.scale * 2 / (c * positions) / c**2)
            directions[name].append((coef * (res + res.T), guide))
    content_coef = {n: objective.content_weight * objective.content.layer_weights[n]
                    * loss.target.scale / loss.target.mean.numel() for n, loss in content.items()}
    tv_dy = objective.tv_weight / (3 * (height - 1) * width) if height > 1 else 0.0
    tv_dx = objective.tv_weight / (3 * height * (width - 1)) if width > 1 else 0.0
    grad = torch.zeros_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)
    tiles = plan(height, width, tile, field)
    for index, t in enumerate(tiles):
        if objective.check is not None:
            objective.check()  # polls at once, between tiles (see interiors)
        if objective.on_tile is not None:
            objective.on_tile(2, index + 1, len(tiles))
        pixels = x.detach()[:, :, t.ty0:t.ty1, t.tx0:t.tx1].clone().requires_grad_(True)
        with torch.enable_grad():
            with autocast(x.device, objective.precision):
                feats = ex(pixels, layers, objective.check)
            # The whole image's gradient in each layer's interior features, handed to
            # autograd as that layer's upstream gradient (zero outside the interior): the
            # content term's 2 w (F - T), the style term's D = w (R + R^T) F. (Seeding the
            # maps directly, rather than backpropagating a surrogate through crops, spares a
            # zero-filled map and an addition per crop, and float32 copies of the maps.)
            outputs, seeds = [], []
            for name in dict.fromkeys(layers):
                f = feats[name]
                r0, r1 = (t.y0 - t.ty0) // field.jumps[name], (t.y1 - t.ty0) // field.jumps[name]
                c0, c1 = (t.x0 - t.tx0) // field.jumps[name], (t.x1 - t.tx0) // field.jumps[name]
                inner = f.detach()[:, :, r0:r1, c0:c1]
                if not inner.numel():  # a last interior under one stride of this layer
                    continue
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    inner = inner.float()
                    seed = torch.zeros_like(inner)
                    r, c = t.y0 // field.jumps[name], t.x0 // field.jumps[name]
                    if name in content:
                        target = content[name].target.mean[:, :, r:r + inner.shape[2],
                                                           c:c + inner.shape[3]]
                        seed += 2 * content_coef[name] * (inner - target)
                    if name in style:
                        seed += _direction(directions[name], inner, t, r, c,
                                           field.jumps[name]).view_as(inner)
                    full = torch.zeros_like(f)
                    full[:, :, r0:r1, c0:c1] = seed
                outputs.append(f)
                seeds.append(full)
            a, b = _tv_sums(pixels, t, height, width)
            outputs.append(tv_dy * a + tv_dx * b)
            seeds.append(torch.ones_like(outputs[-1]))
            (part,) = torch.autograd.grad(outputs, pixels, seeds)
        grad[:, :, t.ty0:t.ty1, t.tx0:t.tx1] += part
        # This tile's maps and graph go before the next tile runs.
        feats = outputs = seeds = part = f = inner = seed = full = target = None
    return grad


def _region_guides(objective: Objective, x: torch.Tensor
                   ) -> dict[str, list[torch.Tensor | None]]:
    """Per style layer, the :func:`_guide` of each of its terms' region masks (None for a
    term without one), in :func:`_style_terms` order."""
    style = objective.style.losses if objective.style else {}
    return {name: [_guide(term.weights, objective.extractor, name, x)
                   for _, term in _style_terms(loss)] for name, loss in style.items()}


def _region_sum(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of a layer's terms (as RegionStyleLoss adds them)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def _direction(terms: list[tuple[torch.Tensor, torch.Tensor | None]], features: torch.Tensor,
               tile: Tile, row: int, col: int, jump: int) -> torch.Tensor:
    """d total / dF of a tile's interior features ([1, C, h, w] -> [C, h * w] float32):
    sum over the layer's terms of D F, times the term's guide squared per position when it
    has a region mask (``terms``: (D, guide) pairs; see :func:`_gradient`)."""
    f = features.float().flatten(2)[0]
    out = None
    for matrix, guide in terms:
        part = matrix @ f
        crop = _interior(guide, tile, features, row, col, jump)
        if crop is not None:
            part = part * crop.square()
        out = part if out is None else out + part
    return out


__all__ = ["FIRST_PASS_SCALE", "Field", "Tile", "evaluate_terms", "feature_maps",
           "first_pass_tile", "grams", "interiors", "plan", "receptive_field"]
