"""Errors to gRPC statuses by type, from one table (server/status.py); the field of a
BadRequest comes from FieldError.field, never from a message; float options at the limits
of their types; an unset size/iterations on a server with lower limits."""

from __future__ import annotations

import io
import itertools
import math
import sys
from concurrent.futures import CancelledError

import grpc
import pytest
import torch
from conftest import build_server, count_validation
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from gramstyle import codec
from gramstyle.client.errors import field_violations
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.errors import (
    Cancelled,
    FieldError,
    ImageError,
    MalformedRequest,
    ModelNotLoaded,
    QueueFull,
    ShuttingDown,
    WeightsError,
)
from gramstyle.options import FLOAT32_MAX, MAX_LEARNING_RATE, StyleOptions
from gramstyle.server.status import STATUS_CODES, code_of, status_for, status_of
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

Code = grpc.StatusCode


class _Context:
    """What status_of reads of a call: its remaining time (None: no deadline)."""

    def __init__(self, remaining: float | None = None):
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


TABLE = [
    (FieldError("iterations", "must be between 1 and 10000, got 0", 0), Code.INVALID_ARGUMENT),
    (ImageError("content[1]", "empty image (0 bytes)"), Code.INVALID_ARGUMENT),
    (WeightsError("file not found: 'x.pth'"), Code.INVALID_ARGUMENT),
    (ModelNotLoaded("arch", "model vgg11/* is not loaded on this server", "vgg11"),
     Code.FAILED_PRECONDITION),
    (MalformedRequest("request is not a valid gramstyle.v1.StylizeRequest (3 bytes)"),
     Code.INVALID_ARGUMENT),
    (QueueFull("queue full"), Code.RESOURCE_EXHAUSTED),
    (ShuttingDown("server is shutting down"), Code.UNAVAILABLE),
    (Cancelled("stopped after 3 of 10 iterations", 3), Code.CANCELLED),
    (CancelledError(), Code.CANCELLED),
    (ValueError("cannot reshape"), Code.INVALID_ARGUMENT),
    (MemoryError(), Code.RESOURCE_EXHAUSTED),
    (torch.OutOfMemoryError("CUDA out of memory"), Code.RESOURCE_EXHAUSTED),
    (RuntimeError("a bug"), Code.INTERNAL),
    (KeyError("a bug"), Code.INTERNAL),
]


@pytest.mark.parametrize(("error", "code"), TABLE, ids=[type(e).__name__ for e, _ in TABLE])
def test_each_error_type_has_its_code(error, code):
    assert status_of(error, _Context())[0] == code
    expected = None if code == Code.INTERNAL else code
    assert code_of(error) == expected


def test_the_table_is_keyed_by_type_and_subclasses_inherit():
    class Special(ImageError):
        pass

    assert all(isinstance(cls, type) for cls in STATUS_CODES)
    assert code_of(Special("style[0]", "x")) == Code.INVALID_ARGUMENT
    assert Special not in STATUS_CODES


def test_cancelled_after_the_deadline_is_deadline_exceeded():
    error = Cancelled("stopped before the run finished")
    assert status_of(error, _Context(0.0)) == (Code.DEADLINE_EXCEEDED,
                                               "stopped: stopped before the run finished")
    assert status_of(error, _Context(30.0))[0] == Code.CANCELLED


def _violations(status: grpc.Status) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in field_violations(status.trailing_metadata)]


def test_the_bad_request_field_is_the_errors_field_not_parsed_from_its_message():
    status = status_for(FieldError("content[1]", "cannot decode image"), _Context())
    assert (status.code, status.details) == (Code.INVALID_ARGUMENT,
                                             "content[1]: cannot decode image")
    assert _violations(status) == [("content[1]", "cannot decode image")]
    # A message that merely looks like "field: ..." names no field.
    status = status_for(ValueError("iterations: looks like a field"), _Context())
    assert status.code == Code.INVALID_ARGUMENT and _violations(status) == []
    status = status_for(ModelNotLoaded("weights", "model */x.pth is not loaded", "x.pth"),
                        _Context())
    assert status.code == Code.FAILED_PRECONDITION
    assert _violations(status) == [("weights", "model */x.pth is not loaded")]
    # Codes that do not blame the request carry no BadRequest.
    assert _violations(status_for(QueueFull("queue full"), _Context())) == []
    raw = dict(status_for(QueueFull("queue full"), _Context()).trailing_metadata)
    assert not status_pb2.Status.FromString(raw["grpc-status-details-bin"]).details


# ------------------------------------------------------------------ over gRPC

