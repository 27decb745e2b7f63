"""The style-transfer engine: the output image is the variable being optimised.

    engine = StyleTransfer(arch="vgg16", weights="vgg16.pth")   # loads the network once
    result = engine.stylize(["cat.png"], ["starry.jpg"], StyleOptions(size=256))
    report = engine.compute_losses("candidate.png", ["cat.png"], ["starry.jpg"], gradient=True)

Images may be paths, encoded bytes or PIL images; they are decoded and validated by
``gramstyle.images.load_image``. Pixels are RGB in [0, 1] throughout. Every bad input raises a
:class:`~gramstyle.errors.FieldError` (a ``ValueError``) whose ``field`` names the input and
whose message starts with it (``content[0]``, ``style_layers``, ...).

Options are checked once: :meth:`StyleTransfer.validate` returns a frozen copy checked against
the limits and this network, and every method given such a copy (from the gRPC service, or
from a caller that validated it) uses it as it is.
The engine is thread-safe: the network is frozen and each call keeps its own state.

:class:`StyleTransfer` is the facade over the parts:

- :mod:`gramstyle.engine.extractor`: the frozen VGG and its layer names;
- :mod:`gramstyle.engine.losses`: content, style (Gram) and tv losses of one layer;
- :mod:`gramstyle.engine.objective`: the checks against the network, the targets, the loss;
- :mod:`gramstyle.engine.optimise`: start image, scales, L-BFGS/Adam, progress, cancelling;
- :mod:`gramstyle.engine.colour`: PIL <-> tensor pixels and colour preservation.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from gramstyle import kernels
from gramstyle.engine import footprint
from gramstyle.engine import precision as _precision
from gramstyle.engine.extractor import VGGFeatures
from gramstyle.engine.masks import REGION_FIELD, SOURCE_FIELD
from gramstyle.engine.objective import Objective, resolve_layers
from gramstyle.engine.optimise import optimise
from gramstyle.engine.stop import Cancelled, StopCheck
from gramstyle.engine.target_cache import TargetCache
from gramstyle.engine.tensors import to_tensor
from gramstyle.errors import FieldError
from gramstyle.host_memory import available_memory
from gramstyle.images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from gramstyle.inputs import input_named, skipped
from gramstyle.options import (
    DEFAULT_ARCH,
    DEFAULT_DEVICE,
    DEFAULT_POOLING,
    DEFAULT_WEIGHTS,
    DEVICES,
    MAX_ITERATIONS,
    MAX_SIZE,
    StyleOptions,
    check_choice,
    schedule,
)
from gramstyle.results import LossReport, Progress, StylizeResult

#: Tells engines apart in a shared target cache's keys.
_ENGINE_IDS = itertools.count()


def pick_device(device: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FieldError("device", "'cuda' was asked for but torch sees no CUDA device", device)
    return torch.device(device)


#: A decoder with :func:`gramstyle.images.load_image`'s signature (the gRPC service passes
#: :meth:`gramstyle.decode_process.DecodePool.load_image`, which decodes large images in a
#: child process it kills when ``check`` raises).
Decode = Callable[..., Image.Image]


def _load(sources: Sequence[ImageSource] | ImageSource | None, field: str, max_pixels: int,
          check: Callable[[float], None] | None = None, decode: Decode = load_image
          ) -> list[Image.Image]:
    """Decode one source or a sequence of them; errors name ``field[i]``. ``check`` runs
    between the decoding steps of each image (see :func:`gramstyle.images.load_image`)."""
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, bytearray, memoryview, Image.Image)) or hasattr(
            sources, "__fspath__"):
        sources = [sources]
    return [decode(s, f"{field}[{i}]", max_pixels, check=check)
            for i, s in enumerate(sources)]


def _load_masks(sources: Sequence[ImageSource | None] | None, field: str, max_pixels: int,
                check: Callable[[float], None] | None = None, decode: Decode = load_image
                ) -> list[Image.Image | None]:
    """Decode optional masks, one per style (None, or empty bytes as on the wire: no mask
    for that style); errors name ``field[i]``. None or an empty sequence: no masks at all."""
    if sources is None:
        return []
    if isinstance(sources, (str, bytes, bytearray, memoryview, Image.Image)) or hasattr(
            sources, "__fspath__"):
        raise FieldError(field, f"give a sequence with one mask per style image (None for "
                         f"a style without one), not a single {type(sources).__name__}")
    entry = input_named(field)
    return [None if skipped(entry, s) else decode(s, f"{field}[{i}]", max_pixels, check=check)
            for i, s in enumerate(sources)]


def _checker(should_stop: Callable[[], bool] | None) -> StopCheck | None:
    """A check that raises :class:`Cancelled` once ``should_stop()`` is True. Every stage
    announces its work to it -- decoding and resizing images, each network layer, each band
    of a large layer, forward and backward -- and it polls ``should_stop`` whenever that adds
    up to a twentieth of a second (:class:`gramstyle.engine.stop.StopCheck`): a stop is seen
    within a fraction of a second at any stage, while small images are polled once per
    optimisation step, as before."""
    if should_stop is None:
        return None
    return StopCheck(should_stop, lambda: Cancelled("stopped before the run finished"))


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
        target_cache: where the content features and style Gram targets of each image are
            kept across calls (:mod:`gramstyle.engine.target_cache`); several engines may
            share one. Default: a private cache of ``DEFAULT_TARGET_CACHE_MB`` MiB;
            ``TargetCache(0)`` turns caching off.
        memory_limit: bytes a run may take, for ``tile`` "auto" (tile when the untiled run
            would not fit); default: what is free when each run starts
            (:meth:`memory_available`).
    """

    def __init__(self, arch: str = DEFAULT_ARCH, weights: str = DEFAULT_WEIGHTS,
                 pooling: str = DEFAULT_POOLING, device: str = DEFAULT_DEVICE,
                 max_size: int = MAX_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0,
                 target_cache: TargetCache | None = None, memory_limit: int | None = None):
        self.device = pick_device(device)
        #: Bytes a run may take, for ``tile`` "auto"; None: what the device has free when
        #: the run starts (:meth:`memory_available`).
        self.memory_limit = memory_limit
        self.extractor = VGGFeatures(arch, weights, pooling, seed).to(self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions are markedly faster in channels_last on CPU.
            self.extractor = self.extractor.to(memory_format=torch.channels_last)
        self.arch, self.weights, self.pooling = arch, weights, pooling
        self.max_size, self.max_pixels = max_size, max_pixels
        self.target_cache = target_cache if target_cache is not None else TargetCache()
        self.model_key = (arch, weights, pooling, seed, str(self.device), next(_ENGINE_IDS))
        self._bf16_network: VGGFeatures | None = None
        self._lock = threading.Lock()

    @property
    def layer_names(self) -> list[str]:
        return list(self.extractor.layer_names)

    @property
    def backend(self) -> str:
        """The Gram/style-loss kernel backend: 'cpu', 'cuda' or 'einsum'."""
        return kernels.backend()

    def network(self, precision: str) -> VGGFeatures:
        """The extractor to run in ``precision`` ('fp32' or 'bf16').

        For bf16 a twin whose convolution weights are stored in bf16 (made on first use,
        then kept): bf16 autocast caches its casts only for weights that require grad, so
        with frozen fp32 weights it would convert every weight on every forward pass -- 80
        MB for VGG19, a sizeable part of a bf16 iteration on a CPU. The results are the same:
        autocast runs the convolutions on bf16 copies either way, and the ImageNet
        normalisation stays float32.
        """
        if precision != "bf16":
            return self.extractor
        with self._lock:
            if self._bf16_network is None:
                twin = copy.deepcopy(self.extractor)
                twin.layers.to(torch.bfloat16)  # mean/std belong to the parent: float32
                self._bf16_network = twin
            return self._bf16_network

    @property
    def auto_precision(self) -> str:
        """What precision 'auto' (the default) runs in on this engine's device: 'bf16' where
        the hardware runs bf16 natively, else 'fp32' (:mod:`gramstyle.engine.precision`)."""
        return _precision.resolve_precision("auto", self.device)

    @property
    def weights_name(self) -> str:
        """The name requests use for these weights: 'imagenet', 'random', or the file name
        of a weights path."""
        if self.weights in ("imagenet", "random"):
            return self.weights
        return os.path.basename(self.weights)

    def validate(self, options: StyleOptions | None, max_iterations: int = MAX_ITERATIONS
                 ) -> StyleOptions:
        """A frozen, checked copy of ``options`` (defaults when None) with canonical layer
        names and precision 'auto' resolved to 'fp32' or 'bf16' for this device.

        Checks the options' own bounds (:meth:`StyleOptions.validated`: ``output long side
        <= max_size``, ``iterations * scales <= max_iterations``) and the layer names against
        this network. Options this engine already checked (within these limits) are returned
        as they are, and options validated elsewhere (the codec, the CLI) are not checked
        against their bounds again. The checks that need the images (how many, their sizes)
        run when the images are there.

        ``tile`` is kept as given; "auto" is resolved when the images are there
        (:meth:`fit_tile`, against the memory available; the gRPC service resolves it from
        its own estimate and limits before the run: docs/tiling.md).
        """
        options = options if options is not None else StyleOptions()
        options = options.validated(max_size=self.max_size, max_iterations=max_iterations)
        if options.network == self.model_key:
            return options
        return options.resolved(
            self.model_key, **resolve_layers(self.extractor, options),
            precision=_precision.resolve_precision(options.precision, self.device))

    def memory_available(self) -> int:
        """Bytes a run may take now: ``memory_limit`` when set, else the device's free
        memory (CUDA: ``torch.cuda.mem_get_info``; CPU:
        :func:`gramstyle.host_memory.available_memory`, the kernel's MemAvailable within the
        container's limit)."""
        if self.memory_limit is not None:
            return self.memory_limit
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return available_memory()

    def fit_tile(self, options: StyleOptions, inputs: dict[str, list[Image.Image]],
                 gradient: bool | None = None) -> StyleOptions:
        """``options`` with ``tile`` "auto" resolved for these decoded ``inputs`` ("content"
        and "style", and "candidate" for a ComputeLosses with ``gradient`` True or False;
        None: a Stylize -- :meth:`stylize` asks for each scale, as a one-scale run of that
        scale's size and iterations): "off" when the untiled run's estimate
        (:mod:`gramstyle.engine.footprint`) fits :meth:`memory_available`, else the largest
        tile whose estimate fits -- or, when none does, the smallest (the engine has no one
        to refuse to: the run may still fit, the estimate being an upper bound). Other
        values are returned as they are."""
        if options.tile != "auto":
            return options
        held = 4 * sum(i.width * i.height for images in inputs.values() for i in images)

        def estimate_of(checked: StyleOptions) -> footprint.Estimate:
            phases = (footprint.stylize_phases(self.extractor, checked, inputs, held)
                      if gradient is None else
                      footprint.losses_phases(self.extractor, checked, inputs, held, gradient))
            return footprint.peak(phases)

        def sides() -> list[int]:
            return footprint.tile_sides(self.extractor, options, bool(inputs["content"]),
                                        bool(inputs["style"]), options.size)
        return footprint.choose_tile(estimate_of, options, sides, self.memory_available())[1]

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
        style_mask: Sequence[ImageSource | None] | None = None,
        style_source_mask: Sequence[ImageSource | None] | None = None,
        decode: Decode = load_image,
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
            should_stop: polled before every iteration, and during every stage before and
                inside it (decoding, resizing, target features, network passes); when it
                returns True the run stops within a fraction of a second and
                :class:`Cancelled` is raised (its ``iterations`` says how many ran).
            style_mask: one region mask per style image (None, or empty bytes, for a style
                without one):
                greyscale, white where that style applies on the output, black where not
                (guided Gram matrices; :mod:`gramstyle.engine.masks`). Resized to the
                output, so it must have the output's aspect ratio. A style without a region
                mask applies everywhere, as without masks.
            style_source_mask: likewise, one source mask per style image: the part of the
                style image its statistics are taken from (same aspect ratio as it).
            decode: decodes each image (:data:`Decode`); the gRPC service's decodes large
                images in a child process that is killed once ``should_stop`` says stop.

        Returns:
            The output image (the content image's aspect ratio, long side ``options.size``)
            and its stats: ``iterations`` run, ``stop_reason`` ('converged' when the loss
            stopped improving, see ``options.tolerance``, or 'cap') and the ``precision``
            the network ran in.
        """
        started = time.perf_counter()
        options = self.validate(options)
        check = _checker(should_stop)
        contents = _load(content, "content", self.max_pixels, check, decode)
        styles = _load(style, "style", self.max_pixels, check, decode)
        region_masks = _load_masks(style_mask, REGION_FIELD, self.max_pixels, check, decode)
        source_masks = _load_masks(style_source_mask, SOURCE_FIELD, self.max_pixels, check,
                                   decode)
        if init_image is not None:
            if options.init not in (None, "image"):
                raise FieldError("init_image", f"given, but init is {options.init!r}; set "
                                 f"init to 'image' (or leave it unset) to start from it")
            init_image = decode(init_image, "init_image", self.max_pixels, check=check)
        # tile "auto" is resolved scale by scale: the coarse scales of a big output often fit
        # untiled, and run faster so.
        auto = options.tile == "auto"
        sized = {"content": contents, "style": styles,
                 "style_mask": [m for m in region_masks if m is not None],
                 "style_source_mask": [m for m in source_masks if m is not None]}

        caps = dict(schedule(options.size, options.scales, options.iterations))

        def objective_at(size: int) -> Objective:
            at = options.resolved(options.network, size=size, scales=1, iterations=caps[size])
            if auto:
                at = self.fit_tile(at, sized)
            return Objective.build(self.network(options.precision), contents, styles, at,
                                   cache=self.target_cache, model_key=self.model_key,
                                   check=check, style_masks=region_masks,
                                   style_source_masks=source_masks)

        image, losses, run = optimise(objective_at, options, init_image=init_image,
                                      progress=progress, preview=preview,
                                      should_stop=check.poll if check else None,
                                      started=started)
        return StylizeResult(
            image=image, iterations=run.iterations, losses=losses,
            elapsed_s=time.perf_counter() - started, backend=self.backend,
            device=str(self.device), arch=self.arch, weights=self.weights_name,
            precision=options.precision, stop_reason=run.stop_reason,
        )

    def compute_losses(
        self,
        candidate: ImageSource,
        content: Sequence[ImageSource] | ImageSource | None,
        style: Sequence[ImageSource] | ImageSource | None,
        options: StyleOptions | None = None,
        *,
        gradient: bool = False,
        should_stop: Callable[[], bool] | None = None,
        style_mask: Sequence[ImageSource | None] | None = None,
        style_source_mask: Sequence[ImageSource | None] | None = None,
        decode: Decode = load_image,
    ) -> LossReport:
        """Loss terms of ``candidate`` against the targets, without optimising.

        Content images are resized to the candidate's exact size, style images to long side
        ``max(H, W)`` times the style scale. With ``gradient=True`` the report carries
        d total / d pixel as float32 [3, H, W] (pixels RGB in [0, 1]). The candidate's size
        is checked against ``max_size`` from its header, before it is decoded.
        ``should_stop``, ``style_mask``, ``style_source_mask`` and ``decode`` work as in
        :meth:`stylize` (region masks are resized to the candidate).
        """
        started = time.perf_counter()
        check = _checker(should_stop)
        image = decode(candidate, "candidate", self.max_pixels, max_side=self.max_size,
                           check=check)
        # The candidate's long side stands in for `size` (the style scale is checked against
        # it); options validated with that size already (the service's) are used as they are.
        side = max(16, *image.size)
        if options is None or options.size != side:
            options = dataclasses.replace(options or StyleOptions(), size=side)
        options = self.validate(options)
        contents = _load(content, "content", self.max_pixels, check, decode)
        styles = _load(style, "style", self.max_pixels, check, decode)
        options = self.fit_tile(options, {"candidate": [image], "content": contents,
                                          "style": styles}, gradient)
        objective = Objective.build(
            self.network(options.precision), contents, styles, options, size=image.size,
            output_field="candidate", cache=self.target_cache, model_key=self.model_key,
            check=check, keep_pixels=False,
            style_masks=_load_masks(style_mask, REGION_FIELD, self.max_pixels, check, decode),
            style_source_masks=_load_masks(style_source_mask, SOURCE_FIELD, self.max_pixels,
                                           check, decode))
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
            precision=options.precision,
        )


__all__ = ["Cancelled", "StyleTransfer", "pick_device"]
