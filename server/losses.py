"""Content, style and total-variation losses.

All three are *relative*, so the same default weights work for any network's feature scale
(ImageNet VGG19, the HED-trained VGG16, random weights). For layer l with layer weight w_l
(normalised to sum to 1) and image blend weights b_i (normalised to sum to 1):

    content(x) = sum_l w_l * sum_i b_i * ||F_l(x) - F_l(c_i)||^2 / ||F_l(c_i)||^2
    style(x)   = sum_l w_l * sum_j b_j * ||G_l(x) - G_l(s_j)||^2 / ||G_l(s_j)||^2
    G_l(y)     = F_l(y) F_l(y)^T / (C_l * N_l)         (gramstyle.kernels.gram's default scale)
    tv(x)      = mean((x[:, :, 1:, :] - x[:, :, :-1, :])^2) + mean((x[..., 1:] - x[..., :-1])^2)

with F_l(y) the [C_l, N_l] feature map (N_l = H_l * W_l) and x in [0, 1] RGB.

A blend of targets is evaluated with one kernel call per layer against a weighted mean
target plus a constant (see :class:`BlendedTarget`), so several styles cost no more than one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gramstyle import kernels

_TINY = torch.finfo(torch.float32).tiny


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


@dataclass
class BlendedTarget:
    """A blend of per-image targets T_i for one layer, reduced to one target.

    The blended relative loss sum_i b_i ||X - T_i||^2 / ||T_i||^2 equals
    ``scale * (mean((X - mean)^2) + offset)``, with c_i = b_i / mean(T_i^2),
    scale = sum_i c_i, mean = sum_i c_i T_i / scale and
    offset = sum_i (c_i / scale) mean(T_i^2) - mean(mean^2) (a constant).
    """

    mean: torch.Tensor
    offset: float
    scale: float

    @classmethod
    def blend(cls, targets: Sequence[torch.Tensor], weights: Sequence[float]) -> BlendedTarget:
        targets = [t.float() for t in targets]
        second = [max(t.pow(2).mean().item(), _TINY) for t in targets]
        c = [b / n for b, n in zip(_normalised(weights), second, strict=True)]
        scale = sum(c)
        mean = sum(ci / scale * t for ci, t in zip(c, targets, strict=True))
        offset = sum(ci / scale * n for ci, n in zip(c, second, strict=True))
        return cls(mean=mean, offset=offset - mean.pow(2).mean().item(), scale=scale)

    def loss(self, mse: torch.Tensor) -> torch.Tensor:
        """The blended relative loss, given mean((X - self.mean)^2)."""
        return self.scale * (mse.float() + self.offset)


class ContentLoss:
    """Relative feature MSE against a blend of content targets, summed over layers."""

    def __init__(self, targets: dict[str, list[torch.Tensor]], layer_weights: Sequence[float],
                 blend_weights: Sequence[float]):
        self.layer_weights = dict(zip(targets, _normalised(layer_weights), strict=True))
        self.targets = {name: BlendedTarget.blend(t, blend_weights) for name, t in targets.items()}

    def __call__(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-layer (unweighted) losses, as 0-dim float32 tensors."""
        out = {}
        for name, target in self.targets.items():
            out[name] = target.loss((features[name].float() - target.mean).pow(2).mean())
        return out


class StyleLoss:
    """Relative Gram-matrix MSE against a blend of style targets, summed over layers.

    The Gram matrix and its squared error go through ``gramstyle.kernels.style_loss``, so the
    fused C++/CUDA op runs when it is compiled.
    """

    def __init__(self, targets: dict[str, list[torch.Tensor]], layer_weights: Sequence[float],
                 blend_weights: Sequence[float]):
        self.layer_weights = dict(zip(targets, _normalised(layer_weights), strict=True))
        grams = {name: [kernels.gram(f.float()).squeeze(0) for f in feats]
                 for name, feats in targets.items()}
        self.targets = {name: BlendedTarget.blend(g, blend_weights) for name, g in grams.items()}

    def __call__(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, target in self.targets.items():
            # The float32 target stays float32 under bf16 autocast (the op accepts it).
            mse = kernels.style_loss(features[name], target.mean)
            out[name] = target.loss(mse)
        return out


def weighted_sum(per_layer: dict[str, torch.Tensor], layer_weights: dict[str, float]
                 ) -> torch.Tensor:
    """sum_l w_l * loss_l (0 when there are no layers)."""
    total = torch.zeros(())
    for name, value in per_layer.items():
        total = total.to(value.device) + layer_weights[name] * value
    return total


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation of [B,3,H,W] pixels: mean squared difference of neighbours."""
    dy = (image[:, :, 1:, :] - image[:, :, :-1, :]).pow(2).mean() if image.shape[2] > 1 else 0
    dx = (image[..., 1:] - image[..., :-1]).pow(2).mean() if image.shape[3] > 1 else 0
    return torch.as_tensor(dy + dx, device=image.device, dtype=torch.float32)