#: The server's limits here: below the defaults (512 px, 300 iterations).
MAX_SIZE, MAX_ITERATIONS = 32, 3


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def limited_engine():
    """A random VGG19 whose max_size is 32 px."""
    return StyleTransfer("vgg19", "random", device="cpu", max_size=MAX_SIZE)


@pytest.fixture(scope="module")
def limited_server(limited_engine):
    srv = build_server([limited_engine], workers=1, queue_size=2,
                       max_iterations=MAX_ITERATIONS).start()
    yield srv
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def stub(limited_server):
    with grpc.insecure_channel(f"127.0.0.1:{limited_server.port}") as channel:
        yield pb_grpc.StyleTransferServiceStub(channel)


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    return {"content": _png((48, 32), (200, 120, 40)), "style": _png((32, 32), (20, 60, 220)),
            "candidate": _png((32, 24), (90, 90, 90))}


def _stylize(pictures: dict[str, bytes], **fields) -> pb.StylizeRequest:
    return pb.StylizeRequest(content=[pb.WeightedImage(data=pictures["content"])],
                             style=[pb.WeightedImage(data=pictures["style"])], **fields)


def _losses(pictures: dict[str, bytes], **fields) -> pb.ComputeLossesRequest:
    return pb.ComputeLossesRequest(candidate=pictures["candidate"],
                                   content=[pb.WeightedImage(data=pictures["content"])],
                                   style=[pb.WeightedImage(data=pictures["style"])], **fields)


def _run(stub, request) -> pb.Result:
    if isinstance(request, pb.ComputeLossesRequest):
        return stub.ComputeLosses(request, timeout=60)
    messages = list(stub.Stylize(request, timeout=60))
    return messages[-1].result


#: Every float field of both requests, and how to set it to a value.
FLOAT_OPTIONS = [name for name, spec, _ in StyleOptions.specs() if spec.kind == "float"]
LOSS_FLOATS = [name for name, spec, _ in StyleOptions.specs("losses") if spec.kind == "float"]
#: Values no float option takes: over float32, float64's largest, infinities, NaN.
OUT_OF_RANGE = [3.5e38, sys.float_info.max, math.inf, -math.inf, math.nan]


def _weight_fields(value: float) -> dict[str, dict]:
    """The per-layer and per-image weights, as request fields, set to ``value``."""
    return {
        "content_layer_weights[0]": {"content_layers": pb.LayerSet(layers=[
            pb.WeightedLayer(name="relu4_2", weight=value)])},
        "style_layer_weights[0]": {"style_layers": pb.LayerSet(layers=[
            pb.WeightedLayer(name="relu1_1", weight=value),
            pb.WeightedLayer(name="relu2_1", weight=1.0)])},
    }


def test_float32_range_is_the_bound():
    assert FLOAT32_MAX == float(torch.finfo(torch.float32).max)
    assert set(FLOAT_OPTIONS) == {"content_weight", "style_weight", "tv_weight", "tolerance",
                                  "learning_rate", "style_scale"}


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=repr)
@pytest.mark.parametrize("name", FLOAT_OPTIONS)
def test_float_options_out_of_range_are_invalid_argument(stub, pictures, name, value):
    requests = [_stylize(pictures, **{name: value})]
    if name in LOSS_FLOATS:
        requests.append(_losses(pictures, **{name: value}))
    for request in requests:
        with pytest.raises(grpc.RpcError) as info:
            _run(stub, request)
        assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith(f"{name}: "), info.value.details()
        assert [v.field for v in field_violations(info.value.trailing_metadata())] == [name]


@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=repr)
def test_weights_out_of_range_are_invalid_argument(stub, pictures, value):
    for field, fields in _weight_fields(value).items():
        for request in (_stylize(pictures, **fields), _losses(pictures, **fields)):
            with pytest.raises(grpc.RpcError) as info:
                _run(stub, request)
            assert info.value.code() == Code.INVALID_ARGUMENT
            assert info.value.details().startswith(f"{field}: ")
            assert [v.field for v in field_violations(info.value.trailing_metadata())] == [field]
    request = _stylize(pictures)
    request.style[0].weight = value
    with pytest.raises(grpc.RpcError) as info:
        _run(stub, request)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert info.value.details().startswith("style_blend_weights[0]: must be ")


