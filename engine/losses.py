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

Regions (guided Gram matrices, :mod:`gramstyle.engine.masks`): a style j with a region mask
r_j and/or a source mask q_j is compared through Grams weighted per position by the mask
brought to the layer's resolution (r_j,l on the output, q_j,l on the style image):

    G_l(y; m) = F_l(y) diag(m^2) F_l(y)^T / (C_l * sum_k m_k^2)
    A_l,j     = G_l(s_j; q_j,l)
    style(x)  = sum_l w_l * sum_j b_j * ||G_l(x; r_j,l) - A_l,j||^2 / ||A_l,j||^2

(a missing mask is all ones, which gives G_l above). Styles without a region mask share
G_l(x) and stay one blend, so without region masks this is exactly the formula above.

Each loss is a small callable on one layer's features; :class:`LayerSum` combines one per
layer, and :class:`gramstyle.engine.objective.Objective` weighs content, style and tv.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    """Relative feature MSE of one layer against a blend of content targets.

    ``targets``: the layer's features of each content image ([1, C, H, W], all one shape);
    ``blend_weights``: one per image, normalised here.
    """

    def __init__(self, targets: Sequence[torch.Tensor], blend_weights: Sequence[float]):
        self.target = BlendedTarget.blend(targets, blend_weights)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The unweighted relative loss of ``features`` (same shape as a target), 0-dim
        float32."""
        return self.target.loss((features.float() - self.target.mean).pow(2).mean())


def gram_target(features: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 [C, C] Gram matrix of one style image's [1, C, H, W] features: what
    :class:`StyleLoss` compares against (and what the target cache keeps). With ``weights``
    ([1, N], a source mask at this layer) the guided Gram F diag(w^2) F^T / (C sum w^2)."""
    if weights is None:
        return kernels.gram(features.float()).squeeze(0)
    return kernels.gram(features.float(), weights=weights).squeeze(0)


class StyleLoss:
    """Relative Gram-matrix MSE of one layer against a blend of style targets.

    The Gram matrix and its squared error go through ``gramstyle.kernels.style_loss``, so the
    fused C++/CUDA op runs when it is compiled. ``grams`` are the targets: the
    :func:`gram_target` ([C, C]) of the layer's features of each style image (the images'
    sizes may differ; the target cache keeps these Grams); ``blend_weights``: one per image,
    normalised here. ``weights`` ([1, N], a region mask at this layer) makes the output's
    Gram the guided one.
    """

    def __init__(self, grams: Sequence[torch.Tensor], blend_weights: Sequence[float],
                 weights: torch.Tensor | None = None):
        self.target = BlendedTarget.blend(grams, blend_weights)
        self.weights = weights

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The unweighted relative loss of ``features`` ([1, C, H, W]), 0-dim float32."""
        # The float32 target stays float32 under bf16 autocast (the op accepts it).
        if self.weights is None:
            return self.target.loss(kernels.style_loss(features, self.target.mean))
        return self.target.loss(kernels.style_loss(features, self.target.mean,
                                                   weights=self.weights))


class RegionStyleLoss:
    """The style loss of one layer over regions: sum_g share_g * loss_g(features).

    ``terms`` holds (share, :class:`StyleLoss`) pairs: one for the styles without a region
    mask (a blend, share = the sum of their blend weights) and one per style with a region
    mask (share = its blend weight); the shares sum to 1. See the module doc.
    """

    def __init__(self, terms: Sequence[tuple[float, StyleLoss]]):
        self.terms = list(terms)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """The unweighted loss of ``features`` ([1, C, H, W]), 0-dim float32."""
        total = None
        for share, loss in self.terms:
            term = share * loss(features)
            total = term if total is None else total + term
        return total


class LayerSum:
    """One loss per layer, combined as sum_l w_l * loss_l with the weights normalised to 1.

    ``losses`` maps a layer name to a callable taking that layer's features; the weights are
    in the same order.
    """

    def __init__(self, losses: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                 layer_weights: Sequence[float]):
        self.losses = losses
        self.layer_weights = dict(zip(losses, _normalised(layer_weights), strict=True))

    @property
    def layers(self) -> list[str]:
        return list(self.losses)

    def __call__(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each layer's unweighted loss (0-dim float32), given the features by layer name."""
        return {name: loss(features[name]) for name, loss in self.losses.items()}

    def weighted(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_l w_l * loss_l of what :meth:`__call__` returned (0-dim, on their device)."""
        # Summed on the values' device: starting from a CPU zero would copy it to the GPU,
        # a host-device transfer, on every call.
        terms = [self.layer_weights[name] * value for name, value in per_layer.items()]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation of [B,3,H,W] pixels: mean squared difference of neighbours."""
    dy = (image[:, :, 1:, :] - image[:, :, :-1, :]).pow(2).mean() if image.shape[2] > 1 else 0
    dx = (image[..., 1:] - image[..., :-1]).pow(2).mean() if image.shape[3] > 1 else 0
    return torch.as_tensor(dy + dx, device=image.device, dtype=torch.float32)
