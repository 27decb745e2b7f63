"""The style-transfer engine: the output image is the variable being optimised.

    engine = StyleTransfer(arch="vgg16", weights="vgg16.pth")   # loads the network once
    result = engine.stylize(["cat.png"], ["starry.jpg"], StyleOptions(size=256))
    report = engine.compute_losses("candidate.png", ["cat.png"], ["starry.jpg"], gradient=True)

Images may be paths, encoded bytes or PIL images; they are decoded and validated by
``gramstyle.images.load_image``. Pixels are RGB in [0, 1] throughout. Every bad input raises a
``ValueError`` whose message starts with the field name (``content[0]``, ``style_layers``, ...).
The engine is thread-safe: the network is frozen and each call keeps its own state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from gramstyle import kernels
from gramstyle.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, resize_long_side
from gramstyle.server.extractor import VGGFeatures
from gramstyle.server.losses import ContentLoss, StyleLoss, tv_loss, weighted_sum
from gramstyle.server.options import (
    ARCHS,
    DEVICES,
    MAX_ITERATIONS,
    MAX_SIZE,
    POOLINGS,
    StyleOptions,
    check_choice,
    check_weights,
    scale_sizes,
)


class Cancelled(Exception):
    """Raised by :meth:`StyleTransfer.stylize` when ``should_stop()`` returned True."""


@dataclass
class Losses:
    """Loss terms of one image. ``content``, ``style`` and ``tv`` are unweighted;
    ``total = content_weight*content + style_weight*style + tv_weight*tv``.
    ``content_layers``/``style_layers`` hold each layer's unweighted relative loss."""

    total: float
    content: float
    style: float
    tv: float
    content_layers: dict[str, float]
    style_layers: dict[str, float]


@dataclass
class Progress:
    """The state after ``iteration`` of ``iterations`` optimiser steps (0: the initial image).

    ``losses`` are those of that image; ``image`` is the image itself, only when the caller
    asked for previews."""

    iteration: int
    iterations: int
    losses: Losses
    elapsed_s: float
    image: Image.Image | None = None


@dataclass
class StylizeResult:
    image: Image.Image
    iterations: int
    #: Losses of the returned image (before colour preservation).
    losses: Losses
    elapsed_s: float
    backend: str
    device: str


@dataclass
class LossReport:
    losses: Losses
    #: d total / d pixel, float32 [3, H, W], pixels RGB in [0, 1]; None unless asked for.
    gradient: np.ndarray | None = None


# RGB <-> YIQ, for colour preservation (luminance-only transfer).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def preserve_colors(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Luminance of ``stylized`` with the chroma (I, Q) of ``content``; both [1,3,H,W]."""
    to_yiq, to_rgb = _RGB_TO_YIQ.to(stylized), _YIQ_TO_RGB.to(stylized)
    y = torch.einsum("ij,bjhw->bihw", to_yiq, stylized)[:, :1]
    iq = torch.einsum("ij,bjhw->bihw", to_yiq, content)[:, 1:]
    return torch.einsum("ij,bjhw->bihw", to_rgb, torch.cat([y, iq], 1)).clamp(0, 1)


