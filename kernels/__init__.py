"""Gram matrix and style loss: the one Python entry point, whichever backend runs it.

Shapes and normalisation:
    features F: [B, C, H, W] or [B, C, N] (N = H*W)
    gram(F, scale) = scale * F @ F^T, shape [B, C, C]; scale defaults to 1 / (C * N)
    style_loss(F, A, scale) = mean over all B*C*C entries of (gram(F, scale) - A)^2,
        A is [B, C, C] or [C, C] (broadcast over B)
"""

from __future__ import annotations

import torch


def _flatten(features: torch.Tensor) -> torch.Tensor:
    if features.dim() == 4:
        return features.flatten(2)
    if features.dim() == 3:
        return features
    raise ValueError(f"features: expected [B,C,H,W] or [B,C,N], got shape {tuple(features.shape)}")


def gram(features: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """G = scale * F F^T for F of shape [B,C,H,W] or [B,C,N]; returns [B,C,C]."""
    f = _flatten(features)
    c, n = f.shape[1], f.shape[2]
    s = 1.0 / (c * n) if scale is None else scale
    return torch.bmm(f, f.transpose(1, 2)) * s


def style_loss(features: torch.Tensor, target: torch.Tensor, scale: float | None = None):
    """mean((gram(features, scale) - target)^2) over all B*C*C entries; a 0-dim tensor."""
    return (gram(features, scale) - target).pow(2).mean()


def backend() -> str:
    """The active backend: 'cpu', 'cuda' or 'einsum'."""
    return "einsum"


__all__ = ["gram", "style_loss", "backend"]
