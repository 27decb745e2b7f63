"""L-BFGS on the image's pixels without host synchronisation.

``torch.optim.LBFGS`` reads values back to the host on every step: the loss (``float(loss)``),
the "gradient is zero" test, the curvature test ``y·s > 1e-10`` and the descent test
``g·d > 0`` are Python ``if``\\ s on tensors. On CUDA each one stalls the CPU until the GPU
has caught up, so the next step's kernels cannot be queued while the current ones run.

:class:`LBFGS` computes the same update -- torch's with ``max_iter=1``, no line search and
zero tolerances, as the engine always ran it -- with every decision taken on the device:

- a curvature pair (s, y) with ``y·s <= 1e-10`` is stored with rho = 0, which makes it a
  no-op in the two-loop recursion, instead of not being stored (it still occupies a slot of
  the history, so the history of useful pairs is one shorter until it ages out);
- a direction that is not a descent direction (``g·d > 0``, which only rounding can cause,
  since the L-BFGS matrix is positive definite) is replaced by the steepest descent step
  that starts a run, ``-g * min(1, 1/|g|_1) * lr``; torch instead takes no step, and since
  it then stores an empty pair and computes the same direction again, never moves again;
- the first step's length ``min(1, 1/|g|_1) * lr`` stays a tensor.

Apart from those two corner cases the iterates equal torch's (tests/engine/test_speed.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import record_function

#: Curvature pairs with y·s at or below this are skipped (torch.optim.LBFGS's constant).
CURVATURE_EPS = 1e-10


class LBFGS:
    """L-BFGS for one contiguous tensor ``x`` (the image), one update per :meth:`step`.

    Args:
        x: the variable, a contiguous tensor that requires grad.
        lr: step length after the first step (the first is ``min(1, 1/|g|_1) * lr``).
        history_size: curvature pairs kept (each pair is two copies of ``x``).
    """

    def __init__(self, x: torch.Tensor, lr: float = 1.0, history_size: int = 100):
        if not x.is_contiguous():
            raise ValueError("LBFGS: x must be contiguous")
        self.x, self.lr, self.history_size = x, float(lr), int(history_size)
        self.dirs: list[torch.Tensor] = []  # y_i = g_{i+1} - g_i
        self.steps: list[torch.Tensor] = []  # s_i = x_{i+1} - x_i
        self.rho: list[torch.Tensor] = []  # 1 / (y_i · s_i), or 0 for a skipped pair
        self.h_diag: torch.Tensor | None = None
        self.prev_grad: torch.Tensor | None = None
        self.prev_step: torch.Tensor | None = None
        self.n_iter = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.x.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Evaluate ``closure`` (which must fill ``x.grad``) once and update ``x``; return
        the loss the closure returned (of ``x`` before the update)."""
        with torch.enable_grad():
            loss = closure()
        with record_function("gramstyle::lbfgs_update"):
            self._update()
        return loss

    def _update(self) -> None:
        g = self.x.grad.reshape(-1)  # a copy in NCHW order if the gradient is channels_last
        if self.n_iter == 0:
            self.h_diag = torch.ones((), device=g.device, dtype=g.dtype)
            d, t = g.neg(), self._first_length(g)
        else:
            d = self._direction(g)
            uphill = g.dot(d) > 0  # see the module docstring
            d = torch.where(uphill, g.neg(), d)
            t = torch.where(uphill, self._first_length(g),
                            torch.full((), self.lr, device=g.device, dtype=g.dtype))
        step = d.mul_(t)
        self.x.view(-1).add_(step)
        self.prev_grad = g.clone()
        self.prev_step = step
        self.n_iter += 1

    def _first_length(self, g: torch.Tensor) -> torch.Tensor:
        """torch's first step length, min(1, 1/|g|_1) * lr, as a 0-dim tensor."""
        return torch.clamp(g.abs().sum().reciprocal(), max=1.0) * self.lr

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """Store the newest curvature pair, then the two-loop recursion: -H g."""
        y = g.sub(self.prev_grad)
        s = self.prev_step
        ys = y.dot(s)
        curved = ys > CURVATURE_EPS
        if len(self.dirs) == self.history_size:
            del self.dirs[0], self.steps[0], self.rho[0]
        self.dirs.append(y)
        self.steps.append(s)
        self.rho.append(torch.where(curved, ys.reciprocal(), torch.zeros_like(ys)))
        self.h_diag = torch.where(curved, ys / y.dot(y), self.h_diag)

        q = g.neg()
        alphas = [torch.zeros_like(ys)] * len(self.dirs)
        for i in range(len(self.dirs) - 1, -1, -1):
            alphas[i] = self.steps[i].dot(q) * self.rho[i]
            q.addcmul_(self.dirs[i], alphas[i], value=-1)
        r = q.mul_(self.h_diag)
        for i in range(len(self.dirs)):
            beta = self.dirs[i].dot(r) * self.rho[i]
            r.addcmul_(self.steps[i], alphas[i] - beta)
        return r


__all__ = ["CURVATURE_EPS", "LBFGS"]
