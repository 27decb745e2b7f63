"""Gram matrix and style loss: the one Python entry point, whichever backend runs it.

Shapes and normalisation:
    features F: [B, C, H, W] or [B, C, N] (N = H*W)
    gram(F, scale) = scale * F @ F^T, shape [B, C, C]; scale defaults to 1 / (C * N)
    style_loss(F, A, scale) = mean over all B*C*C entries of (gram(F, scale) - A)^2,
        A is [B, C, C] or [C, C] (broadcast over B)

Per-position weights (guided Gram matrices, Gatys et al. 2017), both calls' ``weights=``:
    w: [B, N] or [N] (broadcast over B), float; the *mask* m itself, not m^2
    gram(F, scale, weights=w)[b] = scale_b * sum_k w_bk^2 F_b[:, k] F_b[:, k]^T
        scale_b defaults to 1 / (C * sum_k w_bk^2) -- the weighted mean over positions, so
        all-ones weights give the unweighted default 1 / (C * N); a row of zeros gives G = 0.
        An explicit scale is used as given for every b.
    The fused op scales F by w before its GEMM and the gradient by w^2 after it; the
    weights are constants (no gradient flows to them; weights that require grad are a
    ValueError). Without weights the call is exactly what it was.

Backends (``backend()``):
    'cpu' / 'cuda'  the fused C++ / CUDA operator ``torch.ops.gramstyle.*`` from the
                    compiled extension gramstyle.kernels._C: the forward computes only the
                    upper-triangular panels of F F^T, the residual and the loss in one
                    epilogue pass and saves only R = G - A; the backward is one GEMM,
                    dF = 2 s / (B C C) (R + R^T) F.
    'einsum'        plain PyTorch (kernels/reference.py): the fallback when the extension is
                    not built or fails to load (a warning is logged once), when it cannot
                    serve the tensor's device, or when GRAMSTYLE_KERNEL=einsum.

The choice is made per call from the features' device, so CPU tensors use the CPU kernels
even when 'cuda' is the reported backend.

Dtypes: float32, float64, bfloat16 and float16 features. The fused path accumulates in
float32 (float64 for float64); gram() returns the features' dtype, style_loss() returns a
float32 scalar (float64 for float64). A target may have the features' dtype or float32;
other floating dtypes are converted, like einsum's type promotion would.

Autocast: under torch.autocast the fused op casts float32 features to the autocast dtype
(bf16/fp16) as matmul does, and keeps a float32 target as it is; the einsum path follows
autocast's own bmm policy.
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

import torch

from . import reference

log = logging.getLogger(__name__)

#: Environment variable choosing the backend: "auto" (default) or "einsum".
ENV_VAR = "GRAMSTYLE_KERNEL"

_lock = threading.Lock()
_ops: ModuleType | None = None
_load_attempted = False
_load_error: str | None = None


def _fused_ops() -> ModuleType | None:
    """The loaded kernels.ops module, or None for the einsum fallback (decided once)."""
    global _ops, _load_attempted, _load_error
    if _load_attempted:
        return _ops
    with _lock:
        if _load_attempted:
            return _ops
        choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if choice == "einsum":
            log.info("%s=einsum: using the einsum reference path", ENV_VAR)
        else:
            if choice != "auto":
                log.warning("%s=%r is not 'auto' or 'einsum'; using 'auto'", ENV_VAR, choice)
            try:
                from . import ops

                _ops = ops
            except Exception as exc:  # a missing or mismatched build must never crash
                _load_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "gramstyle.kernels: the fused extension could not be loaded (%s: %s); "
                    "falling back to the einsum path",
                    type(exc).__name__,
                    exc,
                )
        _load_attempted = True
        return _ops


def load_error() -> str | None:
    """Why the compiled op did not load ("ImportError: ..."), or None when it loaded or was
    switched off with GRAMSTYLE_KERNEL=einsum."""
    _fused_ops()
    return _load_error


def _fused_for(device: torch.device) -> ModuleType | None:
    ops = _fused_ops()
    if ops is None:
        return None
    if device.type == "cpu" or (device.type == "cuda" and ops.WITH_CUDA):
        return ops
    return None


def backend(device: str | torch.device | None = None) -> str:
    """The active backend: 'cpu', 'cuda' or 'einsum'.

    Without ``device``: 'cuda' when the extension has CUDA kernels and a GPU is available,
    else 'cpu' when the extension is loaded, else 'einsum'. With ``device``: the backend
    that runs for tensors on that device.
    """
    ops = _fused_ops()
    if ops is None:
        return "einsum"
    if device is None:
        return "cuda" if ops.WITH_CUDA and torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev.type if _fused_for(dev) is not None else "einsum"


def _scale(features: torch.Tensor, scale: float | None, op: str) -> float:
    reference.flatten(features, op)  # rank check with the common message
    return reference.default_scale(features) if scale is None else float(scale)


def _weighted_scale(
    features: torch.Tensor, weights: torch.Tensor, scale: float | None, op: str
) -> tuple[float, torch.Tensor]:
    """(scale, weights) for the op, with the default per-item normalisation folded into the
    weights: w / sqrt(sum_k w_k^2) and scale 1 / C give scale_b = 1 / (C sum_k w_bk^2)
    without a host synchronisation (a zero row stays zero)."""
    reference.flatten(features, op)
    if weights.requires_grad:
        raise ValueError(f"{op}: weights must not require grad (they are constants of the "
                         "loss; no gradient flows to them); pass weights.detach()")
    if scale is not None:
        return float(scale), weights
    reference.check_weights(weights, features, op)  # before reading the weights' shape
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    w = weights.to(acc)
    norm = w.square().sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
    return 1.0 / features.shape[1], w * norm.rsqrt()


def gram(features: torch.Tensor, scale: float | None = None,
         weights: torch.Tensor | None = None) -> torch.Tensor:
    """G = scale * F F^T for F of shape [B,C,H,W] or [B,C,N]; returns [B,C,C].

    scale defaults to 1 / (C * N). With per-position ``weights`` w ([B,N] or [N]),
    G = scale * F diag(w^2) F^T and scale defaults to 1 / (C * sum_k w_k^2) per batch item
    (see the module doc). The result has the features' dtype (float32 accumulation on the
    fused path).
    """
    if weights is None:
        s = _scale(features, scale, "gramstyle.gram")
        ops = _fused_for(features.device)
        if ops is None:
            return reference.gram(features, s)
        return ops.gram(features, s)
    s, w = _weighted_scale(features, weights, scale, "gramstyle.gram")
    ops = _fused_for(features.device)
    if ops is None:
        return reference.gram(features, s, w)
    return ops.gram(features, s, 0, w)


def _harmonise_target(target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    # The op takes a target in the features' dtype or float32 (the accumulation type).
    # Other floating combinations are converted here -- an O(C^2) cast -- so that the
    # public call accepts what einsum's type promotion would.
    if target.dtype in (features.dtype, torch.float32) or not target.is_floating_point():
        return target
    if features.dtype in (torch.float32, torch.float64):
        return target.to(features.dtype)
    return target.to(torch.float32)


def style_loss(
    features: torch.Tensor, target: torch.Tensor, scale: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean((gram(features, scale, weights) - target)^2) over all B*C*C entries; a 0-dim
    tensor.

    target is [C,C] (broadcast over B) or [B,C,C]. ``weights`` as in :func:`gram` (the
    guided Gram matrix). Gradients flow to the features and, if it requires grad, to the
    target; never to the weights.
    """
    if weights is None:
        s = _scale(features, scale, "gramstyle.style_loss")
        if target.device != features.device:
            reference.check_target(target, features, "gramstyle.style_loss")
        ops = _fused_for(features.device)
        if ops is None:
            return reference.style_loss(features, target, s)
        return ops.style_loss(features, _harmonise_target(target, features), s)
    s, w = _weighted_scale(features, weights, scale, "gramstyle.style_loss")
    if target.device != features.device:
        reference.check_target(target, features, "gramstyle.style_loss")
    ops = _fused_for(features.device)
    if ops is None:
        return reference.style_loss(features, target, s, w)
    return ops.style_loss(features, _harmonise_target(target, features), s, 0, w)


__all__ = ["gram", "style_loss", "backend", "ENV_VAR"]
