"""Control over the picture (issue 20), engine side: regions by guided Gram matrices (style
masks, source masks) and colour control (luminance-only transfer, colour matching).

Random VGG19 weights (the session's ``random_engine``) and small images: the region tests
measure each region's guided Gram distance to each style, which does not need a trained
network to separate two styles.
"""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from gramstyle import kernels  # noqa: E402
from gramstyle.engine.colour import _RGB_TO_YIQ, keep_colours, luminance, match_colours  # noqa: E402
from gramstyle.engine.masks import layer_weights  # noqa: E402
from gramstyle.engine.tensors import to_tensor  # noqa: E402
from gramstyle.options import StyleOptions  # noqa: E402

W, H = 64, 32  # the output of the region tests; VGG19 needs 16 px at relu5_1


def halves(width: int = W, height: int = H) -> tuple[Image.Image, Image.Image]:
    """Complementary masks: white on the left half, and white on the right half."""
    left = Image.new("L", (width, height), 0)
    left.paste(255, (0, 0, width // 2, height))
    return left, Image.eval(left, lambda v: 255 - v)


@pytest.fixture(scope="module")
def content(images) -> Image.Image:
    return Image.open(images["cat"]).convert("RGB").resize((W, H), Image.Resampling.LANCZOS)


def options(**kwargs) -> StyleOptions:
    return StyleOptions(size=W, **kwargs)


def style_layer_losses(engine, image, content, style, mask=None, source=None, **kwargs):
    report = engine.compute_losses(image, [content], [style], options(**kwargs),
                                   style_mask=None if mask is None else [mask],
                                   style_source_mask=None if source is None else [source])
    return report.losses.style_layers


# ------------------------------------------------------------------------------------------
# Regions: guided Gram matrices
# ------------------------------------------------------------------------------------------


def test_styles_without_masks_are_bit_identical(random_engine, content, images) -> None:
    """None masks (or lists of None) are today's loss and gradient, bit for bit."""
    styles = [images["starry"], images["scream"]]
    plain = random_engine.compute_losses(content, [content], styles, options(), gradient=True)
    for masks in ([None, None], []):
        masked = random_engine.compute_losses(content, [content], styles, options(),
                                              gradient=True, style_mask=masks,
                                              style_source_mask=masks)
        assert masked.losses == plain.losses
        assert masked.gradient_bytes == plain.gradient_bytes


@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-5), ("bf16", 1e-3)])
def test_all_ones_masks_equal_the_unmasked_loss(random_engine, content, images, precision: str,
                                                tol: float) -> None:
    """All-ones masks give the plain Gram: equal up to rounding. In bf16 the weighted
    features F w (w = 1/sqrt(N) after normalisation) are rounded to bf16 once more, a
    relative error of ~2^-9 per product that averages to ~1e-4 in the loss."""
    ones = Image.new("L", content.size, 255)
    style = images["starry"]
    opts = options(precision=precision)
    plain = random_engine.compute_losses(content, [content], [style], opts, gradient=True)
    masked = random_engine.compute_losses(content, [content], [style], opts, gradient=True,
                                          style_mask=[ones], style_source_mask=[
                                              Image.new("L", Image.open(style).size, 255)])
    for layer, value in plain.losses.style_layers.items():
        assert masked.losses.style_layers[layer] == pytest.approx(value, rel=tol), layer
    grad = torch.frombuffer(bytearray(plain.gradient_bytes), dtype=torch.float32)
    masked_grad = torch.frombuffer(bytearray(masked.gradient_bytes), dtype=torch.float32)
    assert (masked_grad - grad).abs().max().item() <= 10 * tol * grad.abs().max().item()


