"""Network layers that can be stopped part-way: large layers run in horizontal bands.

One VGG convolution on a 2048 px image takes several seconds on a CPU, so checking for a
cancelled request only between layers would keep a worker busy long after its caller has
gone. :func:`run_layer` runs a layer whose estimated time exceeds :data:`BAND_SECONDS`
(twice) as several bands of output rows and calls ``check`` before each band; ``check``
raises to stop (the engine's ``Cancelled``).

- Without autograd (target features, ComputeLosses without a gradient) every layer kind is
  banded, each band written into one preallocated output.
- With autograd (the optimisation, a gradient), convolutions go through
  :class:`_BandedConv`, whose backward pass is banded as well: the network's weights are
  frozen, so the only gradient needed is the input's, which for a stride-1 "same"
  convolution is again a "same" convolution (with the kernel transposed and flipped). Other
  layers run whole, and a gradient hook calls ``check`` when the backward pass reaches them.

Each band reads its input rows plus the kernel's halo, so the result equals the whole-layer
computation up to floating-point summation order. Layers that are neither a stride-1 "same"
convolution, a ReLU, nor a pooling with kernel == stride run whole.

``check`` takes the estimated seconds of the work about to start (:data:`MAC_SECONDS`,
:data:`ELEMENT_SECONDS`, a two-core CPU's pace); :class:`gramstyle.engine.stop.StopCheck`
turns that into polls of the caller's ``should_stop``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gramstyle.engine.stop import Check

#: Seconds per multiply-add of a convolution on two CPU cores (measured: a 1024 px VGG
#: conv1_2, 39 G multiply-adds, takes 0.8 s).
MAC_SECONDS = 1 / 45e9
#: Seconds per output element of a ReLU or pooling (memory-bound, first touch included).
ELEMENT_SECONDS = 4e-9
#: Work per band: a stop is seen well within a second.
BAND_SECONDS = 0.2

def _same_conv(module: nn.Module) -> bool:
    """A stride-1, dilation-1, ungrouped convolution whose padding keeps the size."""
    if not isinstance(module, nn.Conv2d):
        return False
    kh, kw = module.kernel_size
    return (module.stride == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and kh % 2 == 1 and kw % 2 == 1 and module.padding == ((kh - 1) // 2, (kw - 1) // 2)
            and module.padding_mode == "zeros")


def _tiled_pool(module: nn.Module) -> bool:
    """A pooling whose windows tile the input (kernel == stride, no padding)."""
    if not isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return False
    k, s = module.kernel_size, module.stride
    return k == s and module.padding in (0, (0, 0)) and not module.ceil_mode and (
        not isinstance(module, nn.MaxPool2d) or module.dilation in (1, (1, 1)))


def _band_rows(seconds_per_row: float, rows: int) -> int:
    return max(1, min(rows, int(BAND_SECONDS / max(seconds_per_row, 1e-12))))


def _conv_band(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, r0: int,
               r1: int) -> torch.Tensor:
    """Output rows [r0, r1) of a "same" convolution of ``x``: input rows with the halo, zero
    rows where the halo falls outside the image."""
    height = x.shape[2]
    ph, pw = (weight.shape[2] - 1) // 2, (weight.shape[3] - 1) // 2
    lo, hi = r0 - ph, r1 + ph
    band = x[:, :, max(lo, 0):min(hi, height)]
    if lo < 0 or hi > height:
        band = F.pad(band, (0, 0, max(0, -lo), max(0, hi - height)))
    return F.conv2d(band, weight, bias, padding=(0, pw))


def _banded(x: torch.Tensor, rows: int, height: int, band: Callable[[int, int], torch.Tensor],
            check: Check, seconds_per_row: float) -> torch.Tensor:
    """Output rows [0, height) computed ``rows`` at a time by ``band(r0, r1)`` into one
    tensor, calling ``check`` before each band."""
    out = None
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        check((r1 - r0) * seconds_per_row)
        part = band(r0, r1)
        if out is None:
            shape = (*part.shape[:2], height, part.shape[3])
            fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous() else torch.contiguous_format)
            out = torch.empty(shape, dtype=part.dtype, device=part.device, memory_format=fmt)
        out[:, :, r0:r1].copy_(part)
        del part
    return out


def _conv_row_seconds(weight: torch.Tensor, width: int) -> float:
    """Estimated seconds per output row of a convolution with this weight, ``width`` wide."""
    return math.prod(weight.shape) * width * MAC_SECONDS


class _BandedConv(torch.autograd.Function):
    """A "same" convolution with frozen weights, banded forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                check: Check) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.check, ctx.dtype = check, x.dtype
        per_row = _conv_row_seconds(weight, x.shape[3])
        return _banded(x, _band_rows(per_row, x.shape[2]), x.shape[2],
                       lambda r0, r1: _conv_band(x, weight, bias, r0, r1), check, per_row)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        # d input of a stride-1 "same" convolution: the same convolution of the output
        # gradient with the kernel's in/out channels swapped and its taps flipped.
        flipped = weight.transpose(0, 1).flip(2, 3).to(grad.dtype)
        per_row = _conv_row_seconds(flipped, grad.shape[3])
        grad_in = _banded(grad, _band_rows(per_row, grad.shape[2]), grad.shape[2],
                          lambda r0, r1: _conv_band(grad, flipped, None, r0, r1), ctx.check,
                          per_row)
        return grad_in.to(ctx.dtype), None, None, None


def _check_on_backward(y: torch.Tensor, check: Check, seconds: float) -> torch.Tensor:
    """``y``, with ``check(seconds)`` called when the backward pass reaches it."""
    if y.requires_grad:
        y.register_hook(lambda _grad: check(seconds))
    return y


def run_layer(module: nn.Module, x: torch.Tensor, check: Check | None) -> torch.Tensor:
    """``module(x)`` for x [N, C, H, W], announcing its work to ``check`` and running it in
    bands when it is large (see the module docstring); ``check=None`` runs it plainly."""
    if check is None:
        return module(x)
    height, width = x.shape[2], x.shape[3]
    grad = torch.is_grad_enabled() and x.requires_grad
    if _same_conv(module):
        weight = module.weight
        per_row = _conv_row_seconds(weight, width)
        seconds = per_row * height
        if seconds <= 2 * BAND_SECONDS or (grad and weight.requires_grad):
            check(seconds)  # small, or a trainable conv (run whole)
            return _check_on_backward(module(x), check, seconds)
        if grad:
            return _check_on_backward(_BandedConv.apply(x, weight, module.bias, check), check,
                                      0.0)
        return _banded(x, _band_rows(per_row, height), height,
                       lambda r0, r1: _conv_band(x, weight, module.bias, r0, r1), check,
                       per_row)
    per_row = x.shape[0] * x.shape[1] * width * ELEMENT_SECONDS
    seconds = per_row * height
    if grad or seconds <= 2 * BAND_SECONDS:
        check(seconds)
        return _check_on_backward(module(x), check, seconds)
    if isinstance(module, nn.ReLU):
        return _banded(x, _band_rows(per_row, height), height,
                       lambda r0, r1: torch.relu(x[:, :, r0:r1]), check, per_row)
    if _tiled_pool(module):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        out_rows, per_out_row = height // k, per_row * k
        return _banded(x, _band_rows(per_out_row, out_rows), out_rows,
                       lambda r0, r1: module(x[:, :, r0 * k:r1 * k]), check, per_out_row)
    check(seconds)
    return module(x)


__all__ = ["BAND_SECONDS", "ELEMENT_SECONDS", "MAC_SECONDS",
           "run_layer"]
