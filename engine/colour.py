"""Colour preservation: the stylised luminance with the content's chroma (YIQ).

Tensors are float32 [1, 3, H, W], RGB in [0, 1]; images are PIL RGB.
"""

from __future__ import annotations

import torch
from PIL import Image

from gramstyle.engine.tensors import to_image

# RGB <-> YIQ, for colour preservation (luminance-only transfer).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def keep_colours(stylized: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Luminance (Y) of ``stylized`` with the chroma (I, Q) of ``content``.

    Both [1, 3, H, W] RGB in [0, 1] of one size; the result is clamped to [0, 1].
    """
    to_yiq, to_rgb = _RGB_TO_YIQ.to(stylized), _YIQ_TO_RGB.to(stylized)
    y = torch.einsum("ij,bjhw->bihw", to_yiq, stylized)[:, :1]
    iq = torch.einsum("ij,bjhw->bihw", to_yiq, content)[:, 1:]
    return torch.einsum("ij,bjhw->bihw", to_rgb, torch.cat([y, iq], 1)).clamp(0, 1)


def output_image(x: torch.Tensor, colours_of: torch.Tensor | None = None) -> Image.Image:
    """The image the caller sees for pixels ``x`` ([1, 3, H, W]): clamped to [0, 1], with the
    chroma of ``colours_of`` (same shape) when given."""
    x = x.detach().clamp(0, 1)
    if colours_of is not None:
        x = keep_colours(x, colours_of)
    return to_image(x)