def test_the_largest_learning_rate_is_not_internal(stub, pictures):
    """Issue 18 item 8 (``--lr 3.5e38``: INTERNAL from an overflow in torch.full): over the
    bound it is INVALID_ARGUMENT (above); at the bound it runs, or diverges with an error
    naming learning_rate, with either optimiser; never INTERNAL."""
    for value, optimizer in itertools.product((MAX_LEARNING_RATE, 1.0),
                                              (pb.OPTIMIZER_LBFGS, pb.OPTIMIZER_ADAM)):
        try:
            result = _run(stub, _stylize(pictures, learning_rate=value, iterations=2,
                                         optimizer=optimizer, precision=pb.PRECISION_FP32))
            assert result.image.width == MAX_SIZE
        except grpc.RpcError as error:
            assert error.code() == Code.INVALID_ARGUMENT, error.details()
            assert error.details().startswith("learning_rate: ")


@pytest.mark.parametrize("value", [5e-324, 1e-40, -0.0, 0.0], ids=repr)
def test_tiny_and_signed_zero_floats(stub, pictures, limited_engine, spy, value):
    """Below the smallest normal float32 a value counts as 0 (and -0.0 is 0.0): weights and
    the tolerance take 0; the learning rate and the style scale, which must be > 0, are
    refused naming the field."""
    for name in ("learning_rate", "style_scale"):
        with pytest.raises(grpc.RpcError) as info:
            _run(stub, _stylize(pictures, **{name: value}))
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{name}: must be ")
    engine = spy(limited_engine)
    _run(stub, _stylize(pictures, tv_weight=value, tolerance=value, content_weight=value,
                        iterations=1))
    options = engine.last().options
    for name in ("tv_weight", "tolerance", "content_weight"):
        assert getattr(options, name) == 0.0 and math.copysign(1, getattr(options, name)) == 1


def test_unset_size_and_iterations_take_what_the_server_allows(stub, pictures, limited_engine,
                                                               spy):
    """Issue 18 item 12: on a server below the defaults an unset size/iterations takes its
    limit (it was refused: "got 512", "got 300"), and GetServerInfo says so."""
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert (info.limits.max_size, info.limits.max_iterations) == (MAX_SIZE, MAX_ITERATIONS)
    assert (info.limits.default_size, info.limits.default_iterations) == (
        MAX_SIZE, MAX_ITERATIONS)
    assert codec.server_info_from(info).limits["default_size"] == MAX_SIZE
    engine = spy(limited_engine)
    result = _run(stub, _stylize(pictures, tolerance=0.0))
    assert (result.stats.iterations, result.image.width, result.image.height) == (3, 32, 21)
    assert (engine.last().options.size, engine.last().options.iterations) == (32, 3)
    # Given, the same values are the caller's and refused over the limit, as before.
    for fields, message in (({"iterations": 4}, "iterations: must be between 1 and 3, got 4"),
                            ({"size": 33}, "size: must be an integer between 16 and 32 pixels, "
                                           "got 33")):
        with pytest.raises(grpc.RpcError) as error:
            _run(stub, _stylize(pictures, **fields))
        assert (error.value.code(), error.value.details()) == (Code.INVALID_ARGUMENT, message)
    # ComputeLosses takes the candidate's size and runs no iterations: unaffected.
    report = _run(stub, _losses(pictures))
    assert (report.width, report.height) == (32, 24)


def test_a_request_is_validated_once(stub, pictures, limited_engine, monkeypatch):
    """Each option is checked once per call (the codec, at the edge) and the layer names
    once (the engine's network check); the engine's job trusts both."""
    checked, resolved = count_validation(monkeypatch, limited_engine)
    _run(stub, _stylize(pictures, iterations=1))
    assert sorted(checked) == sorted(name for name, _, _ in StyleOptions.specs())
    assert sorted(resolved) == ["content_layers", "style_layers"]
    checked.clear(), resolved.clear()
    _run(stub, _losses(pictures))
    assert sorted(checked) == sorted(name for name, _, _ in StyleOptions.specs())
    assert sorted(resolved) == ["content_layers", "style_layers"]


def test_bad_request_details_hold_the_field(stub, pictures):
    request = _stylize(pictures, style_layers=pb.LayerSet(layers=[pb.WeightedLayer(
        name="relu9_1")]))
    with pytest.raises(grpc.RpcError) as info:
        _run(stub, request)
    violations = field_violations(info.value.trailing_metadata())
    assert [(v.field, v.description.split(";")[0]) for v in violations] == [
        ("style_layers", "unknown layer 'relu9_1' for vgg19")]
    bad = error_details_pb2.BadRequest  # the detail type the client unpacks
    assert bad.DESCRIPTOR.full_name == "google.rpc.BadRequest"
