"""The memory estimate of a tiled run (tile): the network sized by the tile, the
image-sized vectors by the image; and bench/tiled_memory.py's smoke mode, measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from gramstyle.images import ImageHeader
from gramstyle.options import StyleOptions
from gramstyle.server.memory import estimate_losses, estimate_stylize

REPO = Path(__file__).resolve().parents[2]


def _header(width: int, height: int) -> ImageHeader:
    return ImageHeader(format="PNG", mode="RGB", width=width, height=height)


def _stylize(engine, size: int, tile: str | int):
    options = engine.validate(StyleOptions(size=size, tile=tile, precision="fp32"))
    return estimate_stylize(engine.extractor, options, [_header(size, size * 3 // 4)],
                            [_header(512, 512)])


def test_tiled_estimate_bounds_the_network_by_the_tile(random_engine):
    whole, tiled = _stylize(random_engine, 2048, "off"), _stylize(random_engine, 2048, 256)
    assert tiled.total < whole.total / 2, (whole.describe(), tiled.describe())
    assert tiled.parts["activations"] < whole.parts["activations"] / 4
    # The optimiser's image-sized history is the same either way.
    assert tiled.parts["optimiser"] == whole.parts["optimiser"]
    # Growing the image grows only the image-sized terms: activations of a tiled run at
    # 2048 px minus its three image-sized vectors equal the network's part at 1024 px's.
    small, big = _stylize(random_engine, 1024, 256), _stylize(random_engine, 2048, 256)
    vectors = lambda side: 1.25 * 3 * 12 * side * (side * 3 // 4)  # noqa: E731
    assert big.parts["activations"] - vectors(2048) == pytest.approx(
        small.parts["activations"] - vectors(1024), rel=1e-6)


def test_tiled_estimate_of_compute_losses(random_engine):
    options = random_engine.validate(StyleOptions(tile=128, precision="fp32"))
    untiled = random_engine.validate(StyleOptions(precision="fp32"))
    args = (_header(1536, 1024), [_header(1536, 1024)], [_header(512, 512)], True)
    assert (estimate_losses(random_engine.extractor, options, *args).total
            < estimate_losses(random_engine.extractor, untiled, *args).total / 2)


def _bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_tiled_memory",
                                                      REPO / "bench" / "tiled_memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_tiled_memory_bench_smoke(capsys):
    whole, tiled = _bench().main(["--smoke"])
    assert (whole["tile"], tiled["tile"]) == (0, 64)
    assert (whole["width"], whole["height"]) == (tiled["width"], tiled["height"]) == (96, 72)
    assert tiled["loss"] == pytest.approx(whole["loss"], rel=1e-4)
    for row in (whole, tiled):
        assert 0 < row["peak_mib"] <= row["estimate_mib"], row
    assert "| vgg19 | 96x72 | 64 |" in capsys.readouterr().out
