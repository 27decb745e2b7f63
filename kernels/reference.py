"""The einsum reference (fallback) path of gramstyle.kernels, with the fused op's semantics.

This is what runs when the C++ extension is not built (client-only install, failed build),
when it cannot serve the tensor's device, or when ``GRAMSTYLE_KERNEL=einsum``. It is plain
differentiable PyTorch, so autograd, autocast and torch.compile handle it as usual; it
costs three GEMMs per forward+backward step (see docs/kernels.md).

The argument checks here raise the same exception types with the same messages as the
C++ operator's TORCH_CHECKs, so callers see one behaviour whichever backend runs.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def flatten(features: torch.Tensor, op: str = "gramstyle.gram") -> torch.Tensor:
    """View features [B,C,H,W] or [B,C,N] as [B,C,N] (a copy only if strides require it)."""
    if features.dim() not in (3, 4):
        raise ValueError(
            f"{op}: features must be [B,C,H,W] or [B,C,N], got a {features.dim()}-D tensor "
            f"of shape {list(features.shape)}"
        )
    return features if features.dim() == 3 else features.flatten(2)


def check_features(features: torch.Tensor, op: str) -> torch.Tensor:
    """Rank, dtype and emptiness checks; returns the [B,C,N] view."""
    f = flatten(features, op)
    if features.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: features must be float32, float64, bfloat16 or float16, got {features.dtype}"
        )
    if features.numel() == 0:
        raise ValueError(f"{op}: features must not be empty, got shape {list(features.shape)}")
    return f


def check_target(target: torch.Tensor, features: torch.Tensor, op: str) -> None:
    """Rank, channel count, batch and device checks of a target Gram against features."""
    b, c = features.shape[0], features.shape[1]
    if target.dim() not in (2, 3):
        raise ValueError(
            f"{op}: target must be [C,C] or [B,C,C], got a {target.dim()}-D tensor of shape "
            f"{list(target.shape)}"
        )
    if target.shape[-1] != c or target.shape[-2] != c:
        raise ValueError(
            f"{op}: target has shape {list(target.shape)} but features have C={c} channels; "
            "target must be [C,C] or [B,C,C]"
        )
    if target.dim() == 3 and target.shape[0] not in (b, 1):
        raise ValueError(
            f"{op}: target batch {target.shape[0]} does not match features batch {b} "
            "(a [C,C] or [1,C,C] target is broadcast)"
        )
    if target.device != features.device:
        raise ValueError(
            f"{op}: target is on {target.device} but features are on {features.device}; "
            "both must be on the same device"
        )


def check_weights(weights: torch.Tensor, features: torch.Tensor, op: str) -> torch.Tensor:
    """Rank, N, batch, device and dtype checks of per-position weights against features;
    returns them as [Bw, 1, N] (Bw in {1, B}), broadcastable over the [B,C,N] view."""
    b = features.shape[0]
    n = features.numel() // (b * features.shape[1]) if features.numel() else 0
    if weights.dim() not in (1, 2):
        raise ValueError(
            f"{op}: weights must be [N] or [B,N], got a {weights.dim()}-D tensor of shape "
            f"{list(weights.shape)}"
        )
    if weights.shape[-1] != n:
        raise ValueError(
            f"{op}: weights have shape {list(weights.shape)} but features have N={n} "
            "positions; weights must be [N] or [B,N]"
        )
    if weights.dim() == 2 and weights.shape[0] not in (b, 1):
        raise ValueError(
            f"{op}: weights batch {weights.shape[0]} does not match features batch {b} "
            "(an [N] or [1,N] weight is broadcast)"
        )
    if weights.device != features.device:
        raise ValueError(
            f"{op}: weights are on {weights.device} but features are on {features.device}; "
            "both must be on the same device"
        )
    if not weights.is_floating_point():
        raise TypeError(f"{op}: weights must be a floating tensor, got {weights.dtype}")
    return weights.reshape(-1, 1, n)


def default_scale(features: torch.Tensor) -> float:
    """1 / (C * N), N = H * W: the normalisation of the PyTorch tutorial and neural-style."""
    c = features.shape[1]
    n = features.numel() // (features.shape[0] * c) if features.numel() else 0
    return 1.0 / (c * n) if c * n else 1.0


def gram(features: torch.Tensor, scale: float, weights: torch.Tensor | None = None,
         ) -> torch.Tensor:
    """scale * F diag(w^2) F^T for F [B,C,H,W] or [B,C,N] and per-position weights w ([N] or
    [B,N]; all ones when None); [B,C,C] in the features' dtype."""
    f = check_features(features, "gramstyle.gram")
    if weights is not None:
        # The fused op's semantics: the Gram of F diag(w), the products computed in float32
        # (float64 for float64) and rounded once to the features' dtype.
        w = check_weights(weights, features, "gramstyle.gram")
        acc = torch.float64 if f.dtype == torch.float64 else torch.float32
        f = (f.to(acc) * w.to(acc)).to(f.dtype)
    return torch.einsum("bcn,bdn->bcd", f, f) * scale


def style_loss(features: torch.Tensor, target: torch.Tensor, scale: float,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean over all B*C*C entries of (gram(features, scale, weights) - target)^2; 0-dim."""
    check_features(features, "gramstyle.style_loss")
    check_target(target, features, "gramstyle.style_loss")
    if weights is not None:
        check_weights(weights, features, "gramstyle.style_loss")
    return (gram(features, scale, weights) - target).pow(2).mean()
