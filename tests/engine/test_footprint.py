"""The engine's memory estimate (gramstyle.engine.footprint): the optimiser's state, the
choice of tile for ``tile`` "auto", and the in-process engine tiling when the untiled run
would not fit the memory available."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gramstyle.engine import StyleTransfer, footprint, optimise, tiles
from gramstyle.engine.lbfgs import LBFGS
from gramstyle.options import StyleOptions

LAYERS = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"))


@pytest.fixture(scope="module")
def vgg16_random() -> StyleTransfer:
    return StyleTransfer(arch="vgg16", weights="random", device="cpu", max_size=4096)


def test_lbfgs_history_shrinks_to_its_byte_budget():
    assert optimise.lbfgs_history(512 * 384) == optimise.LBFGS_HISTORY == 20
    assert optimise.lbfgs_history(2048 * 2048) == 20
    assert optimise.lbfgs_history(4096 * 3072) == 7  # 2 GiB / (24 B x 12.6 MP)
    assert optimise.lbfgs_history(8192 * 8192) == optimise.LBFGS_MIN_HISTORY == 5
    for pixels in (2048 * 2048, 4096 * 3072):
        pairs = optimise.lbfgs_history(pixels)
        assert pairs * 24 * pixels <= optimise.LBFGS_HISTORY_BYTES


def test_the_optimiser_keeps_the_history_the_estimate_counts():
    import torch

    x = torch.zeros(1, 3, 3072, 4096, requires_grad=True)
    made = optimise.make_optimizer(x, StyleOptions().validated())
    assert isinstance(made, LBFGS) and made.history_size == 7


def test_the_estimate_counts_the_optimiser_state(vgg16_random):
    content, style = Image.new("RGB", (400, 300)), Image.new("RGB", (256, 256))
    inputs = {"content": [content], "style": [style]}

    def optimiser_part(**options) -> int:
        checked = vgg16_random.validate(StyleOptions(scales=1, tile=256, **options))
        phases = footprint.stylize_phases(vgg16_random.extractor, checked, inputs, 0)
        return phases["optimise0"]["optimiser"]

    pixels = 4096 * 3072
    # L-BFGS: min(iterations, history) pairs of two RGB float32 images, and 6 working copies.
    assert optimiser_part(size=4096, iterations=300) == (2 * 7 + 6) * 12 * pixels
    assert optimiser_part(size=4096, iterations=3) == (2 * 3 + 6) * 12 * pixels
    assert optimiser_part(size=1024, iterations=300) == (2 * 20 + 6) * 12 * 1024 * 768
    # Adam: two moments, the gradient and a working copy.
    assert optimiser_part(size=4096, optimizer="adam") == 4 * 12 * pixels
    # The estimate's part is the phase's, times the margin.
    checked = vgg16_random.validate(StyleOptions(size=4096, scales=1, tile=256))
    estimate = footprint.peak(footprint.stylize_phases(vgg16_random.extractor, checked,
                                                       inputs, 0))
    assert estimate.parts["optimiser"] == int(footprint.MARGIN * 20 * 12 * pixels)


def test_choose_tile(vgg16_random):
    options = vgg16_random.validate(StyleOptions(size=1024, scales=1, **LAYERS))
    inputs = {"content": [Image.new("RGB", (1024, 768))], "style": [Image.new("RGB", (64, 64))]}

    def estimate_of(checked):
        return footprint.peak(footprint.stylize_phases(vgg16_random.extractor, checked,
                                                       inputs, 0))

    def sides():
        return footprint.tile_sides(vgg16_random.extractor, options, True, True, 1024)

    untiled = estimate_of(options).total
    assert footprint.choose_tile(estimate_of, options, sides, None)[1].tile == "off"
    assert footprint.choose_tile(estimate_of, options, sides, untiled)[1].tile == "off"
    # Below the untiled estimate: the largest tile whose estimate fits.
    limit = estimate_of(options.resolved(options.network, tile=128)).total
    estimate, chosen, fits = footprint.choose_tile(estimate_of, options, sides, limit)
    assert fits and chosen.tile >= 128 and estimate.total <= limit
    bigger = [s for s in sides() if s > chosen.tile]
    assert all(estimate_of(options.resolved(options.network, tile=s)).total > limit
               for s in bigger[:2])
    # Nothing fits: the smallest tile, and False.
    estimate, chosen, fits = footprint.choose_tile(estimate_of, options, sides, 1)
    assert not fits and chosen.tile == sides()[0] == 16
    # A tile given is kept as it is.
    given = options.resolved(options.network, tile=64)
    assert footprint.choose_tile(estimate_of, given, sides, 1)[1].tile == 64


def _run(engine, images, tile, monkeypatch, memory_limit):
    """A 128 px Stylize (fp32, shallow layers) with this memory limit; (result, the tile
    of every objective built)."""
    built = []
    real = tiles.evaluate_terms

    def spy(objective, x, tile):
        built.append(tile)
        return real(objective, x, tile)

    monkeypatch.setattr(tiles, "evaluate_terms", spy)
    monkeypatch.setattr(engine, "memory_limit", memory_limit)
    content = Image.open(images["cat"]).convert("RGB")
    style = Image.open(images["starry"]).convert("RGB")
    result = engine.stylize([content], [style], StyleOptions(
        size=128, iterations=3, tolerance=0.0, precision="fp32", tile=tile, **LAYERS))
    return result, built


@pytest.mark.slow
def test_in_process_auto_tiles_when_the_memory_available_is_small(vgg16_random, images,
                                                                   monkeypatch):
    plenty, untiled = _run(vgg16_random, images, "auto", monkeypatch, 2**40)
    assert untiled == []  # fits: the whole image at once
    # A limit that the untiled run does not fit, but tiles of 32 px do.
    options = vgg16_random.validate(StyleOptions(size=128, scales=1, precision="fp32",
                                                 iterations=3, **LAYERS))
    inputs = {"content": [Image.open(images["cat"])], "style": [Image.open(images["starry"])]}
    held = 4 * sum(i.width * i.height for v in inputs.values() for i in v)

    def estimate(tile):
        checked = options.resolved(options.network, tile=tile)
        return footprint.peak(footprint.stylize_phases(vgg16_random.extractor, checked,
                                                       inputs, held)).total

    assert estimate(32) < estimate("off")
    tight, tiled = _run(vgg16_random, images, "auto", monkeypatch, estimate(32))
    # Every evaluation tiled, with the largest tile that fits (32 px, or a larger one whose
    # estimate is no larger).
    assert tiled and len(set(tiled)) == 1 and tiled[0] >= 32
    assert estimate(tiled[0]) <= estimate(32)
    # The same objective and gradient: the same image and loss, up to summation order.
    assert tight.losses.total == pytest.approx(plenty.losses.total, rel=1e-4)
    a, b = (np.asarray(r.image, dtype=np.float32) for r in (plenty, tight))
    assert np.abs(a - b).max() <= 2  # of 255
    # The memory the machine has, by default: a positive number of bytes.
    monkeypatch.setattr(vgg16_random, "memory_limit", None)
    assert 0 < vgg16_random.memory_available()
