"""Region masks of the styles: spatial control with guided Gram matrices.

Gatys, Ecker, Bethge, Hertzmann & Shechtman, "Controlling Perceptual Factors in Neural Style
Transfer" (CVPR 2017). A style may carry two greyscale masks (white: 1, black: 0, soft values
in between; an RGB mask is read by its luminance):

* a **region mask** (``style_mask[i]``) on the output: where style i applies. It is resized
  to the output size, so it must have the output's aspect ratio;
* a **source mask** (``style_source_mask[i]``) on the style image: the part of the style
  image its statistics are taken from. It is resized to the style image as used (long side
  ``size * style_scale``), so it must have the style image's aspect ratio.

Masks are resized with PIL's bilinear filter (an area-weighted filter when shrinking, and
never outside [0, 1]). **At each layer** the mask is brought to the feature map's resolution
by *pooling*, the way the network itself downsamples: every VGG convolution is a "same"
convolution that keeps the resolution, and at every pooling layer the mask goes through a
2x2, stride-2 average pool (floor mode, like the network's pools, so the sizes match). A
feature position's weight is then the mean of the mask over the pixels of its pooling
windows -- the paper's simple downsampling, not its propagated-and-thresholded variant.

With the pooled mask m at layer l as per-position weights, the guided Gram matrix is
G = F diag(m^2) F^T / (C * sum_k m_k^2) (``gramstyle.kernels.gram(..., weights=m)``); see
:mod:`gramstyle.engine.losses` for the loss built from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from gramstyle.engine.extractor import VGGFeatures
from gramstyle.errors import FieldError
from gramstyle.images import long_side_size

#: The error-message names of the two kinds of mask (followed by ``[i]``).
REGION_FIELD = "style_mask"
SOURCE_FIELD = "style_source_mask"


def check_count(masks: Sequence[object], styles: int, field: str) -> None:
    """``masks`` is empty (no masks) or has one entry per style image (None: no mask)."""
    if masks and len(masks) != styles:
        raise FieldError(field, f"{len(masks)} given for {styles} style image(s); give one "
                         f"per style, in the same order (None for a style without one)")


def check_aspect(mask: Image.Image, size: tuple[int, int], field: str, covers: str) -> None:
    """A mask resized to ``size`` (width, height) must keep its aspect ratio: resized to
    ``size``'s long side, it must come within 1 px of ``size`` on each side."""
    width, height = long_side_size(mask.width, mask.height, max(size))
    if abs(width - size[0]) > 1 or abs(height - size[1]) > 1:
        raise FieldError(field, f"{mask.width}x{mask.height} px does not have the aspect "
                         f"ratio of {covers} ({size[0]}x{size[1]} px); the mask is resized to "
                         f"it, so give a mask of the same proportions")


def mask_tensor(mask: Image.Image, size: tuple[int, int], device: torch.device | str,
                field: str, covers: str) -> torch.Tensor:
    """The mask resized to ``size`` (width, height) as float32 [1, 1, H, W] in [0, 1].

    Raises ValueError (naming ``field``) when its aspect ratio differs from ``size``'s or
    when it is black everywhere (the style would apply nowhere / have no source).
    """
    check_aspect(mask, size, field, covers)
    grey = mask.convert("L")
    if grey.size != tuple(size):
        grey = grey.resize(tuple(size), Image.Resampling.BILINEAR)
    if grey.getextrema()[1] == 0:
        raise FieldError(field, f"the mask is black everywhere at {size[0]}x{size[1]} px, so "
                         f"it selects nothing; white marks where the style applies")
    return (pil_to_tensor(grey).float() / 255).unsqueeze(0).to(device)


def layer_weights(mask: torch.Tensor, extractor: VGGFeatures, layers: Iterable[str]
                  ) -> dict[str, torch.Tensor]:
    """Per-position weights [1, N_l] of each of ``layers`` for an image-sized ``mask``
    ([1, 1, H, W]): the mask average-pooled 2x2 at every pooling layer up to the layer (see
    the module doc). N_l = H_l * W_l, the layer's feature positions for an H x W image."""
    names = extractor.layer_names
    order = sorted(layers, key=names.index)
    out: dict[str, torch.Tensor] = {}
    current, done = mask, 0  # `current` is the mask after the first `done` modules
    for name in order:
        index = names.index(name) + 1
        for module_name in names[done:index]:
            if module_name.startswith("pool"):
                current = F.avg_pool2d(current, kernel_size=2, stride=2)
        done = index
        out[name] = current.flatten(1)
    return out


__all__ = ["REGION_FIELD", "SOURCE_FIELD", "check_aspect", "check_count", "layer_weights",
           "mask_tensor"]
