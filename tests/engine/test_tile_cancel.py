"""Stopping a tiled run (issue 19): a stop requested while a tile is running ends the run
before another tile starts, within about one tile's time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import noise

from gramstyle.engine import StyleTransfer
from gramstyle.engine.stop import Cancelled
from gramstyle.options import StyleOptions

SHALLOW = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"),
               precision="fp32")


@pytest.fixture(scope="module")
def engine() -> StyleTransfer:
    # Its own engine: a target cache shared with other tests would skip target tiles.
    return StyleTransfer(arch="vgg16", weights="random", device="cpu")


def _counting_passes(engine: StyleTransfer, monkeypatch, stop_at: int):
    """Wrap the network: record (start, end) of every tile pass, and request the stop when
    pass ``stop_at`` (1-based) starts. Returns (passes, stop event, stop time holder)."""
    passes: list[list[float]] = []
    stop, stopped_at = threading.Event(), []
    forward = engine.extractor.forward

    def counted(images: torch.Tensor, layers, check=None):
        passes.append([time.perf_counter(), float("nan")])
        if len(passes) == stop_at:
            stopped_at.append(time.perf_counter())
            stop.set()
        result = forward(images, layers, check)
        passes[-1][1] = time.perf_counter()
        return result
    monkeypatch.setattr(engine.extractor, "forward", counted)
    return passes, stop, stopped_at


@pytest.mark.parametrize("method", ["compute_losses", "stylize"])
def test_a_stop_during_a_tile_ends_the_run_before_the_next_tile(engine, monkeypatch, method):
    content, style = noise(96, 72, 1), noise(96, 96, 2)
    options = StyleOptions(size=96, tile=32, iterations=2, optimizer="adam", **SHALLOW)
    # The whole run, untouched, for the number of passes and one tile's time.
    passes, _, _ = _counting_passes(engine, monkeypatch, stop_at=-1)
    run = getattr(engine, method)
    args = (content, [content], [style]) if method == "compute_losses" else ([content], [style])
    extra = {"gradient": True} if method == "compute_losses" else {}
    run(*args, options, **extra)
    total = len(passes)
    one_tile = max(end - start for start, end in passes)
    assert total > 20, total  # 3 x 2 tiles of 32 px, two passes, targets and evaluations
    monkeypatch.undo()
    engine.target_cache.clear()

    stop_at = total // 2
    passes, stop, stopped_at = _counting_passes(engine, monkeypatch, stop_at=stop_at)
    with pytest.raises(Cancelled):
        run(*args, options, should_stop=stop.is_set, **extra)
    ended = time.perf_counter()
    # No tile pass started after the stop; the one running was cut short.
    assert len(passes) == stop_at, (len(passes), stop_at)
    latency = ended - stopped_at[0]
    print(f"{method}: {total} passes, longest {one_tile * 1e3:.1f} ms; stopped after "
          f"{latency * 1e3:.1f} ms")
    assert latency < 2 * one_tile + 0.25, (latency, one_tile)
