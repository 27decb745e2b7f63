"""Progress names the scale, and in a tiled run the tile pass and the tile, rate-limited;
the fields pass through the codec."""

from __future__ import annotations

import pytest
from PIL import Image

from gramstyle import codec
from gramstyle.engine import optimise, tiles
from gramstyle.engine.stop import Cancelled
from gramstyle.options import StyleOptions
from gramstyle.results import Losses, Progress

SHALLOW = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"))


def _pair(images, side: int = 64):
    return ([Image.open(images["cat"]).convert("RGB").resize((side, side * 2 // 3))],
            [Image.open(images["starry"]).convert("RGB").resize((side, side))])


def test_progress_names_each_scale(random_engine, images):
    reports: list[Progress] = []
    random_engine.stylize(*_pair(images), StyleOptions(
        size=64, scales=2, iterations=2, tolerance=0.0, progress_every=1, tile="off",
        **SHALLOW), progress=reports.append)
    assert [(p.iteration, p.scale, p.scales, p.scale_size) for p in reports] == [
        (0, 1, 2, 45), (1, 1, 2, 45), (2, 2, 2, 64), (3, 2, 2, 64), (4, 2, 2, 64)]
    assert all(p.tiles == 0 for p in reports)
    assert reports[2].where == "scale 2/2 64px"


def test_tiled_progress_names_the_pass_and_the_tile(random_engine, images, monkeypatch):
    monkeypatch.setattr(optimise, "TILE_PROGRESS_INTERVAL_S", 0.0)  # every tile
    reports: list[Progress] = []
    result = random_engine.stylize(*_pair(images, 96), StyleOptions(
        size=96, iterations=2, tolerance=0.0, progress_every=1, tile=16, precision="fp32",
        **SHALLOW), progress=reports.append)
    tiled = [p for p in reports if p.tiles]
    field = tiles.receptive_field(random_engine.extractor, [*SHALLOW["content_layers"],
                                                            *SHALLOW["style_layers"]])
    first = len(tiles.plan(64, 96, tiles.first_pass_tile(16, "fp32"), field))
    second = len(tiles.plan(64, 96, 16, field))
    assert second == 6 * 4 and first == 4 * 3  # pass 1: 24 px tiles
    # None before the first losses are known (iteration 0 is reported after the first
    # step), then every tile of both passes of the second step.
    stages = [(p.tile_pass, p.tile, p.tiles) for p in tiled]
    assert stages == ([(1, k, first) for k in range(1, first + 1)]
                      + [(2, k, second) for k in range(1, second + 1)])
    assert all(p.iteration == 0 and p.losses == reports[0].losses for p in tiled)
    assert tiled[-1].where == f"tile {second}/{second} (gradient)"
    assert tiled[0].where == f"tile 1/{first} (loss)"
    assert result.iterations == 2


def test_tile_reports_come_at_most_once_a_second(random_engine, images):
    reports: list[Progress] = []
    random_engine.stylize(*_pair(images, 96), StyleOptions(
        size=96, iterations=3, tolerance=0.0, tile=16, precision="fp32", **SHALLOW),
        progress=reports.append)
    times = [p.elapsed_s for p in reports if p.tiles]
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:], strict=False))


def test_progress_fields_pass_the_codec():
    progress = Progress(4, 10, Losses(1.0, 0.5, 0.25, 0.0), 2.5, scale=2, scales=3,
                        scale_size=1448, tile_pass=2, tile=5, tiles=12, precision="bf16")
    back = codec.progress_from(codec.progress_message(progress, "png").progress)
    assert (back.scale, back.scales, back.scale_size, back.tile_pass, back.tile,
            back.tiles) == (2, 3, 1448, 2, 5, 12)
    assert back.where == "scale 2/3 1448px, tile 5/12 (gradient)"
    assert Progress(0, 1, Losses(0, 0, 0, 0), 0).where == ""


def test_cancelling_still_stops_between_tiles(random_engine, images):
    # The tile hook runs after the stop check: a stop requested at a tile report ends the
    # run before the next tile.
    seen: list[Progress] = []
    stop = {"now": False}

    def progress(p: Progress) -> None:
        seen.append(p)
        if p.tiles:
            stop["now"] = True

    with pytest.raises(Cancelled):
        random_engine.stylize(*_pair(images, 96), StyleOptions(
            size=96, iterations=5, tolerance=0.0, progress_every=1, tile=16,
            precision="fp32", **SHALLOW), progress=progress, should_stop=lambda: stop["now"])
    after = [p for p in seen if p.tiles]
    assert len(after) == 1  # the next tile never started

