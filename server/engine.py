"""The style-transfer engine: the output image is the variable being optimised.

    engine = StyleTransfer(arch="vgg16", weights="vgg16.pth")   # loads the network once
    result = engine.stylize(["cat.png"], ["starry.jpg"], StyleOptions(size=256))
    report = engine.compute_losses("candidate.png", ["cat.png"], ["starry.jpg"], gradient=True)

Images may be paths, encoded bytes or PIL images; they are decoded and validated by
``gramstyle.images.load_image``. Pixels are RGB in [0, 1] throughout. Every bad input raises a
``ValueError`` whose message starts with the field name (``content[0]``, ``style_layers``, ...).
The engine is thread-safe: the network is frozen and each call keeps its own state.

:class:`StyleTransfer` is the facade over the parts:

- :mod:`gramstyle.server.extractor`: the frozen VGG and its layer names;
- :mod:`gramstyle.server.losses`: content, style (Gram) and tv losses of one layer;
- :mod:`gramstyle.server.objective`: the checks against the network, the targets, the loss;
- :mod:`gramstyle.server.optimise`: start image, scales, L-BFGS/Adam, progress, cancelling;
- :mod:`gramstyle.server.colour`: PIL <-> tensor pixels and colour preservation.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from gramstyle import kernels
from gramstyle.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from gramstyle.options import DEVICES, MAX_ITERATIONS, MAX_SIZE, StyleOptions, check_choice
from gramstyle.results import LossReport, Progress, StylizeResult
from gramstyle.server.colour import to_tensor
from gramstyle.server.extractor import VGGFeatures
from gramstyle.server.objective import Objective, check_against_network
from gramstyle.server.optimise import Cancelled, optimise


def pick_device(device: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def _load(sources: Sequence[ImageSource] | ImageSource | None, field: str, max_pixels: int
          ) -> list[Image.Image]:
    """Decode one source or a sequence of them; errors name ``field[i]``."""
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, bytearray, memoryview, Image.Image)) or hasattr(
            sources, "__fspath__"):
        sources = [sources]
    return [load_image(s, f"{field}[{i}]", max_pixels) for i, s in enumerate(sources)]


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
        self.device = pick_device(device)
        self.extractor = VGGFeatures(arch, weights, pooling, seed).to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions are markedly faster in channels_last on CPU.
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

    @property
    def weights_name(self) -> str:
        """The name requests use for these weights: 'imagenet', 'random', or the file name
        of a weights path."""
        if self.weights in ("imagenet", "random"):
            return self.weights
        return os.path.basename(self.weights)

    def validate(self, options: StyleOptions | None, max_iterations: int = MAX_ITERATIONS
                 ) -> StyleOptions:
        """A checked copy of ``options`` (defaults when None) with canonical layer names.

        Checks the options' own bounds (``output long side <= max_size``, ``iterations *
        scales <= max_iterations``) and the layer names against this network. The checks
        that need the images (how many, their sizes) run when the images are there.
        """
        options = dataclasses.replace(options) if options is not None else StyleOptions()
        options.validated(max_size=self.max_size, max_iterations=max_iterations)
        return check_against_network(self.extractor, options)

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
            style: style image(s); may be empty when the style weight is 0.
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
        options = self.validate(options)
        contents = _load(content, "content", self.max_pixels)
        styles = _load(style, "style", self.max_pixels)
        if init_image is not None:
            if options.init not in (None, "image"):
                raise ValueError(f"init_image: given, but init is {options.init!r}; set init "
                                 f"to 'image' (or leave it unset) to start from it")
            init_image = load_image(init_image, "init_image", self.max_pixels)

        def objective_at(size: int) -> Objective:
            return Objective.build(self.extractor, contents, styles,
                                   dataclasses.replace(options, size=size))

        image, losses = optimise(objective_at, options, init_image=init_image,
                                 progress=progress, preview=preview, should_stop=should_stop,
                                 started=started)
        return StylizeResult(
            image=image, iterations=options.iterations * options.scales, losses=losses,
            elapsed_s=time.perf_counter() - started, backend=self.backend,
            device=str(self.device), arch=self.arch, weights=self.weights_name,
        )

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
        ``max(H, W)`` times the style scale. With ``gradient=True`` the report carries
        d total / d pixel as float32 [3, H, W] (pixels RGB in [0, 1]).
        """
        started = time.perf_counter()
        image = load_image(candidate, "candidate", self.max_pixels)
        if max(image.size) > self.max_size:
            raise ValueError(f"candidate: long side {max(image.size)} px is over the limit of "
                             f"{self.max_size} px")
        # The candidate's long side stands in for `size` (the style scale is checked against it).
        options = self.validate(dataclasses.replace(options or StyleOptions(),
                                                    size=max(16, *image.size)))
        objective = Objective.build(
            self.extractor, _load(content, "content", self.max_pixels),
            _load(style, "style", self.max_pixels), options, size=image.size,
            output_field="candidate")
        x = to_tensor(image, self.device).requires_grad_(gradient)
        grad = None
        with torch.set_grad_enabled(gradient):
            total, losses = objective.evaluate(x)
            if gradient:
                (grad,) = torch.autograd.grad(total, x)
                # float32, little-endian, C order: what LossReport.gradient_bytes promises.
                grad = grad[0].float().contiguous().cpu().numpy().astype("<f4", copy=False)
        return LossReport(
            losses=losses, width=image.width, height=image.height, backend=self.backend,
            device=str(self.device), elapsed_s=time.perf_counter() - started,
            gradient_shape=None if grad is None else tuple(grad.shape),
            gradient_bytes=None if grad is None else grad.tobytes(),
        )


__all__ = ["Cancelled", "StyleTransfer", "pick_device"]
