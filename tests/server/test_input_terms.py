"""The service's image count, header probing and memory terms follow the input table
(gramstyle.inputs): the real entries over the wire, and a fake extra entry (as issue 20's
masks will add) through the same code."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from conftest import build_server
from PIL import Image

from gramstyle import codec, inputs
from gramstyle.images import ImageError, ImageHeader, encode_image
from gramstyle.inputs import INPUTS, ImageInput, check_order
from gramstyle.options import StyleOptions
from gramstyle.server import memory
from gramstyle.server.admission import WorkQueue
from gramstyle.server.service import StyleTransferService
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

MASK = ImageInput("style_mask", "region mask of each --style", ("Stylize",), repeated=True,
                  flag="--style-mask", paired_with="style", memory="output", channels=1)
#: An input that neither counts nor is probed (e.g. one sized by the engine alone).
LOOSE = ImageInput("sketch", "a loose image", ("Stylize",), repeated=False, flag="--sketch",
                   counts=False, probed=False)


def png(width: int, height: int) -> bytes:
    return encode_image(Image.new("RGB", (width, height), (10, 200, 40)), "png")


@pytest.fixture
def extra_inputs(monkeypatch):
    # The test's own entries stand in for any real ones of the same names.
    table = (*(e for e in INPUTS if e.name not in (MASK.name, LOOSE.name)), MASK, LOOSE)
    monkeypatch.setattr(inputs, "INPUTS", table)
    monkeypatch.setattr(inputs, "_BY_NAME", {e.name: e for e in table})


@pytest.fixture(scope="module")
def service(random_engine):
    work = WorkQueue(workers=1, queue_size=1)
    svc = StyleTransferService([random_engine], work, max_images=3)
    yield svc
    svc.close()
    work.shutdown()


# ---------------------------------------------------------------------------- counting


def test_count_takes_the_inputs_declared_to_count(service, extra_inputs):
    service._count({"content": [b"a"], "style": [b"b"], "style_mask": [], "sketch": [b"c"]})
    with pytest.raises(ValueError) as info:
        service._count({"content": [b"a"], "style": [b"b"], "style_mask": [b"m", b"n"],
                        "sketch": [b"c"] * 5})
    assert str(info.value) == (
        "content/style: the request has 4 images (content 1, style 1, style_mask 2), over "
        "this server's limit of 3 images per request")


def test_count_of_a_real_request_includes_init_image(service):
    request = codec.stylize_request([png(8, 8)], [png(8, 8)], init_image=png(8, 8))
    service._count(codec.request_images(request))  # 3: at the limit
    request.style.add(data=png(8, 8))
    with pytest.raises(ValueError, match=r"4 images \(content 1, style 2, init_image 1\)"):
        service._count(codec.request_images(request))
    losses = codec.losses_request(png(8, 8), [png(8, 8)] * 2, [png(8, 8)])
    with pytest.raises(ValueError, match=r"4 images \(content 2, style 1, candidate 1\)"):
        service._count(codec.request_images(losses))


# ---------------------------------------------------------------------------- probing


def test_probe_reads_the_declared_headers(service, random_engine, extra_inputs):
    images = {"content": [png(20, 10)], "style": [png(8, 12)], "init_image": [png(5, 6)],
              "style_mask": [png(20, 10)], "sketch": [b"never read"]}
    headers = service._probe("Stylize", images, random_engine, lambda: False)
    # In the declared order (gramstyle.inputs.check_order), and not "sketch" (not probed).
    assert list(headers) == [e.name for e in check_order("Stylize") if e.name in images
                             and e.probed]
    assert set(headers) == {"content", "style", "init_image", "style_mask"}
    assert [(h.width, h.height) for h in headers["style_mask"]] == [(20, 10)]
    assert headers["init_image"] == [ImageHeader("PNG", "RGB", 5, 6)]
    bad = {**images, "style_mask": [png(20, 10), b"GIF89a garbage"]}
    with pytest.raises(ImageError, match=r"^style_mask\[1\]: cannot decode image"):
        service._probe("Stylize", bad, random_engine, lambda: False)


def test_probe_checks_the_size_setting_input_first_and_against_max_size(service,
                                                                         random_engine):
    side = random_engine.max_size + 1
    images = {"content": [b"GIF89a garbage"], "style": [], "candidate": [png(side, 4)]}
    with pytest.raises(ImageError) as info:
        service._probe("ComputeLosses", images, random_engine, lambda: False)
    assert str(info.value) == (f"candidate: long side {side} px is over the limit of "
                               f"{random_engine.max_size} px")
    # Only the candidate is held to max_size: a content image of that size is not.
    images = {"content": [png(side, 4)], "style": [], "candidate": [png(8, 8)]}
    headers = service._probe("ComputeLosses", images, random_engine, lambda: False)
    assert headers["content"][0].width == side
    with pytest.raises(ImageError, match=r"^candidate: empty image"):
        service._probe("ComputeLosses", codec.request_images(pb.ComputeLossesRequest()),
                       random_engine, lambda: False)


# ---------------------------------------------------------------------------- memory


def header(width: int, height: int) -> ImageHeader:
    return ImageHeader("PNG", "RGB", width, height)


def test_held_and_resized_terms_follow_the_declarations(extra_inputs):
    images = {"content": [header(40, 30)], "style": [header(50, 100), header(10, 10)],
              "init_image": [header(7, 9)], "style_mask": [header(40, 30)]}
    held, _ = memory._held(images, encoded=1000)
    assert held == 2 * 1000 + 4 * (40 * 30 + 50 * 100 + 10 * 10 + 7 * 9 + 40 * 30)
    kept, transients = memory._resized_inputs(images, 32, 24, 2.0)
    # content: RGB at the output size; style: RGB at long side 64; the mask: one channel at
    # the output size; init_image: not resized.
    assert kept == 12 * 32 * 24 + 12 * (32 * 64 + 64 * 64) + 4 * 32 * 24
    assert len(transients) == 4


def test_estimate_grows_by_each_inputs_declared_terms(random_engine, extra_inputs):
    extractor = random_engine.extractor
    options = random_engine.validate(StyleOptions(size=64, iterations=10))
    contents, styles = [header(64, 48)], [header(64, 64)]
    base = memory.estimate_stylize(extractor, options, contents, styles, None, 5000)
    # An init image costs its bytes and decoded pixels, nothing at the output size.
    init = memory.estimate_stylize(extractor, options, contents, styles,
                                   {"init_image": [header(20, 10)]}, 5000 + 300)
    assert init.parts["images"] - base.parts["images"] == pytest.approx(
        memory.MARGIN * (2 * 300 + 4 * 20 * 10), abs=1)
    assert init.parts["targets"] == base.parts["targets"]
    # A one-channel mask at the output size also keeps a float copy there for the run.
    mask = memory.estimate_stylize(extractor, options, contents, styles,
                                   {"style_mask": [header(32, 24)]}, 5000)
    assert mask.parts["images"] - base.parts["images"] == pytest.approx(
        memory.MARGIN * 4 * 32 * 24, abs=1)
    assert mask.parts["targets"] - base.parts["targets"] == pytest.approx(
        memory.MARGIN * 4 * 64 * 48, abs=1)
    # The same mask declared at its style's size keeps the style-sized copy instead.
    styled = dataclasses.replace(MASK, memory="style")
    inputs._BY_NAME["style_mask"] = styled
    at_style = memory.estimate_stylize(extractor, options, contents, styles,
                                       {"style_mask": [header(64, 32)]}, 5000)
    assert at_style.parts["targets"] - base.parts["targets"] == pytest.approx(
        memory.MARGIN * 4 * 64 * 32, abs=1)


# ---------------------------------------------------------------------------- over the wire


@pytest.fixture(scope="module")
def stub(random_engine):
    server = build_server([random_engine], workers=1, queue_size=1, max_images=2).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.StyleTransferServiceStub(channel)
    server.stop(grace=None)


def test_init_image_counts_and_is_probed_before_any_work(stub, random_engine, spy):
    engine = spy(random_engine)
    small = png(32, 32)
    request = pb.StylizeRequest(content=[pb.WeightedImage(data=small)],
                                style=[pb.WeightedImage(data=small)], init_image=small,
                                size=32, iterations=1)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Stylize(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "content/style: the request has 3 images (content 1, style 1, init_image 1), over "
        "this server's limit of 2 images per request")
    request = pb.StylizeRequest(content=[pb.WeightedImage(data=small)],
                                init_image=b"GIF89a garbage", size=32, iterations=1)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Stylize(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("init_image: cannot decode image")
    assert not engine.calls
