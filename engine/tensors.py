"""Pixels between PIL and torch.

Tensors are float32 [1, 3, H, W], RGB in [0, 1]; images are PIL RGB.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image


def to_tensor(image: Image.Image, device: torch.device | str) -> torch.Tensor:
    """PIL RGB -> float32 [1, 3, H, W] in [0, 1] on ``device``."""
    return (pil_to_tensor(image).float() / 255).unsqueeze(0).to(device)


def to_image(tensor: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] (any range, any dtype) -> PIL RGB, clamped to [0, 1] first."""
    return to_pil_image(tensor.detach()[0].float().clamp(0, 1).cpu())
