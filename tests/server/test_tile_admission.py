"""``tile`` "auto" in the service (issue 19): a request whose untiled memory estimate is over
--max-request-memory runs with the largest tile that fits instead of being refused, and is
refused (INVALID_ARGUMENT, naming what to lower) only when even the smallest tile does not
fit. Shallow layers (stride 4, small halos) make tiles of a 128 px request worth having:
its estimates are about 80 MiB at tile 16, 89 MiB at 32, 100 MiB at 48 and 107 MiB untiled
(fp32, Adam)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import build_server, encode, noise

from gramstyle.client import Client, ServiceError
from gramstyle.images import probe_image
from gramstyle.options import StyleOptions
from gramstyle.server import memory

SHALLOW = dict(content_layers=("relu2_2",), style_layers=("relu1_1", "relu2_1", "relu3_1"),
               precision="fp32")
#: Between the estimates of tile 32 and tile 48 (plus the message and encoded bytes).
LIMIT = 97 * 10**6
CONTENT, STYLE = encode(noise(128, 96, 1)), encode(noise(128, 128, 2))


@pytest.fixture(scope="module")
def limited(random_engine):
    """A server whose per-request limit the untiled 128 px requests are over."""
    srv = build_server([random_engine], max_request_memory=LIMIT).start()
    try:
        yield f"127.0.0.1:{srv.port}"
    finally:
        srv.stop(grace=None)


def _estimate(engine, tile) -> int:
    options = engine.validate(StyleOptions(size=128, tile=tile, **SHALLOW))
    return memory.estimate_losses(engine.extractor, options, probe_image(CONTENT),
                                  [probe_image(CONTENT)], [probe_image(STYLE)], True).total


def test_the_limit_sits_between_the_tiles(random_engine):
    """The premise of the tests below: untiled is over LIMIT, tile 32 under, 48 over."""
    assert _estimate(random_engine, 32) < LIMIT < _estimate(random_engine, 48)
    assert _estimate(random_engine, "off") > LIMIT


def test_auto_tiles_compute_losses_instead_of_refusing(limited, random_engine, spy):
    engine = spy(random_engine)
    with Client(limited, timeout=60, retries=1) as client:
        report = client.compute_losses(CONTENT, [CONTENT], [STYLE], gradient=True,
                                       tv_weight=1.0, **SHALLOW)
    (call,) = engine.calls
    # The largest multiple of the stride (4) whose estimate fits: 32 <= tile < 48.
    assert isinstance(call.options.tile, int) and 32 <= call.options.tile < 48, call.options
    assert _estimate(random_engine, call.options.tile) <= LIMIT
    assert _estimate(random_engine, call.options.tile + 4) > LIMIT - 10**6
    # Exact: the same loss and gradient as the untiled run in-process.
    whole = random_engine.compute_losses(CONTENT, [CONTENT], [STYLE], StyleOptions(
        tile="off", tv_weight=1.0, **SHALLOW), gradient=True)
    assert report.losses.total == pytest.approx(whole.losses.total, rel=1e-5)
    g0, g1 = (np.frombuffer(r.gradient_bytes, "<f4") for r in (whole, report))
    assert np.linalg.norm(g1 - g0) / np.linalg.norm(g0) < 1e-4


def test_auto_tiles_stylize_instead_of_refusing(limited, random_engine, spy):
    engine = spy(random_engine)
    with Client(limited, timeout=60, retries=1) as client:
        result = client.stylize(CONTENT, [STYLE], size=128, iterations=1, optimizer="adam",
                                **SHALLOW)
    assert result.image.size == (128, 96)
    (call,) = engine.calls
    assert isinstance(call.options.tile, int) and 16 <= call.options.tile < 128, call.options


def test_a_request_that_fits_untiled_runs_untiled(random_engine, spy):
    srv = build_server([random_engine], max_request_memory=2**30).start()
    engine = spy(random_engine)
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60, retries=1) as client:
            client.compute_losses(CONTENT, [CONTENT], [STYLE], **SHALLOW)
    finally:
        srv.stop(grace=None)
    assert engine.calls[0].options.tile == "off"


def test_refused_only_when_even_the_smallest_tile_does_not_fit(random_engine, spy):
    srv = build_server([random_engine], max_request_memory=70 * 10**6).start()
    engine = spy(random_engine)
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60, retries=1) as client:
            with pytest.raises(ServiceError) as error:
                client.stylize(CONTENT, [STYLE], size=128, iterations=1, optimizer="adam",
                               **SHALLOW)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.fields == ["size"], error.value.message
            assert "even with tile 16, the smallest tile auto could choose" in \
                error.value.message
            assert "lower size" in error.value.message
    finally:
        srv.stop(grace=None)
    assert engine.calls == []


def test_explicit_tiles_are_not_changed(limited, random_engine, spy):
    """off and a side are the caller's: over the limit they are refused, naming them."""
    engine = spy(random_engine)
    with Client(limited, timeout=60, retries=1) as client:
        with pytest.raises(ServiceError) as error:
            client.stylize(CONTENT, [STYLE], size=128, iterations=1, optimizer="adam",
                           tile="off", **SHALLOW)
        assert error.value.fields == ["size"], error.value.message
        assert "set tile to auto or a side in pixels" in error.value.message
        with pytest.raises(ServiceError) as error:
            client.stylize(CONTENT, [STYLE], size=128, iterations=1, optimizer="adam",
                           tile=64, **SHALLOW)
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.fields == ["tile"], error.value.message
        assert "lower tile" in error.value.message
        client.compute_losses(CONTENT, [CONTENT], [STYLE], tile=20, **SHALLOW)
    assert [c.options.tile for c in engine.calls] == [20]
