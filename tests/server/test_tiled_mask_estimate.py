"""The memory estimate of a tiled run with region and source masks: the masks at the style
layers' resolutions are image-sized buffers that no tile bounds, so a tiled estimate counts
them (server/memory.py); the untiled estimate is unchanged."""

from __future__ import annotations

import pytest

from gramstyle.images import ImageHeader, long_side_size
from gramstyle.options import StyleOptions
from gramstyle.server import memory

#: Style layers down to relu5_1 and their total strides (VGG19).
LAYERS = {"relu1_1": 1, "relu2_1": 2, "relu3_1": 4, "relu4_1": 8, "relu5_1": 16}


def header(width: int, height: int) -> ImageHeader:
    return ImageHeader("PNG", "L", width, height)


def maps(width: int, height: int) -> int:
    """float32 bytes of one mask at every style layer's resolution."""
    return sum(4 * (width // s) * (height // s) for s in LAYERS.values())


def estimate(engine, tile, masks: dict) -> memory.Estimate:
    options = engine.validate(StyleOptions(size=1024, tile=tile, precision="fp32",
                                           content_layers=("relu4_2",),
                                           style_layers=tuple(LAYERS)))
    return memory.estimate_stylize(engine.extractor, options, [header(1024, 768)],
                                   [header(600, 400), header(800, 800)], masks, 0)


def test_tiled_estimate_counts_the_masks_at_the_style_layers(random_engine):
    region = {"style_mask": [header(512, 384), header(1024, 768)]}
    source = {"style_source_mask": [header(300, 200)]}  # the first style's: 1024 x 683 px
    both = {**region, **source}
    base = estimate(random_engine, 256, {})
    masked = estimate(random_engine, 256, both)
    # Each mask's float copy at the size it is used at (as untiled) ...
    copies = 4 * (2 * 1024 * 768 + 1024 * 683)
    assert long_side_size(300, 200, 1024) == (1024, 683)
    # ... plus each region mask's maps twice (the loss's, the tiled objective's normalised
    # copy) and the source mask's maps at its style size.
    extra = 2 * 2 * maps(1024, 768) + maps(1024, 683)
    assert masked.parts["targets"] - base.parts["targets"] == pytest.approx(
        memory.MARGIN * (copies + extra), abs=2)
    # Untiled, the masks cost their copies only, as before.
    plain, plain_masked = estimate(random_engine, "off", {}), estimate(random_engine, "off",
                                                                        both)
    assert plain_masked.parts["targets"] - plain.parts["targets"] == pytest.approx(
        memory.MARGIN * copies, abs=2)
    # A skipped mask (an empty entry is not probed, so it has no header) costs nothing.
    one = estimate(random_engine, 256, {"style_mask": [header(1024, 768)]})
    assert one.parts["targets"] - base.parts["targets"] == pytest.approx(
        memory.MARGIN * (4 * 1024 * 768 + 2 * maps(1024, 768)), abs=2)
