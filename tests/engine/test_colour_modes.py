"""The `colour` option in the engine (issue 20): 'luminance' returns the content's chroma,
'match' computes the style targets from the style recoloured to the content's statistics,
and the target cache keeps the modes (and the content matched to) apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import noise
from PIL import Image

from gramstyle.engine.colour import match_colours
from gramstyle.engine.losses import gram_target
from gramstyle.engine.objective import Objective
from gramstyle.engine.target_cache import TargetCache
from gramstyle.engine.tensors import to_tensor
from gramstyle.errors import FieldError
from gramstyle.options import StyleOptions

W, H = 64, 48
#: RGB -> YIQ (the rows give Y, I, Q), as gramstyle.engine.colour uses.
YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def smooth_colours(seed: int) -> Image.Image:
    """A colourful image with values well inside (0, 255): smooth gradients plus mild noise."""
    y, x = np.mgrid[0:H, 0:W] / max(W, H)
    rng = np.random.default_rng(seed)
    rgb = np.stack([0.5 + 0.3 * np.sin(6 * x + seed), 0.45 + 0.25 * np.cos(5 * y),
                    0.4 + 0.3 * np.sin(4 * (x + y))], -1)
    rgb += rng.normal(0, 0.03, rgb.shape)
    return Image.fromarray((255 * rgb.clip(0.05, 0.95)).round().astype(np.uint8))


def yiq(image: Image.Image) -> np.ndarray:
    return (np.asarray(image, np.float64) / 255) @ YIQ.T


def options(engine, **values) -> StyleOptions:
    return engine.validate(StyleOptions(size=W, precision="fp32", **values))


def test_luminance_run_keeps_the_contents_chroma(random_engine):
    content, style = smooth_colours(1), noise(W, H, 7)
    out = random_engine.stylize(content, style, options(
        random_engine, colour="luminance", iterations=4, style_weight=1e3)).image
    assert out.size == content.size
    pixels = np.asarray(out)
    inside = ((pixels > 0) & (pixels < 255)).all(-1)  # where no channel clips
    assert inside.mean() > 0.5
    got, want = yiq(out), yiq(content)
    # I and Q are the content's up to the output's 8-bit rounding ...
    assert np.abs(got[..., 1:] - want[..., 1:])[inside].max() < 0.006
    # ... while the luminance was stylised.
    assert np.abs(got[..., 0] - want[..., 0]).mean() > 0.01
    # A plain run changes the chroma: the test above can tell.
    plain = random_engine.stylize(content, style, options(
        random_engine, iterations=4, style_weight=1e3)).image
    assert np.abs(yiq(plain)[..., 1:] - want[..., 1:]).max() > 0.02


def test_match_targets_are_those_of_the_prematched_style(random_engine):
    content, style = smooth_colours(2), noise(W, H, 3)
    opts = options(random_engine, colour="match")
    net = random_engine.network("fp32")
    objective = Objective.build(net, [content], [style], opts)
    layers = list(opts.style_layers)
    matched = match_colours(to_tensor(style, "cpu"), to_tensor(content, "cpu"))
    assert matched.min() < 0.05 or matched.max() > 0.95  # a real recolouring
    with torch.no_grad():
        feats = net(matched, layers)
        expected = {n: gram_target(feats[n]) for n in layers}
    for n in layers:
        torch.testing.assert_close(objective.style.losses[n].target.mean, expected[n],
                                   rtol=1e-5, atol=1e-7)
    # The plain targets are different, so the comparison can fail.
    plain = Objective.build(net, [content], [style], options(random_engine))
    assert not torch.allclose(plain.style.losses[layers[0]].target.mean, expected[layers[0]],
                              rtol=1e-3)


def test_the_target_cache_keys_the_mode_and_the_matched_content(random_engine):
    net = random_engine.network("fp32")
    style = noise(W, H, 4)
    cache = TargetCache()

    def style_target(content: Image.Image, **values) -> torch.Tensor:
        objective = Objective.build(net, [content], [style], options(random_engine, **values),
                                    cache=cache, model_key=("test",))
        return objective.style.losses["relu1_1"].target.mean

    a, b = smooth_colours(5), smooth_colours(6)
    uncached = Objective.build(net, [b], [style], options(random_engine, colour="match"))
    plain = style_target(a)
    match_a = style_target(a, colour="match")
    match_b = style_target(b, colour="match")
    lum = style_target(a, colour="luminance")
    assert not torch.allclose(plain, match_a) and not torch.allclose(match_a, match_b)
    assert not torch.allclose(plain, lum) and not torch.allclose(match_a, lum)
    torch.testing.assert_close(match_b, uncached.style.losses["relu1_1"].target.mean)
    # A repeat hits the cache with the same numbers.
    hits = cache.stats().hits
    torch.testing.assert_close(style_target(b, colour="match"), match_b)
    assert cache.stats().hits > hits


def test_luminance_losses_see_only_the_candidates_luminance(random_engine):
    content, style = smooth_colours(8), noise(W, H, 9)
    grey = Image.fromarray(np.repeat(np.asarray(content.convert("L"))[..., None], 3, -1))
    opts = options(random_engine, colour="luminance")
    a = random_engine.compute_losses(content, [content], [style], opts).losses
    b = random_engine.compute_losses(grey, [content], [style], opts).losses
    # The candidate and its grey version have (nearly) the same luminance.
    assert a.style == pytest.approx(b.style, rel=2e-2)
    assert a.content < 1e-3 and b.content < 1e-2


@pytest.mark.parametrize("mode", ["luminance", "match"])
def test_colour_modes_need_a_content_image(random_engine, mode):
    with pytest.raises(FieldError, match=f"^colour: '{mode}' needs a content image"):
        random_engine.stylize([], noise(W, H), options(random_engine, colour=mode,
                                                       content_weight=0, iterations=1))


def test_luminance_with_tiles_gives_the_same_gradient(random_engine):
    content, style = smooth_colours(10), noise(W, H, 11)
    whole, tiled = (random_engine.compute_losses(
        content, [content], [style], options(random_engine, colour="luminance", tile=t),
        gradient=True) for t in ("off", 32))
    a = np.frombuffer(whole.gradient_bytes, "<f4")
    b = np.frombuffer(tiled.gradient_bytes, "<f4")
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
    # The gradient of a luminance-only loss is the same in R, G and B up to the Y weights.
    g = a.reshape(3, H, W)
    np.testing.assert_allclose(g[0] / 0.299, g[1] / 0.587, rtol=1e-4, atol=1e-9)