def test_region_mask_confines_the_gradient(random_engine, content, images) -> None:
    """At relu1_1 (two 3x3 convolutions: a 2 px receptive radius) the style gradient of a
    left-half region is exactly zero beyond 2 px right of the boundary, and not zero inside."""
    left, _ = halves()
    report = random_engine.compute_losses(
        content, [content], [images["starry"]],
        options(style_layers=("relu1_1",), content_weight=0.0, tv_weight=0.0),
        gradient=True, style_mask=[left])
    grad = torch.frombuffer(bytearray(report.gradient_bytes), dtype=torch.float32).reshape(
        3, H, W)
    assert grad[:, :, W // 2 + 2:].abs().max().item() == 0.0
    assert grad[:, :, : W // 2].abs().max().item() > 0.0


def test_masks_are_pooled_like_the_network(random_engine) -> None:
    """A layer's weights are the mask average-pooled 2x2 at each pooling layer before it:
    the feature map's own size, and the mean of the mask over each position's window."""
    mask = torch.rand(1, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    layers = ["relu1_1", "relu2_1", "pool2", "relu3_1", "relu5_1"]
    weights = layer_weights(mask, random_engine.extractor, layers)
    feats = random_engine.extractor(torch.rand(1, 3, 32, 48), layers)
    for name in layers:
        assert weights[name].shape == (1, feats[name].shape[2] * feats[name].shape[3]), name
    assert torch.equal(weights["relu1_1"], mask.flatten(1))
    assert torch.allclose(weights["relu2_1"], mask.reshape(16, 2, 24, 2).mean((1, 3)).flatten()
                          [None])
    assert torch.allclose(weights["relu5_1"], mask.reshape(2, 16, 3, 16).mean((1, 3)).flatten()
                          [None], atol=1e-6)


def test_source_mask_takes_the_statistics_from_its_part(random_engine, images) -> None:
    """A style image made of two pictures side by side: with a source mask on its left
    half, a candidate that *is* the left picture scores far better than with the right half
    selected, or with the whole image. (Same image and size each time: the target cache
    must keep them apart by the mask.)"""
    a = Image.open(images["starry"]).convert("RGB").resize((64, 64))
    b = Image.open(images["scream"]).convert("RGB").resize((64, 64))
    both = Image.new("RGB", (128, 64))
    both.paste(a, (0, 0))
    both.paste(b, (64, 0))
    left, right = halves(128, 64)
    # style_scale 2: the 128 px wide style image is used as it is (long side 2 * 64).
    kwargs = {"content_weight": 0.0, "style_scale": 2.0}
    own = style_layer_losses(random_engine, a, a, both, source=left, **kwargs)
    other = style_layer_losses(random_engine, a, a, both, source=right, **kwargs)
    whole = style_layer_losses(random_engine, a, a, both, **kwargs)
    for layer in own:
        assert own[layer] < 0.5 * other[layer], layer
    # relu5_1's receptive field spans both halves, so only the layers together beat the
    # whole image there
    assert sum(own.values()) < 0.8 * sum(whole.values())


@pytest.mark.slow
def test_two_styles_on_two_halves(random_engine, images) -> None:
    """Two styles with complementary masks: after a short run, at every style layer, each
    half's guided Gram is closer to its own style than to the other, and closer than at the
    start (the content image). 96x64 px: at relu5_1 each half is then 3x4 positions (at
    64x32 only 2x2, whose receptive fields all span both halves)."""
    width, height = 96, 64
    content = Image.open(images["cat"]).convert("RGB").resize((width, height))
    left, right = halves(width, height)
    a, b = images["starry"], images["scream"]
    opts = StyleOptions(size=width, iterations=15, precision="fp32")
    out = random_engine.stylize([content], [a, b], opts, style_mask=[left, right]).image

    def distances(image):
        return {(half, style): random_engine.compute_losses(
                    image, [content], [s], opts, style_mask=[m]).losses.style_layers
                for half, m in (("left", left), ("right", right))
                for style, s in (("a", a), ("b", b))}

    start, end = distances(content), distances(out)
    for layer in end["left", "a"]:
        for half, own, other in (("left", "a", "b"), ("right", "b", "a")):
            assert end[half, own][layer] < 0.7 * end[half, other][layer], (layer, half)
            assert end[half, own][layer] < start[half, own][layer], (layer, half)


def test_mask_errors_name_the_field(random_engine, content, images) -> None:
    styles = [images["starry"], images["scream"]]
    left, right = halves()

    def losses(**kwargs):
        return random_engine.compute_losses(content, [content], styles, options(), **kwargs)

    with pytest.raises(ValueError, match=r"^style_mask: 3 given for 2 style image\(s\)"):
        losses(style_mask=[left, right, left])
    with pytest.raises(ValueError, match=r"^style_source_mask: 1 given for 2 style image"):
        losses(style_source_mask=[left])
    with pytest.raises(ValueError, match=r"^style_mask\[1\]: 32x32 px does not have the aspect "
                                         r"ratio of the output \(64x32 px\)"):
        losses(style_mask=[left, Image.new("L", (32, 32), 255)])
    with pytest.raises(ValueError, match=r"^style_mask\[0\]: the mask is black everywhere"):
        losses(style_mask=[Image.new("L", (W, H), 0), None])
    with pytest.raises(ValueError, match=r"^style_source_mask\[1\]: 10x50 px does not have the "
                                         r"aspect ratio of style\[1\]"):
        losses(style_source_mask=[None, Image.new("L", (10, 50), 255)])
    with pytest.raises(ValueError, match=r"^style_mask\[0\]"):
        losses(style_mask=[b"not an image", None])
    with pytest.raises(ValueError, match=r"^style_mask: give a sequence with one mask per style"):
        losses(style_mask=left)


def test_masks_accept_paths_and_bytes(random_engine, content, images, tmp_path) -> None:
    left, right = halves()
    path = tmp_path / "left.png"
    left.save(path)
    data = io.BytesIO()
    right.save(data, format="PNG")
    styles = [images["starry"], images["scream"]]
    as_images = random_engine.compute_losses(content, [content], styles, options(),
                                             style_mask=[left, right])
    as_files = random_engine.compute_losses(content, [content], styles, options(),
                                            style_mask=[str(path), data.getvalue()])
    assert as_files.losses == as_images.losses


# ------------------------------------------------------------------------------------------
# Colour control
# ------------------------------------------------------------------------------------------


def _pixels(path, size=(48, 40)) -> torch.Tensor:
    return to_tensor(Image.open(path).convert("RGB").resize(size, Image.Resampling.LANCZOS),
                     "cpu")


def _yiq(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.double(), x.double())


def test_luminance_is_grey_with_the_same_y(images) -> None:
    x = _pixels(images["starry"])
    grey = luminance(x)
    yiq = _yiq(grey)
    assert grey.shape == x.shape
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert (yiq[:, 0] - _yiq(x)[:, 0]).abs().max().item() < 1e-6
    assert yiq[:, 1:].abs().max().item() < 1e-6


def test_luminance_transfer_keeps_the_content_chroma(images) -> None:
    """The recombination: the result's I, Q are the content's (where no channel clips),
    its Y is the stylised luminance."""
    content = _pixels(images["cat"])
    stylised_y = luminance(_pixels(images["scream"]) * 0.6 + 0.2)
    out = keep_colours(stylised_y, content)
    inside = ((out > 0) & (out < 1)).all(1)
    assert inside.float().mean() > 0.5
    diff = (_yiq(out) - _yiq(content))[:, 1:].abs().amax(1)
    assert diff[inside].max().item() < 1e-5
    assert ((_yiq(out)[:, 0] - _yiq(stylised_y)[:, 0]).abs()[inside]).max().item() < 1e-5


@pytest.mark.parametrize("method", ["sqrt", "cholesky"])
def test_colour_matching_gives_the_content_mean_and_covariance(images, method: str) -> None:
    style = _pixels(images["starry"], (60, 47))
    content = _pixels(images["cat"])
    matched = match_colours(style, content, method)
    xm, xc = matched.double().flatten(2)[0], content.double().flatten(2)[0]
    assert matched.shape == style.shape and matched.dtype == style.dtype
    assert (xm.mean(1) - xc.mean(1)).abs().max().item() < 1e-5
    cov_m, cov_c = torch.cov(xm, correction=0), torch.cov(xc, correction=0)
    assert (cov_m - cov_c).abs().max().item() < 1e-4 * cov_c.abs().max().item()
    # and the style's before was far from it
    cov_s = torch.cov(style.double().flatten(2)[0], correction=0)
    assert (cov_s - cov_c).abs().max().item() > 0.1 * cov_c.abs().max().item()


def test_colour_matching_methods_differ_but_keep_structure(images) -> None:
    """Both are linear maps with A Sigma_s A^T = Sigma_c; they differ by a rotation, and
    each keeps the style's spatial structure (a bijective per-pixel map)."""
    style, content = _pixels(images["scream"]), _pixels(images["astronaut"])
    a, b = match_colours(style, content, "sqrt"), match_colours(style, content, "cholesky")
    assert (a - b).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="method: must be 'sqrt' or 'cholesky'"):
        match_colours(style, content, "pca")


def test_guided_gram_kernel_matches_the_loss_formula(random_engine) -> None:
    """The losses module's guided Gram: F diag(m^2) F^T / (C sum m^2)."""
    from gramstyle.engine.losses import gram_target

    f = torch.rand(1, 8, 4, 6, generator=torch.Generator().manual_seed(1))
    m = torch.rand(1, 24, generator=torch.Generator().manual_seed(2))
    f3 = f.flatten(2)[0].double()
    m2 = m[0].double().square()
    expected = (f3 * m2) @ f3.T / (8 * m2.sum())
    assert torch.allclose(gram_target(f, m).double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(gram_target(f), kernels.gram(f).squeeze(0))
