"""Region and source masks over gRPC (issue 20): they travel as the declared inputs
``style_mask`` / ``style_source_mask``, reach the engine as keywords of those names, count
toward --max-images and are probed before any work."""

from __future__ import annotations

import io

import grpc
import httpx
import numpy as np
import pytest
from conftest import noise, png
from PIL import Image

from gramstyle import codec
from gramstyle.v1 import gramstyle_pb2 as pb

W, H = 64, 48
#: Room for a ComputeLosses with two masked styles (candidate, content, 2 styles, 4 masks).
#: HTTP too, for the multipart form.
SERVER_SETTINGS = {"max_images": 8, "http_port": 0}


def halves() -> tuple[bytes, bytes]:
    """Complementary region masks of the output: the left half, the right half (greyscale)."""
    left = np.zeros((H, W), np.uint8)
    left[:, : W // 2] = 255
    return (png(Image.fromarray(left, "L").convert("RGB")),
            png(Image.fromarray(255 - left, "L").convert("RGB")))


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    return {"content": png(noise(W, H, 1)), "a": png(noise(W, H, 2)),
            "b": png(Image.new("RGB", (W, H), (30, 90, 200)))}


def stylize(stub, request: pb.StylizeRequest) -> pb.Result:
    responses = list(stub.Stylize(request, timeout=120))
    return responses[-1].result


def test_stylize_with_masks_reaches_the_engine_and_makes_an_image(stub, pictures, spy,
                                                                   random_engine):
    spied = spy(random_engine)
    left, right = halves()
    request = codec.stylize_request(pictures["content"], [pictures["a"], pictures["b"]],
                                    style_mask=[left, right], size=W, iterations=2)
    result = stylize(stub, request)
    call = spied.last("stylize")
    assert call.error is None
    assert call.kwargs["style_mask"] == [left, right]
    assert call.kwargs["style_source_mask"] == []
    image = Image.open(io.BytesIO(result.image.data))
    assert image.size == (W, H)
    assert result.stats.iterations == 2
    # The masks were used: the same request without them scores differently.
    plain = stylize(stub, codec.stylize_request(
        pictures["content"], [pictures["a"], pictures["b"]], size=W, iterations=2))
    assert plain.stats.losses.style != pytest.approx(result.stats.losses.style, rel=1e-3)


def test_a_mask_count_mismatch_is_invalid_argument_naming_style_mask(stub, pictures, spy,
                                                                     random_engine):
    spied = spy(random_engine)
    left, _ = halves()
    request = codec.stylize_request(pictures["content"], [pictures["a"], pictures["b"]],
                                    size=W, iterations=2)
    request.style_mask.append(left)  # one mask for two styles (the client would refuse it)
    with pytest.raises(grpc.RpcError) as info:
        stylize(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(
        "style_mask: expected 2 image(s), one per style image, got 1")
    assert not spied.calls


def test_masks_count_toward_max_images(stub, pictures, spy, random_engine):
    spied = spy(random_engine)
    left, right = halves()
    styles = [pictures["a"], pictures["b"], pictures["a"]]
    request = codec.stylize_request(pictures["content"], styles, style_mask=[left, right, left],
                                    style_source_mask=[left, right, left], size=W, iterations=2)
    with pytest.raises(grpc.RpcError) as info:
        stylize(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("the request has 10 images (content 1, style 3, style_mask 3, "
            "style_source_mask 3), over this server's limit of 8") in info.value.details()
    assert not spied.calls


def test_a_corrupt_mask_is_refused_before_any_work(stub, pictures, spy, random_engine):
    spied = spy(random_engine)
    left, _ = halves()
    request = codec.stylize_request(pictures["content"], [pictures["a"], pictures["b"]],
                                    size=W, iterations=2)
    request.style_mask.extend([left, b"\x89PNG\r\n\x1a\n not really a png"])
    with pytest.raises(grpc.RpcError) as info:
        stylize(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("style_mask[1]: ")
    assert not spied.calls
    # ComputeLosses probes it the same way.
    losses = codec.losses_request(pictures["content"], [pictures["content"]],
                                  [pictures["a"], pictures["b"]])
    losses.style_source_mask.extend([left, b"not an image"])
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(losses, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("style_source_mask[1]: ")
    assert not spied.calls


def test_compute_losses_with_masks_equals_the_engine(stub, pictures, random_engine):
    left, right = halves()
    styles = [pictures["a"], pictures["b"]]
    request = codec.losses_request(pictures["content"], [pictures["content"]], styles,
                                   style_mask=[left, right], style_source_mask=[right, left])
    answer = codec.loss_report_from(stub.ComputeLosses(request, timeout=120))
    expected = random_engine.compute_losses(
        pictures["content"], [pictures["content"]], styles, style_mask=[left, right],
        style_source_mask=[right, left])
    assert answer.losses.style == pytest.approx(expected.losses.style, rel=1e-5)
    assert answer.losses.total == pytest.approx(expected.losses.total, rel=1e-5)
    assert answer.losses.style_layers == pytest.approx(expected.losses.style_layers, rel=1e-5)
    # ... and the masks matter: without them the style loss differs.
    plain = random_engine.compute_losses(pictures["content"], [pictures["content"]], styles)
    assert plain.losses.style != pytest.approx(expected.losses.style, rel=1e-3)


def test_the_http_form_takes_masks_as_repeated_files(server, pictures, spy, random_engine):
    spied = spy(random_engine)
    left, right = halves()
    files = [("content", ("c.png", pictures["content"], "image/png")),
             ("style", ("a.png", pictures["a"], "image/png")),
             ("style", ("b.png", pictures["b"], "image/png")),
             ("style_mask", ("l.png", left, "image/png")),
             ("style_mask", ("r.png", right, "image/png"))]
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=120) as http:
        response = http.post("/v1/stylize", files=files, data={
            "size": str(W), "iterations": "2", "colour": "COLOUR_MATCH"})
    assert response.status_code == 200, response.text
    assert "event: result" in response.text
    call = spied.last("stylize")
    assert call.kwargs["style_mask"] == [left, right]
    assert call.options.colour == "match"


def test_masks_enter_the_memory_estimate(random_engine):
    from gramstyle.images import ImageHeader
    from gramstyle.options import StyleOptions
    from gramstyle.server import memory

    side = 1024
    opts = random_engine.validate(StyleOptions(size=side, precision="fp32"))
    rgb, grey = ImageHeader("PNG", "RGB", side, side), ImageHeader("PNG", "L", side, side)
    plain = memory.estimate_stylize(random_engine.extractor, opts, [rgb], [rgb, rgb])
    masked = memory.estimate_stylize(random_engine.extractor, opts, [rgb], [rgb, rgb],
                                     {"style_mask": [grey, grey],
                                      "style_source_mask": [grey, grey]})
    # At least the four masks' decoded pixels and their float32 single-channel copies.
    assert masked.parts["images"] - plain.parts["images"] >= 4 * side * side
    assert masked.total - plain.total >= 4 * (side * side + 4 * side * side)
