"""The optimisation loop: the output pixels are the variable, the objective is fixed.

    image, losses = optimise(objective_at, options, progress=print)

For each scale of the coarse-to-fine pyramid (:func:`gramstyle.options.scale_sizes`): build
the objective at that size, start from the start image (first scale) or the previous result
upsampled, and take ``options.iterations`` L-BFGS or Adam steps, clamping the pixels to
[0, 1] after each. Progress is reported, and ``should_stop`` polled, between steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from gramstyle.options import StyleOptions, scale_sizes
from gramstyle.results import Losses, Progress
from gramstyle.server.colour import output_image, to_image, to_tensor
from gramstyle.server.objective import Objective

#: Called with (iterations done over all scales, losses of the current image, preview).
Report = Callable[[int, Losses, Image.Image | None], None]


class Cancelled(Exception):
    """Raised by :func:`optimise` (and ``StyleTransfer.stylize``) when ``should_stop()``
    returned True."""


def start_image(objective: Objective, init: str | None, seed: int,
                init_image: Image.Image | None = None) -> torch.Tensor:
    """The first scale's start pixels, [1, 3, H, W] RGB in [0, 1] at the objective's size.

    ``init``: 'content', 'style', 'image' (``init_image``), 'noise' (uniform, seeded by
    ``seed``), or None: 'image' when an init image is given, else 'content' when there is a
    content image, else 'noise'.
    """
    if init is None:
        init = "image" if init_image is not None else "content" if objective.contents else "noise"
    size = (objective.width, objective.height)
    if init == "content":
        if not objective.contents:
            raise ValueError("init: 'content' needs a content image; use noise or style")
        return objective.contents[0].clone()
    if init == "style":
        if not objective.styles:
            raise ValueError("init: 'style' needs a style image; use noise or content")
        image = to_image(objective.styles[0]).resize(size, Image.Resampling.LANCZOS)
        return to_tensor(image, objective.device)
    if init == "image":
        if init_image is None:
            raise ValueError("init_image: init is 'image' but no init image was given")
        return to_tensor(init_image.resize(size, Image.Resampling.LANCZOS), objective.device)
    # Drawn on the CPU so that a seed gives the same image on every device.
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, objective.height, objective.width,
                      generator=generator).to(objective.device)


def make_optimizer(x: torch.Tensor, options: StyleOptions) -> torch.optim.Optimizer:
    """L-BFGS (one step per call, history 100, no early stop) or Adam on ``x``; the learning
    rate defaults to 1.0 and 0.02 (pixels in [0, 1])."""
    if options.optimizer == "lbfgs":
        return torch.optim.LBFGS([x], lr=options.learning_rate or 1.0, max_iter=1,
                                 history_size=100, tolerance_grad=0.0, tolerance_change=0.0)
    return torch.optim.Adam([x], lr=options.learning_rate or 0.02)


def optimise(
    objective_at: Callable[[int], Objective],
    options: StyleOptions,
    *,
    init_image: Image.Image | None = None,
    progress: Callable[[Progress], None] | None = None,
    preview: bool = False,
    should_stop: Callable[[], bool] | None = None,
    started: float | None = None,
) -> tuple[Image.Image, Losses]:
    """Optimise the output image; return it and its losses (before colour preservation).

    Args:
        objective_at: the objective at output long side ``size`` (px), for each scale.
        options: validated options (``StyleTransfer.validate``).
        init_image: the start image for init 'image' (or unset init).
        progress: called after 0 iterations (the start image), every
            ``options.progress_every`` iterations and after the last one; iterations count
            across all scales.
        preview: attach the current image (colours preserved if asked) to each Progress.
        should_stop: polled before every step; True raises :class:`Cancelled`.
        started: ``time.perf_counter()`` at the start of the run, for ``elapsed_s``.
    """
    started = time.perf_counter() if started is None else started
    sizes = scale_sizes(options.size, options.scales)
    total = options.iterations * len(sizes)

    def report(done: int, losses: Losses, image: Image.Image | None) -> None:
        progress(Progress(done, total, losses, time.perf_counter() - started, image))

    x = objective = None
    for k, size in enumerate(sizes):
        objective = objective_at(size)
        if x is None:
            x = start_image(objective, options.init, options.seed, init_image)
        else:  # coarse-to-fine: start from the previous scale's result, upsampled
            x = F.interpolate(x.detach(), size=(objective.height, objective.width),
                              mode="bicubic", align_corners=False).clamp(0, 1)
        x = x.detach().requires_grad_(True)
        _steps(objective, x, options, k * options.iterations, total,
               report if progress is not None else None, preview, should_stop)

    with torch.no_grad():
        final = x.detach().clamp(0, 1)
        _, losses = objective.evaluate(final)
    image = output_image(final, objective.colours_of)
    if progress is not None:
        report(total, losses, image if preview else None)
    return image, losses


def _steps(objective: Objective, x: torch.Tensor, options: StyleOptions, offset: int,
           total: int, report: Report | None, preview: bool,
           should_stop: Callable[[], bool] | None) -> None:
    """Run ``options.iterations`` optimiser steps on ``x`` in place.

    ``offset`` is the number of steps done at coarser scales; progress is reported when the
    overall count is a multiple of ``options.progress_every``.
    """
    optimizer = make_optimizer(x, options)
    last: list[Losses] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss, losses = objective.evaluate(x)
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
        image = output_image(x, objective.colours_of) if due and preview else None
        last.clear()
        optimizer.step(closure)
        with torch.no_grad():
            # Keep pixels displayable: the loss of the clamped image is what we return.
            x.clamp_(0, 1)
        # last[0]: the losses of the image before the step (L-BFGS may evaluate more often).
        if not math.isfinite(last[0].total):
            raise ValueError(f"learning_rate: the optimisation diverged (total loss "
                             f"{last[0].total} at iteration {done + 1}); lower "
                             f"learning_rate or the loss weights")
        if due:
            report(done, last[0], image)