def pick_device(device: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """PIL RGB -> float32 [1,3,H,W] in [0,1]."""
    return (pil_to_tensor(image).float() / 255).unsqueeze(0).to(device)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """[1,3,H,W] (any range) -> PIL RGB, clamped to [0,1]."""
    return to_pil_image(tensor.detach()[0].float().clamp(0, 1).cpu())


@dataclass
class _Problem:
    """One run's fixed data: targets and losses, the content pixels, the output size."""

    content_loss: ContentLoss | None
    style_loss: StyleLoss | None
    layers: set[str]
    contents: list[torch.Tensor]
    styles: list[torch.Tensor]
    height: int
    width: int


class StyleTransfer:
    """Gatys-style neural style transfer on a frozen VGG feature extractor.

    Args:
        arch: 'vgg19' or 'vgg16'.
        weights: 'imagenet', 'random' or a path to a VGG (or VGG ``features``) state_dict.
        pooling: 'max' or 'avg'.
        device: 'auto', 'cpu' or 'cuda'.
        max_size: largest allowed output long side, in pixels.
        max_pixels: largest allowed width*height of any input image (checked before decoding).
        seed: seed of the random weights (``weights='random'``).
    """

    def __init__(self, arch: str = "vgg19", weights: str = "imagenet", pooling: str = "max",
                 device: str = "auto", max_size: int = MAX_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0):
        check_choice("arch", arch, ARCHS)
        check_choice("pooling", pooling, POOLINGS)
        self.device = pick_device(device)
        self.extractor = VGGFeatures(arch, weights, pooling, seed).to(self.device)
        if self.device.type == "cpu":
            self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self.arch, self.weights, self.pooling = arch, weights, pooling
        self.max_size, self.max_pixels = max_size, max_pixels

    @property
    def layer_names(self) -> list[str]:
        return list(self.extractor.layer_names)

    @property
    def backend(self) -> str:
        """The Gram/style-loss kernel backend: 'cpu', 'cuda' or 'einsum'."""
        return kernels.backend()

    # ------------------------------------------------------------------ set-up

    def _options(self, options: StyleOptions | None) -> StyleOptions:
        options = dataclasses.replace(options) if options is not None else StyleOptions()
        options.validated(max_size=self.max_size, max_iterations=MAX_ITERATIONS)
        options.content_layers = self.extractor.resolve_all(options.content_layers,
                                                            "content_layers")
        options.style_layers = self.extractor.resolve_all(options.style_layers, "style_layers")
        return options

    def _load(self, sources: Sequence[ImageSource] | None, field: str) -> list[Image.Image]:
        if sources is None:
            return []
        if isinstance(sources, (str, bytes, bytearray, memoryview, Image.Image)) or hasattr(
                sources, "__fspath__"):
            sources = [sources]
        return [load_image(s, f"{field}[{i}]", self.max_pixels) for i, s in enumerate(sources)]

    def _autocast(self, options: StyleOptions):
        if options.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, contents: list[Image.Image], styles: list[Image.Image],
                 options: StyleOptions, size: tuple[int, int] | None = None,
                 output_field: str = "size") -> _Problem:
        """Resize the images, compute the target features and build the losses.

        ``size`` = (width, height) of the output; by default the first content (or style)
        image resized to long side ``options.size``.
        """
        needs_content = options.content_weight > 0 and options.content_layers
        needs_style = options.style_weight > 0 and options.style_layers
        if needs_content and not contents:
            raise ValueError("content: at least one content image is needed when "
                             "content_weight > 0 (set content_weight to 0 for pure texture "
                             "synthesis)")
        if needs_style and not styles:
            raise ValueError("style: at least one style image is needed when style_weight > 0 "
                             "(set style_weight to 0 for pure feature inversion)")
        if not contents and not styles:
            raise ValueError("content/style: give at least one content or style image")
        content_blend = check_weights("content_blend_weights", options.content_blend_weights,
                                      len(contents))
        style_blend = check_weights("style_blend_weights", options.style_blend_weights,
                                    len(styles))
        if options.preserve_colors and not contents:
            raise ValueError("preserve_colors: needs a content image to take the colours from")
        if size is None:
            size = resize_long_side(contents[0] if contents else styles[0], options.size).size
        width, height = size
        style_side = max(16, round(max(width, height) * options.style_scale))
        # Every feature map must keep at least one pixel: check before running the network.
        layer, need = self.extractor.min_side((options.content_layers if contents else ())
                                              + (options.style_layers if styles else ()))
        if min(width, height) < need:
            raise ValueError(f"{output_field}: the image would be {width}x{height} px, too "
                             f"small for layer {layer} (its short side must be at least {need} "
                             f"px); use a larger size or shallower layers")
        if styles:
            layer, need = self.extractor.min_side(options.style_layers)
            for i, s in enumerate(styles):
                w, h = resize_long_side(s, style_side).size
                if min(w, h) < need:
                    raise ValueError(f"style[{i}]: resized to {w}x{h} px (long side "
                                     f"size*style_scale = {style_side}), too small for layer "
                                     f"{layer} (short side at least {need} px); raise "
                                     f"style_scale or size")
        content_t = [to_tensor(c.resize(size, Image.Resampling.LANCZOS)
                               if c.size != size else c, self.device) for c in contents]
        style_t = [to_tensor(resize_long_side(s, style_side), self.device) for s in styles]

        content_layers = list(options.content_layers) if contents else []
        style_layers = list(options.style_layers) if styles else []
        content_loss = style_loss = None
        with torch.no_grad(), self._autocast(options):
            if content_layers:
                feats = [self.extractor(c, content_layers) for c in content_t]
                content_loss = ContentLoss({n: [f[n] for f in feats] for n in content_layers},
                                           options.content_layer_weights, content_blend)
            if style_layers:
                feats = [self.extractor(s, style_layers) for s in style_t]
                style_loss = StyleLoss({n: [f[n] for f in feats] for n in style_layers},
                                       options.style_layer_weights, style_blend)
        return _Problem(content_loss, style_loss, set(content_layers) | set(style_layers),
                        content_t, style_t, height, width)

    def _evaluate(self, problem: _Problem, x: torch.Tensor, options: StyleOptions
                  ) -> tuple[torch.Tensor, Losses]:
        """Total loss (a 0-dim tensor, differentiable in x) and all its terms as floats."""
        with self._autocast(options):
            feats = self.extractor(x, problem.layers)
            content_layers = problem.content_loss(feats) if problem.content_loss else {}
            style_layers = problem.style_loss(feats) if problem.style_loss else {}
        content = (weighted_sum(content_layers, problem.content_loss.layer_weights)
                   if content_layers else torch.zeros((), device=x.device))
        style = (weighted_sum(style_layers, problem.style_loss.layer_weights)
                 if style_layers else torch.zeros((), device=x.device))
        tv = tv_loss(x)
        total = (options.content_weight * content + options.style_weight * style
                 + options.tv_weight * tv)
        losses = Losses(
            total=total.item(), content=content.item(), style=style.item(), tv=tv.item(),
            content_layers={n: v.item() for n, v in content_layers.items()},
            style_layers={n: v.item() for n, v in style_layers.items()},
        )
        return total, losses

    def _initial(self, problem: _Problem, options: StyleOptions,
                 init_image: Image.Image | None) -> torch.Tensor:
        size = (problem.width, problem.height)
        if options.init == "content":
            if not problem.contents:
                raise ValueError("init: 'content' needs a content image; use noise or style")
            return problem.contents[0].clone()
        if options.init == "style":
            if not problem.styles:
                raise ValueError("init: 'style' needs a style image; use noise or content")
            image = to_image(problem.styles[0]).resize(size, Image.Resampling.LANCZOS)
            return to_tensor(image, self.device)
        if options.init == "image":
            if init_image is None:
                raise ValueError("init_image: init is 'image' but no init image was given")
            return to_tensor(init_image.resize(size, Image.Resampling.LANCZOS), self.device)
        generator = torch.Generator().manual_seed(options.seed)
        return torch.rand(1, 3, problem.height, problem.width,
                          generator=generator).to(self.device)

    def _finish(self, x: torch.Tensor, problem: _Problem, options: StyleOptions) -> Image.Image:
        x = x.detach().clamp(0, 1)
        if options.preserve_colors:
            x = preserve_colors(x, problem.contents[0])
        return to_image(x)

    # ------------------------------------------------------------------ public API

    def stylize(
        self,
        content: Sequence[ImageSource] | ImageSource | None,
        style: Sequence[ImageSource] | ImageSource | None,
        options: StyleOptions | None = None,
        *,
        init_image: ImageSource | None = None,
        progress: Callable[[Progress], None] | None = None,
        preview: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> StylizeResult:
        """Optimise an image so its features match ``content`` and its Grams match ``style``.

        Args:
            content: content image(s); may be empty when content_weight is 0.
            style: style image(s); may be empty when style_weight is 0.
            options: see :class:`StyleOptions`; defaults when None.
            init_image: the start image when ``options.init == 'image'``.
            progress: called with the state after 0 iterations (the initial image), then
                every ``options.progress_every`` iterations, and after the last one. With
                ``options.scales > 1`` iterations count across all scales.
            preview: attach the current image to each Progress.
            should_stop: polled before every iteration; when it returns True the run stops
                and :class:`Cancelled` is raised.

        Returns:
            The output image (the content image's aspect ratio, long side ``options.size``)
            and its stats.
        """
        started = time.perf_counter()
        options = self._options(options)
        contents, styles = self._load(content, "content"), self._load(style, "style")
        init = None
        if init_image is not None:
            if options.init not in (None, "image"):
                raise ValueError(f"init_image: given, but init is {options.init!r}; set init "
                                 f"to 'image' (or leave it unset) to start from it")
            init = load_image(init_image, "init_image", self.max_pixels)
        if options.init is None:
            options.init = "image" if init is not None else "content" if contents else "noise"
        sizes = scale_sizes(options.size, options.scales)
        n = options.iterations * len(sizes)

        def report(done: int, losses: Losses, image: Image.Image | None) -> None:
            if progress is not None:
                progress(Progress(done, n, losses, time.perf_counter() - started, image))

        x = None
        for k, size in enumerate(sizes):
            problem = self._prepare(contents, styles, dataclasses.replace(options, size=size))
            if x is None:
                x = self._initial(problem, options, init)
            else:  # coarse-to-fine: start from the previous scale's result, upsampled
                x = F.interpolate(x.detach(), size=(problem.height, problem.width),
                                  mode="bicubic", align_corners=False).clamp(0, 1)
            x = x.detach().requires_grad_(True)
            self._optimise(problem, x, options, k * options.iterations, n,
                           report if progress is not None else None, preview, should_stop)

        with torch.no_grad():
            final = x.detach().clamp(0, 1)
            _, losses = self._evaluate(problem, final, options)
        image = self._finish(final, problem, options)
        report(n, losses, image if preview else None)
        return StylizeResult(
            image=image, iterations=n, losses=losses,
            elapsed_s=time.perf_counter() - started, backend=self.backend,
            device=str(self.device),
        )

    def _optimise(self, problem: _Problem, x: torch.Tensor, options: StyleOptions, offset: int,
                  total: int, report: Callable | None, preview: bool,
                  should_stop: Callable[[], bool] | None) -> None:
        """Run ``options.iterations`` optimiser steps on ``x`` in place.

        ``offset`` is the number of steps done at coarser scales; progress is reported when
        the overall count is a multiple of ``options.progress_every``.
        """
        if options.optimizer == "lbfgs":
            optimizer = torch.optim.LBFGS([x], lr=options.learning_rate or 1.0, max_iter=1,
                                          history_size=100, tolerance_grad=0.0,
                                          tolerance_change=0.0)
        else:
            optimizer = torch.optim.Adam([x], lr=options.learning_rate or 0.02)
        last: list[Losses] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss, losses = self._evaluate(problem, x, options)
            loss.backward()
            # The extractor runs channels_last on CPU; L-BFGS needs a flat-viewable gradient.
            x.grad = x.grad.contiguous()
            last.append(losses)
            return loss

        for done in range(offset, offset + options.iterations):
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped after {done} of {total} iterations")
            due = report is not None and done % options.progress_every == 0
            # The preview is taken before the step so it matches the losses the step computes.
            image = self._finish(x, problem, options) if due and preview else None
            last.clear()
            optimizer.step(closure)
            with torch.no_grad():
                # Keep pixels displayable: the loss of the clamped image is what we return.
                x.clamp_(0, 1)
            if not np.isfinite(last[0].total):
                raise ValueError(f"learning_rate: the optimisation diverged (total loss "
                                 f"{last[0].total} at iteration {done + 1}); lower "
                                 f"learning_rate or the loss weights")
            if due:
                report(done, last[0], image)

    def compute_losses(
        self,
        candidate: ImageSource,
        content: Sequence[ImageSource] | ImageSource | None,
        style: Sequence[ImageSource] | ImageSource | None,
        options: StyleOptions | None = None,
        *,
        gradient: bool = False,
    ) -> LossReport:
        """Loss terms of ``candidate`` against the targets, without optimising.

        Content images are resized to the candidate's exact size, style images to long side
        ``max(H, W) * style_scale``. With ``gradient=True`` the report carries
        d total / d pixel as float32 [3, H, W] (pixels RGB in [0, 1]).
        """
        image = load_image(candidate, "candidate", self.max_pixels)
        if max(image.size) > self.max_size:
            raise ValueError(f"candidate: long side {max(image.size)} px is over the limit of "
                             f"{self.max_size} px")
        # The candidate's long side stands in for `size` (style_scale is checked against it).
        options = dataclasses.replace(options or StyleOptions(), size=max(16, *image.size))
        options = self._options(options)
        contents, styles = self._load(content, "content"), self._load(style, "style")
        problem = self._prepare(contents, styles, options, size=image.size,
                                output_field="candidate")
        x = to_tensor(image, self.device).requires_grad_(gradient)
        with torch.set_grad_enabled(gradient):
            total, losses = self._evaluate(problem, x, options)
            if not gradient:
                return LossReport(losses)
            (grad,) = torch.autograd.grad(total, x)
        return LossReport(losses, grad[0].float().cpu().numpy())
