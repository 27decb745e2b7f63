"""Thin Python layer over the compiled ops ``torch.ops.gramstyle.*`` (gramstyle.kernels._C).

Importing this module loads the extension (raising ImportError/OSError if it is missing or
does not match the installed torch -- gramstyle.kernels catches that and falls back to
einsum) and registers, once:

* fake (meta) kernels, so the ops trace under torch.compile / FakeTensor;
* autograd formulas through torch.library.register_autograd; the backwards are ops of
  their own (``gram_backward``, ``style_loss_backward``), each a single GEMM after an
  O(C^2) symmetrisation.

Every op takes optional per-position ``weights`` w ([N] or [B,N], broadcast over B when
[N] or [1,N]; N = H*W): then G = s F diag(w^2) F^T, and the gradient of F is multiplied by
w^2 per position. The weights are constants: no gradient flows to them.

Only first derivatives are implemented (the backward ops have no autograd of their own).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)

#: True when the library was compiled with the CUDA kernels.
WITH_CUDA: bool = bool(getattr(_C, "WITH_CUDA", 0))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 features, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and strides exactly as the real kernels produce them.
# ----------------------------------------------------------------------------------------


@torch.library.register_fake("gramstyle::gram")
def _gram_fake(features: torch.Tensor, scale: float, block: int = 0,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(features.dim() in (3, 4), lambda: "features must be [B,C,H,W] or [B,C,N]")
    b, c = features.shape[0], features.shape[1]
    return features.new_empty((b, c, c))


@torch.library.register_fake("gramstyle::style_loss")
def _style_loss_fake(
    features: torch.Tensor, target: torch.Tensor, scale: float, block: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(features.dim() in (3, 4), lambda: "features must be [B,C,H,W] or [B,C,N]")
    b, c = features.shape[0], features.shape[1]
    acc = _acc_dtype(features.dtype)
    return features.new_empty((), dtype=acc), features.new_empty((b, c, c), dtype=acc)


@torch.library.register_fake("gramstyle::gram_backward")
def _gram_backward_fake(grad: torch.Tensor, features: torch.Tensor, scale: float,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(features)


@torch.library.register_fake("gramstyle::style_loss_backward")
def _style_loss_backward_fake(
    grad_loss: torch.Tensor, residual: torch.Tensor, features: torch.Tensor, scale: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty_like(features)


# ----------------------------------------------------------------------------------------
# Autograd.
# ----------------------------------------------------------------------------------------


def _gram_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    features, scale, _block, weights = inputs
    ctx.save_for_backward(features, weights)
    ctx.scale = scale


def _gram_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    features, weights = ctx.saved_tensors
    # d/dF <dG, s F W^2 F^T> = s (dG + dG^T) F W^2, W = diag(weights)
    return (torch.ops.gramstyle.gram_backward(grad, features, ctx.scale, weights),
            None, None, None)


def _style_loss_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    features, target, scale, _block, weights = inputs
    _loss, residual = output
    # R is an internal output (saved for the backward); no gradient flows into it.
    ctx.mark_non_differentiable(residual)
    ctx.save_for_backward(features, residual, weights)
    ctx.scale = scale
    ctx.target_dim = target.dim()
    ctx.target_batch = target.shape[0] if target.dim() == 3 else 0
    ctx.target_dtype = target.dtype


def _style_loss_backward(ctx: Any, grad_loss: torch.Tensor, _grad_residual: Any) -> tuple:
    features, residual, weights = ctx.saved_tensors
    grad_features = grad_target = None
    if ctx.needs_input_grad[0]:
        # dF = dL * 2 s / (B C C) * (R + R^T) F W^2 -- one GEMM.
        grad_features = torch.ops.gramstyle.style_loss_backward(
            grad_loss, residual, features, ctx.scale, weights
        )
    if ctx.needs_input_grad[1]:
        # dA = -2 R / (B C C) * dL, summed over B where the target was broadcast.
        grad_target = residual * (grad_loss * (-2.0 / residual.numel()))
        if ctx.target_dim == 2:
            grad_target = grad_target.sum(0)
        elif ctx.target_batch == 1 and residual.shape[0] != 1:
            grad_target = grad_target.sum(0, keepdim=True)
        grad_target = grad_target.to(ctx.target_dtype)
    return grad_features, grad_target, None, None, None


torch.library.register_autograd(
    "gramstyle::gram", _gram_backward, setup_context=_gram_setup_context
)
torch.library.register_autograd(
    "gramstyle::style_loss", _style_loss_backward, setup_context=_style_loss_setup_context
)


# ----------------------------------------------------------------------------------------
# Entry points used by gramstyle.kernels.
# ----------------------------------------------------------------------------------------


def gram(features: torch.Tensor, scale: float, block: int = 0,
         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Fused s * F diag(w^2) F^T (w = ``weights``, all ones when None), [B,C,C] in the
    features' dtype (float32 accumulation).

    ``block`` is the column-panel width of the triangular GEMM stage; 0 picks the measured
    default, >= C means one full GEMM (see panel_width in csrc/gram.cpp).
    """
    return torch.ops.gramstyle.gram(features, float(scale), int(block), weights)


def style_loss(
    features: torch.Tensor, target: torch.Tensor, scale: float, block: int = 0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused mean((s F diag(w^2) F^T - A)^2); a 0-dim float32 tensor (float64 for float64
    features)."""
    loss, _residual = torch.ops.gramstyle.style_loss(features, target, float(scale), int(block),
                                                     weights)
    return loss
