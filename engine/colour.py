"""Colour control: keep the content's colours (YIQ), or match the style's to the content's.

Gatys, Ecker, Bethge, Hertzmann & Shechtman, "Controlling Perceptual Factors in Neural Style
Transfer" (CVPR 2017), section 5, two ways:

* luminance-only transfer: run the transfer on :func:`luminance` of the content and style
  images (Y of YIQ replicated to three channels, so the network sees a grey RGB image), then
  :func:`keep_colours` puts the content's chroma (I, Q) back on the result's Y. This is also
  what ``preserve_colors`` does to a finished *colour* run; the difference is that here the
  network never sees the style's colours at all;
* colour matching: :func:`match_colours` transforms the style image's RGB linearly so that
  its mean and covariance equal the content's, before the run.

Tensors are float32 [1, 3, H, W], RGB in [0, 1]; images are PIL RGB.
"""

from __future__ import annotations

import torch
from PIL import Image

from gramstyle.engine.tensors import to_image
from gramstyle.errors import FieldError

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


def luminance(x: torch.Tensor) -> torch.Tensor:
    """The luminance Y of YIQ replicated to three channels: [1, 3, H, W] -> [1, 3, H, W].

    A grey RGB image (R = G = B = Y), whose own YIQ is (Y, 0, 0): what the network sees in a
    luminance-only transfer.
    """
    y = torch.einsum("j,bjhw->bhw", _RGB_TO_YIQ[0].to(x), x).unsqueeze(1)
    return y.expand(-1, 3, -1, -1).contiguous()


def match_colours(style: torch.Tensor, content: torch.Tensor, method: str = "sqrt"
                  ) -> torch.Tensor:
    """The style pixels with the content's colour mean and covariance (linear transfer).

    x' = A (x - mu_s) + mu_c per pixel, with mu and Sigma the mean and 3x3 covariance of the
    RGB values over all pixels, and A Sigma_s A^T = Sigma_c:

    * ``method='sqrt'``: A = Sigma_c^(1/2) Sigma_s^(-1/2) (symmetric square roots, by
      eigendecomposition), the paper's image-analogies variant;
    * ``method='cholesky'``: A = L_c L_s^(-1), with Sigma = L L^T.

    ``style`` [1, 3, Hs, Ws] and ``content`` [1, 3, Hc, Wc] may differ in size. The result
    is *not* clamped to [0, 1] (a clamp would move the statistics; the network takes pixels
    outside [0, 1] as they are). Computed in float64.
    """
    if method not in ("sqrt", "cholesky"):
        raise FieldError("method", f"must be 'sqrt' or 'cholesky', got {method!r}")
    xs = style.double().flatten(2)[0]   # [3, Ns]
    xc = content.double().flatten(2)[0]  # [3, Nc]
    mu_s, mu_c = xs.mean(1, keepdim=True), xc.mean(1, keepdim=True)
    eye = torch.eye(3, dtype=torch.float64, device=style.device)
    cov_s, cov_c = torch.cov(xs, correction=0), torch.cov(xc, correction=0)
    # A relative ridge (1e-6 of the mean variance, 1e-12 at least) keeps the inverse and
    # the Cholesky factors finite for flat colours; it moves the result by ~1e-6.
    cov_s = cov_s + (1e-6 * cov_s.trace() / 3 + 1e-12) * eye
    if method == "sqrt":
        a = _sym_power(cov_c, 0.5) @ _sym_power(cov_s, -0.5)
    else:
        cov_c = cov_c + (1e-6 * cov_c.trace() / 3 + 1e-12) * eye
        a = torch.linalg.cholesky(cov_c) @ torch.linalg.inv(torch.linalg.cholesky(cov_s))
    matched = a @ (xs - mu_s) + mu_c
    return matched.reshape(style.shape).to(style.dtype)


def _sym_power(cov: torch.Tensor, power: float) -> torch.Tensor:
    """cov^power for a symmetric positive-definite matrix (eigendecomposition)."""
    values, vectors = torch.linalg.eigh(cov)
    return vectors @ torch.diag(values.clamp_min(1e-12) ** power) @ vectors.T


def output_image(x: torch.Tensor, colours_of: torch.Tensor | None = None) -> Image.Image:
    """The image the caller sees for pixels ``x`` ([1, 3, H, W]): clamped to [0, 1], with the
    chroma of ``colours_of`` (same shape) when given."""
    x = x.detach().clamp(0, 1)
    if colours_of is not None:
        x = keep_colours(x, colours_of)
    return to_image(x)
