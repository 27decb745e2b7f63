"""Region masks through the service (gRPC and HTTP): tiled runs with masks, and a style
without a mask as an empty ``bytes`` entry of ``style_mask`` / ``style_source_mask`` (not an
image: not counted toward --max-images, not probed)."""

from __future__ import annotations

import io

import grpc
import httpx
import numpy as np
import pytest
from conftest import noise, png
from PIL import Image

from gramstyle import codec
from gramstyle.client import Client
from gramstyle.v1 import gramstyle_pb2 as pb

W, H = 64, 48
#: Six images per request: a content, two styles and three masks.
SERVER_SETTINGS = {"max_images": 6, "http_port": 0}


def ramp() -> np.ndarray:
    return np.clip(np.linspace(-0.2, 1.2, W)[None, :].repeat(H, 0), 0, 1)


def grey(values: np.ndarray) -> bytes:
    return png(Image.fromarray((values * 255).round().astype(np.uint8), "L").convert("RGB"))


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    return {"content": png(noise(W, H, 1)), "a": png(noise(W, H, 2)),
            "b": png(Image.new("RGB", (W, H), (30, 90, 200))),
            "left": grey(ramp()), "right": grey(1 - ramp())}


def stylize(stub, request: pb.StylizeRequest) -> pb.Result:
    return list(stub.Stylize(request, timeout=120))[-1].result


def test_tiled_stylize_with_masks_makes_the_untiled_image(stub, pictures, spy, random_engine):
    """tile 32 with two complementary soft region masks and a source mask: the image has
    the output's size, and (the tiled gradient being exact) two L-BFGS iterations end where
    the untiled run does."""
    spied = spy(random_engine)
    p = pictures

    def request(tile):
        return codec.stylize_request(p["content"], [p["a"], p["b"]],
                                     style_mask=[p["left"], p["right"]],
                                     style_source_mask=[None, p["left"]], size=W,
                                     iterations=2, precision="fp32", tile=tile)
    tiled = stylize(stub, request(32))
    call = spied.last("stylize")
    assert call.error is None and call.options.tile == 32
    assert Image.open(io.BytesIO(tiled.image.data)).size == (W, H)
    assert tiled.stats.iterations == 2
    untiled = stylize(stub, request("off"))
    assert spied.last("stylize").options.tile == "off"
    assert tiled.stats.losses.total == pytest.approx(untiled.stats.losses.total, rel=1e-3)
    assert tiled.stats.losses.style == pytest.approx(untiled.stats.losses.style, rel=1e-3)


def test_tiled_compute_losses_with_masks_is_the_untiled_one(stub, pictures):
    """ComputeLosses with tile 32 (4 tiles), masks and the gradient: the untiled answer."""
    p = pictures

    def losses(tile):
        request = codec.losses_request(p["content"], [p["content"]], [p["a"], p["b"]],
                                       style_mask=[p["left"], None],
                                       style_source_mask=[None, p["left"]],
                                       precision="fp32", tile=tile, gradient=True)
        return codec.loss_report_from(stub.ComputeLosses(request, timeout=120))
    tiled, untiled = losses(32), losses("off")
    assert tiled.losses.total == pytest.approx(untiled.losses.total, rel=1e-5)
    assert tiled.losses.style_layers == pytest.approx(untiled.losses.style_layers, rel=1e-5)
    error = np.linalg.norm(tiled.gradient - untiled.gradient) / np.linalg.norm(
        untiled.gradient)
    assert error < 1e-4


