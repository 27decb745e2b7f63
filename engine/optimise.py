"""The optimisation loop: the output pixels are the variable, the objective is fixed.

    image, losses, run = optimise(objective_at, options, progress=print)

For each scale of the coarse-to-fine schedule (:func:`gramstyle.options.schedule`): build
the objective at that size, start from the start image (first scale) or the previous result
upsampled, and take up to that scale's iterations of L-BFGS or Adam steps, clamping the pixels to
[0, 1] after each. A scale ends early when the loss has converged (``options.tolerance``,
see :class:`Convergence`). Progress is reported, and ``should_stop`` polled, between steps.

Nothing in a step reads a value back to the host: the loss terms stay tensors
(:class:`~gramstyle.engine.objective.LossTerms`) and L-BFGS is the sync-free
:class:`~gramstyle.engine.lbfgs.LBFGS`. The loop fetches values -- in one transfer -- only
when a progress report is due, and every ``CONVERGENCE_CHECK_EVERY`` steps for the
convergence and divergence checks, so on CUDA the CPU queues steps ahead of the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.profiler import record_function

from gramstyle.engine.colour import output_image
from gramstyle.engine.lbfgs import LBFGS
from gramstyle.engine.objective import LossTerms, Objective, fetch
from gramstyle.engine.stop import Cancelled
from gramstyle.engine.tensors import to_image, to_tensor
from gramstyle.errors import FieldError
from gramstyle.options import (
    CONVERGENCE_CHECK_EVERY,
    CONVERGENCE_WINDOW,
    StyleOptions,
    schedule,
)
from gramstyle.results import Losses, Progress

#: Called with (iterations done over all scales, losses of the current image, preview).
Report = Callable[[int, Losses, Image.Image | None], None]

#: Tile-level progress reports (a tiled iteration of a big image takes a minute) come at
#: most this often, seconds.
TILE_PROGRESS_INTERVAL_S = 1.0

#: Curvature pairs L-BFGS keeps. 20 reaches the same loss per iteration as 100 (the old
#: default, torch's and neural-style's) in bench/time_to_quality.py, and each pair is two
#: image-sized vectors that every update reads twice: 100 pairs made the update a large part of
#: an iteration and took 6.7 GB at 2048 px (docs/benchmarks.md).
LBFGS_HISTORY = 20
#: Bytes the L-BFGS history may take: above 2048 x 2048 px 20 pairs of two image-sized
#: float32 vectors would take more (6.8 GiB at 4096 x 3072), so big images keep fewer
#: (:func:`lbfgs_history`; docs/tiling.md, "Optimiser state").
LBFGS_HISTORY_BYTES = 2 * 2**30
#: The fewest pairs kept, however big the image.
LBFGS_MIN_HISTORY = 5


def lbfgs_history(pixels: int) -> int:
    """Curvature pairs L-BFGS keeps for an image of ``pixels`` pixels: ``LBFGS_HISTORY``,
    or fewer when that many would take more than ``LBFGS_HISTORY_BYTES`` (a pair is two
    float32 RGB images, 24 bytes per pixel), but at least ``LBFGS_MIN_HISTORY``: 20 up to
    2048 x 2048, 7 at 4096 x 3072, 5 at 4096 x 4096."""
    return max(LBFGS_MIN_HISTORY, min(LBFGS_HISTORY, LBFGS_HISTORY_BYTES // (24 * pixels)))


@dataclass
class Run:
    """How an optimisation went: steps run over all scales, and why it ended, i.e. why its last
    scale ended: 'converged' (the loss stopped improving, see :class:`Convergence`) or 'cap'
    (it ran all ``iterations``). A coarser scale that converges hands over to the next."""

    iterations: int
    stop_reason: str


class Convergence:
    """The early stop of one scale, and its divergence check; holds device tensors only.

    Rule: let L_i be the total loss of the image before step i, and B_i = min(L_0..L_i) the
    best so far (the minimum makes one uphill L-BFGS step harmless). After every
    ``CONVERGENCE_CHECK_EVERY`` steps n, the scale has converged when

        B_{n-W} - B_n < tolerance * B_{n-W},   W = CONVERGENCE_WINDOW,

    i.e. the best loss improved by less than the fraction ``tolerance`` over the last W
    steps. The first test is at n = W + CONVERGENCE_CHECK_EVERY; tolerance 0 never stops.
    """

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.best: torch.Tensor | None = None
        #: 1-based index of the first step whose loss was not finite (0: none yet), and that
        #: loss.
        self.bad_at: torch.Tensor | None = None
        self.bad_loss: torch.Tensor | None = None
        #: Best loss at each check so far: steps -> B.
        self.checked: dict[int, float] = {}

    def add(self, step: int, total: torch.Tensor) -> None:
        """Record the loss of step ``step`` (1-based) -- device operations only."""
        total = total.detach()
        if self.best is None:
            self.best = total.clone()
            self.bad_at = torch.zeros((), device=total.device)
            self.bad_loss = total.clone()
        first_bad = (self.bad_at == 0) & ~torch.isfinite(total)
        self.bad_at = torch.where(first_bad, float(step), self.bad_at)
        self.bad_loss = torch.where(first_bad, total, self.bad_loss)
        self.best = torch.minimum(self.best, total)

    def tensors(self) -> list[torch.Tensor]:
        """What :meth:`check` needs, to fetch with the loss terms."""
        return [self.best, self.bad_at, self.bad_loss]

    def check(self, steps: int, values: list[float], done_before: int, test: bool = True
              ) -> bool:
        """With the fetched :meth:`tensors` ``values``, after ``steps`` steps of this scale
        (``done_before`` at coarser ones): raise if the loss diverged; with ``test``, return
        whether the scale has converged."""
        best, bad_at, bad_loss = values
        if bad_at:
            raise FieldError("learning_rate", f"the optimisation diverged (total loss "
                             f"{bad_loss} at iteration {done_before + int(bad_at)}); lower "
                             f"learning_rate or the loss weights")
        if not test:
            return False
        self.checked[steps] = best
        then = self.checked.get(steps - CONVERGENCE_WINDOW)
        if self.tolerance <= 0 or then is None:
            return False
        return then - best <= self.tolerance * then


# The window must end on a check.
assert CONVERGENCE_WINDOW % CONVERGENCE_CHECK_EVERY == 0


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
            raise FieldError("init", "'content' needs a content image; use noise or style",
                             init)
        return objective.contents[0].clone()
    if init == "style":
        if not objective.styles:
            raise FieldError("init", "'style' needs a style image; use noise or content", init)
        image = to_image(objective.styles[0]).resize(size, Image.Resampling.LANCZOS)
        return to_tensor(image, objective.device)
    if init == "image":
        if init_image is None:
            raise FieldError("init_image", "init is 'image' but no init image was given")
        return to_tensor(init_image.resize(size, Image.Resampling.LANCZOS), objective.device)
    # Drawn on the CPU so that a seed gives the same image on every device.
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, objective.height, objective.width,
                      generator=generator).to(objective.device)


def make_optimizer(x: torch.Tensor, options: StyleOptions) -> LBFGS | torch.optim.Optimizer:
    """L-BFGS (one update per step, history :func:`lbfgs_history`, no line search,
    sync-free) or Adam on ``x``; the learning rate defaults to 1.0 and 0.02 (pixels in
    [0, 1])."""
    if options.optimizer == "lbfgs":
        return LBFGS(x, lr=options.learning_rate or 1.0,
                     history_size=lbfgs_history(x.shape[-2] * x.shape[-1]))
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
) -> tuple[Image.Image, Losses, Run]:
    """Optimise the output image; return it, its losses (before colour preservation) and
    how the run went.

    Args:
        objective_at: the objective at output long side ``size`` (px), for each scale.
        options: validated options (``StyleTransfer.validate``).
        init_image: the start image for init 'image' (or unset init).
        progress: called after 0 iterations (the start image), every
            ``options.progress_every`` iterations and after the last one; iterations count
            the steps run across all scales (a scale that converges early hands over to
            the next one sooner), against a total of every scale's cap added up
            (:func:`gramstyle.options.total_iterations`). Each names its scale; in a tiled
            run, reports also come from within an iteration, naming the tile pass and the
            tile (at most one a second, ``TILE_PROGRESS_INTERVAL_S``, with the latest
            iteration's losses).
        preview: attach the current image (colours preserved if asked) to each Progress.
        should_stop: polled before every step; True raises :class:`Cancelled`.
        started: ``time.perf_counter()`` at the start of the run, for ``elapsed_s``.
    """
    started = time.perf_counter() if started is None else started
    plan = schedule(options.size, options.scales, options.iterations)
    total = sum(n for _, n in plan)
    precision = ""
    # Where the run is, for the reports: the scale (1-based) and its long side, the latest
    # losses and iteration reported, and when a tile was last reported.
    where = {"scale": 0, "size": 0, "done": 0, "losses": None, "tile_at": -float("inf")}

    def report(done: int, losses: Losses, image: Image.Image | None) -> None:
        where["done"], where["losses"] = done, losses
        progress(Progress(done, total, losses, time.perf_counter() - started, image,
                          precision=precision, scale=where["scale"], scales=len(plan),
                          scale_size=where["size"]))

    def on_tile(stage: int, tile: int, tiles: int) -> None:
        # At most one report a second, and none before the first losses are known.
        now = time.perf_counter()
        if where["losses"] is None or now - where["tile_at"] < TILE_PROGRESS_INTERVAL_S:
            return
        where["tile_at"] = now
        progress(Progress(where["done"], total, where["losses"], now - started,
                          precision=precision, scale=where["scale"], scales=len(plan),
                          scale_size=where["size"], tile_pass=stage, tile=tile,
                          tiles=tiles))

    x = objective = None
    done, converged = 0, False
    for index, (size, iterations) in enumerate(plan):
        where["scale"], where["size"] = index + 1, size
        objective = objective_at(size)
        precision = objective.precision
        if progress is not None and objective.tile:
            objective.on_tile = on_tile
        if x is None:
            x = start_image(objective, options.init, options.seed, init_image)
        else:  # coarse-to-fine: start from the previous scale's result, upsampled
            x = F.interpolate(x.detach(), size=(objective.height, objective.width),
                              mode="bicubic", align_corners=False).clamp(0, 1)
        x = x.detach().contiguous().requires_grad_(True)
        steps, scale_converged = _steps(objective, x, options, iterations, done, total,
                                        report if progress is not None else None, preview,
                                        should_stop)
        done += steps
        converged = scale_converged  # the run ends when its last scale does

    objective.on_tile = None  # the final evaluation is not reported tile by tile
    with torch.no_grad():
        final = x.detach().clamp(0, 1)
        _, losses = objective.evaluate(final)
    image = output_image(final, objective.colours_of)
    if progress is not None:
        report(done, losses, image if preview else None)
    return image, losses, Run(done, "converged" if converged else "cap")


def _steps(objective: Objective, x: torch.Tensor, options: StyleOptions, iterations: int,
           offset: int, total: int, report: Report | None, preview: bool,
           should_stop: Callable[[], bool] | None) -> tuple[int, bool]:
    """Run up to ``iterations`` optimiser steps on ``x`` in place (this scale's cap,
    :func:`gramstyle.options.schedule`); return how many ran and whether the scale converged
    (see :class:`Convergence`).

    ``offset`` is the number of steps done at coarser scales, ``total`` the caps of all
    scales added up; progress is reported when the overall count is a multiple of
    ``options.progress_every``.
    """
    optimizer = make_optimizer(x, options)
    convergence = Convergence(options.tolerance)
    first: list[LossTerms] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        # The labels name the phases in torch.profiler traces (bench/profile_iteration.py).
        with record_function("gramstyle::forward"):
            loss, terms = objective.evaluate_terms(x)
        with record_function("gramstyle::backward"):
            loss.backward()
        # The extractor runs channels_last on CPU; the optimisers want x's own layout.
        x.grad = x.grad.contiguous()
        if not first:  # L-BFGS evaluates once per step, but keep the first if ever more
            first.append(terms.detach())
        return loss

    for step in range(iterations):
        done = offset + step
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped after {done} of {total} iterations", iterations=done)
        due = report is not None and done % options.progress_every == 0
        # The preview is taken before the step so it matches the losses the step computes.
        image = output_image(x, objective.colours_of) if due and preview else None
        first.clear()
        optimizer.step(closure)
        with torch.no_grad():
            # Keep pixels displayable: the loss of the clamped image is what we return.
            x.clamp_(0, 1)
        terms = first[0]  # the losses of the image before the step
        convergence.add(step + 1, terms.total)
        check = (step + 1) % CONVERGENCE_CHECK_EVERY == 0 or step + 1 == iterations
        if not (due or check):
            continue
        wanted = terms.tensors() if due else []
        values = fetch(wanted + convergence.tensors())  # the one host transfer
        converged = convergence.check(step + 1, values[len(wanted):], offset, test=check)
        if due:
            report(done, terms.losses(values[:len(wanted)]), image)
        if converged:
            return step + 1, True
    return iterations, False