def test_an_empty_entry_is_a_style_without_a_mask(stub, pictures, spy, random_engine):
    spied = spy(random_engine)
    p = pictures
    request = codec.stylize_request(p["content"], [p["a"], p["b"]],
                                    style_mask=[None, p["right"]],
                                    style_source_mask=[b"", b""], size=W, iterations=2)
    assert list(request.style_mask) == [b"", p["right"]]
    result = stylize(stub, request)
    call = spied.last("stylize")
    assert call.error is None
    assert call.kwargs["style_mask"] == [None, p["right"]]
    assert call.kwargs["style_source_mask"] == [None, None]
    assert Image.open(io.BytesIO(result.image.data)).size == (W, H)
    # ComputeLosses: the same loss as the engine with None for that style.
    losses = codec.losses_request(p["content"], [p["content"]], [p["a"], p["b"]],
                                  style_mask=[b"", p["right"]], precision="fp32")
    answer = codec.loss_report_from(stub.ComputeLosses(losses, timeout=120))
    expected = random_engine.compute_losses(
        p["content"], [p["content"]], [p["a"], p["b"]], style_mask=[None, p["right"]],
        options=random_engine.validate(codec.losses_options(losses, W)))
    assert answer.losses.style_layers == pytest.approx(expected.losses.style_layers, rel=1e-5)


def test_empty_entries_do_not_count_toward_max_images(stub, pictures, spy, random_engine):
    spied = spy(random_engine)
    p = pictures
    # Content, two styles and three masks: six images, plus an empty entry that is none.
    request = codec.stylize_request(p["content"], [p["a"], p["b"]],
                                    style_mask=[p["left"], p["right"]],
                                    style_source_mask=[None, p["left"]], size=W, iterations=1)
    assert Image.open(io.BytesIO(stylize(stub, request).image.data)).size == (W, H)
    # One more real mask is over the limit, and the message counts the images.
    request = codec.stylize_request(p["content"], [p["a"], p["b"]],
                                    style_mask=[p["left"], p["right"]],
                                    style_source_mask=[p["right"], p["left"]], size=W,
                                    iterations=1)
    calls = len(spied.calls)
    with pytest.raises(grpc.RpcError) as info:
        stylize(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("the request has 7 images (content 1, style 2, style_mask 2, "
            "style_source_mask 2), over this server's limit of 6") in info.value.details()
    assert len(spied.calls) == calls


@pytest.mark.parametrize("masks", [[b""], [b"", b"", b""]])
def test_a_count_mismatch_with_empty_entries_is_invalid_argument(stub, pictures, spy,
                                                                 random_engine, masks):
    spied = spy(random_engine)
    request = codec.stylize_request(pictures["content"], [pictures["a"], pictures["b"]],
                                    size=W, iterations=1)
    request.style_source_mask.extend(masks)  # the client would refuse it
    with pytest.raises(grpc.RpcError) as info:
        stylize(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"style_source_mask: expected 2 image(s), one per style image, got {len(masks)}; an "
        "empty entry stands for a style image without one")
    assert not spied.calls


def test_an_empty_style_entry_is_still_an_empty_image(stub, pictures, spy, random_engine):
    spied = spy(random_engine)
    request = codec.stylize_request(pictures["content"], [pictures["a"]], size=W,
                                    iterations=1)
    request.style.add(data=b"")
    with pytest.raises(grpc.RpcError) as info:
        stylize(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("style[1]: empty image")
    assert not spied.calls


def test_the_client_library_sends_none_as_an_empty_entry(server, pictures, spy,
                                                         random_engine):
    spied = spy(random_engine)
    p = pictures
    with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        result = client.stylize(p["content"], [p["a"], p["b"]], style_mask=[p["left"], None],
                                size=W, iterations=1, tile=32)
    assert result.image.size == (W, H)
    call = spied.last("stylize")
    assert call.kwargs["style_mask"] == [p["left"], None]
    assert call.options.tile == 32


def test_the_http_form_takes_an_empty_file_as_no_mask(server, pictures, spy, random_engine):
    spied = spy(random_engine)
    p = pictures
    files = [("content", ("c.png", p["content"], "image/png")),
             ("style", ("a.png", p["a"], "image/png")),
             ("style", ("b.png", p["b"], "image/png")),
             ("style_mask", ("none", b"", "application/octet-stream")),
             ("style_mask", ("r.png", p["right"], "image/png"))]
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as http:
        response = http.post("/v1/stylize", files=files, data={"size": str(W),
                                                               "iterations": "1"})
    assert response.status_code == 200, response.text
    assert "event: result" in response.text
    assert spied.last("stylize").kwargs["style_mask"] == [None, p["right"]]
