"""The gRPC service against a real server on a loopback ephemeral port (CPU, small images).

Covers: a full Stylize stream, ComputeLosses vs the in-process engine and autograd, the
options as the engine receives them, health/reflection/info, every bad input's status and
message, out of memory and unexpected errors, deadlines and cancels stopping the optimisation
and freeing the worker, RESOURCE_EXHAUSTED with health still answering, metrics by status
code, request ids, two workers at once, and SIGTERM/SIGINT draining (or, after the grace
period or a second signal, cancelling) a call.

No test bounds how long something takes on this possibly loaded machine, except where the
bound is the point (a refusal "at once": 5x its usual time). "Stopped within one iteration"
is counted in optimisation steps by a spy at the engine boundary (``spy`` in conftest.py),
and waits are for events, with generous timeouts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from conftest import build_server, png, small_png
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from gramstyle.engine.stop import Cancelled
from gramstyle.images import load_image, resize_long_side
from gramstyle.options import StyleOptions
from gramstyle.server.serve import GramstyleServer
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

#: The conftest ``server`` (one worker, one queue slot): the random VGG19 is the default
#: model (fast); the HED VGG16 is selectable by its file name.
SERVER_ENGINES = ("random_engine", "hed_engine")

SERVICE = "gramstyle.v1.StyleTransferService"
REPO = Path(__file__).resolve().parents[2]
#: A run that goes on until it is stopped (deadline, cancel, shutdown): 10 000 iterations and,
#: where the option exists, no early stop on convergence (tolerance 0).
LONG = {"iterations": 10_000,
        **({"tolerance": 0.0} if "tolerance" in StyleOptions.__dataclass_fields__ else {})}


@pytest.fixture(scope="module")
def data(images) -> dict[str, bytes]:
    return {"cat": small_png(images["cat"]), "starry": small_png(images["starry"]),
            "coffee": small_png(images["coffee"]), "cat_full": images["cat"].read_bytes()}


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.StyleTransferServiceStub:
    return pb_grpc.StyleTransferServiceStub(channel)


def wait_idle(server: GramstyleServer, timeout: float = 60.0) -> None:
    """Wait until no job is running or queued; fail the test after a generous ``timeout``."""
    assert server.work.wait_idle(timeout), "the worker was not freed"


def requests_total(server: GramstyleServer, method: str, code: str) -> float:
    """gramstyle_requests_total{rpc=.../method, code} of an in-process server (0 if unset)."""
    return server.metrics.registry.get_sample_value(
        "gramstyle_requests_total", {"rpc": f"{SERVICE}/{method}", "code": code}) or 0.0


def iterations_total(server: GramstyleServer) -> float:
    return server.metrics.registry.get_sample_value("gramstyle_iterations_total") or 0.0


def stylize_request(data, **fields) -> pb.StylizeRequest:
    base = dict(content=[pb.WeightedImage(data=data["cat"])],
                style=[pb.WeightedImage(data=data["starry"])], size=64, iterations=2)
    base.update(fields)
    return pb.StylizeRequest(**base)


def run_stylize(stub, request, timeout=60) -> tuple[list[pb.Progress], pb.Result]:
    progress, results = [], []
    for message in stub.Stylize(request, timeout=timeout):
        (progress if message.HasField("progress") else results).append(
            getattr(message, message.WhichOneof("kind")))
    assert len(results) == 1, "exactly one final Result message"
    return progress, results[0]


# ------------------------------------------------------------------------------ Stylize


def test_stylize_stream_progress_and_final_image(stub, data):
    progress, result = run_stylize(stub, stylize_request(
        data, iterations=7, progress_every=3, preview=True))
    # The start image (0 iterations), every 3 iterations, and the last one.
    assert [p.iteration for p in progress] == [0, 3, 6, 7]
    assert all(p.iterations == 7 for p in progress)
    assert all(p.losses.total > 0 and set(p.losses.style_layers) == {
        "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"} for p in progress)
    assert progress[-1].losses.total < progress[0].losses.total
    elapsed = [p.elapsed_s for p in progress]
    assert elapsed == sorted(elapsed)
    # The cat photo is 451x300: long side 64 -> 64x43.
    image = Image.open(io.BytesIO(result.image.data))
    assert image.format == "PNG" and image.size == (64, 43)
    assert (result.image.width, result.image.height) == (64, 43)
    for p in progress:
        assert Image.open(io.BytesIO(p.preview.data)).size == (64, 43)
    stats = result.stats
    assert stats.iterations == 7 and stats.backend in ("cpu", "cuda", "einsum")
    assert stats.device == "cpu" and stats.arch == "vgg19" and stats.weights == "random"
    defaults = StyleOptions()
    weighted = (defaults.content_weight * stats.losses.content
                + defaults.style_weight * stats.losses.style + defaults.tv_weight * stats.losses.tv)
    assert math.isclose(stats.losses.total, weighted, rel_tol=1e-5)


def test_stylize_scales_coarse_to_fine(stub, data):
    progress, result = run_stylize(stub, stylize_request(
        data, iterations=4, scales=2, size=64, progress_every=4, preview=True))
    assert [p.iteration for p in progress] == [0, 4, 8]
    sizes = [Image.open(io.BytesIO(p.preview.data)).size for p in progress]
    assert sizes == [(45, 30), (64, 43), (64, 43)]  # 64/sqrt(2) = 45 px, then 64 px
    assert result.stats.iterations == 8 and (result.image.width, result.image.height) == (64, 43)


def test_stylize_options_travel(stub, data, hed_engine, spy):
    """Layers, weights, init, optimiser, size, format and model choice all reach the engine:
    a spy at the servicer's call into the engine sees every option as sent, and the result
    shows their effects."""
    engine = spy(hed_engine)
    request = stylize_request(
        data, iterations=3, size=48, output_format=pb.IMAGE_FORMAT_JPEG,
        optimizer=pb.OPTIMIZER_ADAM, learning_rate=0.05, init=pb.INIT_NOISE, seed=3,
        content_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="relu3_1")]),
        style_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="relu1_1", weight=2),
                                         pb.WeightedLayer(name="relu2_1")]),
        style=[pb.WeightedImage(data=data["starry"], weight=1),
               pb.WeightedImage(data=data["coffee"], weight=0.5)],
        content_weight=2.5, style_weight=7, style_scale=0.75, tv_weight=0.5,
        preserve_colors=True, precision=pb.PRECISION_FP32, weights="vgg16-hed-bsds500.pth",
        progress_every=100)
    progress, result = run_stylize(stub, request)
    received = engine.last("stylize").options
    sent = {"iterations": 3, "size": 48, "optimizer": "adam", "learning_rate": 0.05,
            "init": "noise", "seed": 3, "content_layers": ("relu3_1",),
            "style_layers": ("relu1_1", "relu2_1"), "style_layer_weights": (2.0, 1.0),
            "style_blend_weights": (1.0, 0.5), "content_weight": 2.5, "style_weight": 7.0,
            "style_scale": 0.75, "tv_weight": 0.5, "preserve_colors": True,
            "precision": "fp32", "progress_every": 100}
    assert {name: getattr(received, name) for name in sent} == sent
    assert engine.last("stylize").kwargs["init_image"] is None
    assert [p.iteration for p in progress] == [0, 3]
    assert Image.open(io.BytesIO(result.image.data)).format == "JPEG"
    assert (result.image.width, result.image.height) == (48, 32)
    assert set(result.stats.losses.style_layers) == {"relu1_1", "relu2_1"}
    assert set(result.stats.losses.content_layers) == {"relu3_1"}
    assert result.stats.losses.tv > 0
    losses = result.stats.losses
    assert losses.total == pytest.approx(2.5 * losses.content + 7 * losses.style
                                         + 0.5 * losses.tv, rel=1e-5)
    assert (result.stats.arch, result.stats.weights) == ("vgg16", "vgg16-hed-bsds500.pth")


# ------------------------------------------------------------------------------ ComputeLosses


def test_compute_losses_matches_engine_and_autograd(stub, data, hed_engine, images):
    cat = np.asarray(Image.open(io.BytesIO(small_png(images["cat"], 48))), dtype=np.int16)
    cat = np.clip(cat, 8, 247)  # room for +-1 grey level below
    candidate = png(cat)
    fields = dict(content=[pb.WeightedImage(data=data["coffee"])],
                  style=[pb.WeightedImage(data=data["starry"])], tv_weight=0.5,
                  weights="vgg16-hed-bsds500.pth")
    response = stub.ComputeLosses(pb.ComputeLossesRequest(candidate=candidate, gradient=True,
                                                          **fields), timeout=60)
    local = hed_engine.compute_losses(candidate, [data["coffee"]], [data["starry"]],
                                      StyleOptions(tv_weight=0.5), gradient=True)
    remote = response.losses
    for term in ("total", "content", "style", "tv"):
        assert math.isclose(getattr(remote, term), getattr(local.losses, term), rel_tol=1e-5), term
    assert dict(remote.style_layers).keys() == local.losses.style_layers.keys()
    for name, value in local.losses.style_layers.items():
        assert math.isclose(remote.style_layers[name], value, rel_tol=1e-5), name
    for name, value in local.losses.content_layers.items():
        assert math.isclose(remote.content_layers[name], value, rel_tol=1e-5), name

    h, w = cat.shape[:2]
    assert list(response.gradient.shape) == [3, h, w]
    assert (response.width, response.height) == (w, h)
    gradient = np.frombuffer(response.gradient.data, dtype="<f4").reshape(3, h, w)
    np.testing.assert_allclose(gradient, local.gradient, rtol=1e-5, atol=1e-9)

    # The gradient is d total / d pixel for pixels in [0, 1]: a central difference along
    # sign(g), one grey level each way, changes the total by about 2/255 * sum|g|.
    step = np.sign(gradient).transpose(1, 2, 0).astype(np.int16)
    plus, minus = (stub.ComputeLosses(pb.ComputeLossesRequest(candidate=png(cat + s * step),
                                                              **fields), timeout=60)
                   .losses.total for s in (1, -1))
    ratio = (plus - minus) / (2 / 255) / np.abs(gradient).sum()
    assert 0.85 < ratio < 1.1, ratio

    # Without the flag there is no gradient.
    plain = stub.ComputeLosses(pb.ComputeLossesRequest(candidate=candidate, **fields))
    assert not plain.HasField("gradient")
    assert math.isclose(plain.losses.total, remote.total, rel_tol=1e-5)


# ------------------------------------------------------------------ health, reflection, info


def test_health_reflection_and_info(channel, stub, server):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # Reflection, the way grpcurl uses it: list services, fetch descriptors, build a request
    # from them and call a method without the generated stubs.
    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {"Stylize", "ComputeLosses", "GetServerInfo"}
    assert service.methods_by_name["Stylize"].server_streaming
    method = service.methods_by_name["GetServerInfo"]
    request_class = GetMessageClass(method.input_type)
    reply_class = GetMessageClass(method.output_type)
    call = channel.unary_unary(f"/{SERVICE}/GetServerInfo",
                               request_serializer=request_class.SerializeToString,
                               response_deserializer=reply_class.FromString)
    assert call(request_class(), timeout=30).models[0].arch == "vgg19"

    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert [(m.arch, m.weights, m.is_default) for m in info.models] == [
        ("vgg19", "random", True), ("vgg16", "vgg16-hed-bsds500.pth", False)]
    assert info.models[0].layer_names[:2] == ["conv1_1", "relu1_1"]
    assert info.models[0].layer_names[-1] == "pool5" and len(info.models[0].layer_names) == 37
    assert len(info.models[1].layer_names) == 31
    assert info.device == "cpu" and info.backend in ("cpu", "cuda", "einsum")
    assert info.version
    assert info.limits.workers == 1 and info.limits.queue_size == 1
    assert info.limits.max_message_bytes == 64 * 2**20
    assert info.limits.max_size == 4096 and info.limits.max_iterations == 10_000


# ------------------------------------------------------------------------------ bad input


def header_bomb(side: int = 5000) -> bytes:
    """A 1x1 PNG whose header claims side x side pixels (valid CRC): a decompression bomb as
    far as the header is concerned."""
    data = bytearray(png(Image.new("RGB", (1, 1))))
    ihdr = bytearray(data[12:29])  # type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


BAD_STYLIZE = [
    # (what, request fields, code, message start)
    ("corrupt bytes", dict(content=[pb.WeightedImage(data=b"definitely not an image")]),
     "INVALID_ARGUMENT", "content[0]: cannot decode image (23 bytes)"),
    ("empty bytes", dict(style=[pb.WeightedImage(data=b"")]),
     "INVALID_ARGUMENT", "style[0]: empty image"),
    ("truncated png", "truncated", "INVALID_ARGUMENT", "content[0]: corrupt or truncated"),
    ("over the pixel limit", dict(content=[pb.WeightedImage(data=header_bomb())]),
     "INVALID_ARGUMENT", "content[0]: image is 5000x5000 = 25000000 pixels, over the limit of "
     "16777216 pixels"),
    ("decompression bomb", dict(style=[pb.WeightedImage(data=header_bomb(60000))]),
     "INVALID_ARGUMENT", "style[0]: image has over 178956970 pixels, over the limit of "
     "16777216 pixels"),
    ("unknown layer", dict(style_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="relu9_9")])),
     "INVALID_ARGUMENT", "style_layers: unknown layer 'relu9_9' for vgg19"),
    ("NaN weight", dict(style_weight=float("nan")),
     "INVALID_ARGUMENT", "style_weight: must be a finite number >= 0, got nan"),
    ("negative weight", dict(content_weight=-1.0),
     "INVALID_ARGUMENT", "content_weight: must be a finite number >= 0, got -1.0"),
    ("negative layer weight",
     dict(content_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="relu4_2", weight=-2)])),
     "INVALID_ARGUMENT", "content_layer_weights[0]: must be a finite number >= 0, got -2.0"),
    ("NaN blend weight", "nan_blend", "INVALID_ARGUMENT",
     "style_blend_weights[0]: must be a finite number >= 0, got nan"),
    ("negative tolerance", dict(tolerance=-0.5),
     "INVALID_ARGUMENT", "tolerance: must be a finite number >= 0, got -0.5"),
    ("NaN tolerance", dict(tolerance=float("nan")),
     "INVALID_ARGUMENT", "tolerance: must be a finite number >= 0, got nan"),
    ("zero iterations", dict(iterations=0),
     "INVALID_ARGUMENT", "iterations: must be between 1 and 10000, got 0"),
    ("too many iterations", dict(iterations=10_001),
     "INVALID_ARGUMENT", "iterations: must be between 1 and 10000, got 10001"),
    ("size too small", dict(size=8),
     "INVALID_ARGUMENT", "size: must be an integer between 16 and 4096 pixels, got 8"),
    ("size too big", dict(size=4097),
     "INVALID_ARGUMENT", "size: must be an integer between 16 and 4096 pixels, got 4097"),
    ("too small for relu5_1", dict(size=20),
     "INVALID_ARGUMENT", "size: the image would be 20x13 px, too small for layer relu5_1"),
    ("duplicate layer", dict(content_layers=pb.LayerSet(layers=[
        pb.WeightedLayer(name="relu4_2"), pb.WeightedLayer(name="22")])),
     "INVALID_ARGUMENT", "content_layers: layer relu4_2 is listed twice"),
    ("unknown enum", dict(init=42), "INVALID_ARGUMENT", "init: unknown value 42"),
    ("init image without INIT_IMAGE", "init_mismatch", "INVALID_ARGUMENT",
     "init_image: given, but init is INIT_NOISE"),
    ("weights not loaded", dict(weights="imagenet"),
     "FAILED_PRECONDITION", "weights: model */imagenet is not loaded on this server"),
    ("arch not loaded", dict(arch="vgg16", weights="random"),
     "FAILED_PRECONDITION", "weights: model vgg16/random is not loaded on this server"),
]


@pytest.mark.parametrize("what,fields,code,message", BAD_STYLIZE, ids=[c[0] for c in BAD_STYLIZE])
def test_bad_stylize_input(stub, data, random_engine, spy, what, fields, code, message):
    if fields == "truncated":
        fields = dict(content=[pb.WeightedImage(data=data["cat_full"][:4000])])
    elif fields == "nan_blend":
        fields = dict(style=[pb.WeightedImage(data=data["starry"], weight=float("nan"))])
    elif fields == "init_mismatch":
        fields = dict(init=pb.INIT_NOISE, init_image=data["cat"])
    engine = spy(random_engine)
    with pytest.raises(grpc.RpcError) as info:
        run_stylize(stub, stylize_request(data, **fields), timeout=30)
    assert info.value.code().name == code, info.value.details()
    assert info.value.details().startswith(message), info.value.details()
    # Rejected before any optimisation: the engine, if it was called at all, took no step.
    assert all(call.finished.wait(30) and call.steps == 0 for call in engine.calls)
    # ... and the server still serves a valid call.
    progress, result = run_stylize(stub, stylize_request(data, iterations=1))
    assert result.stats.iterations == 1


BAD_LOSSES = [
    ("empty candidate", dict(candidate=b""), "INVALID_ARGUMENT", "candidate: empty image"),
    ("corrupt candidate", dict(candidate=b"GIF89a garbage"), "INVALID_ARGUMENT",
     "candidate: cannot decode image"),
    ("bomb candidate", dict(candidate=header_bomb()), "INVALID_ARGUMENT",
     "candidate: image is 5000x5000"),
    ("corrupt content", dict(content=[pb.WeightedImage(data=b"\x89PNG\r\n\x1a\nxx")]),
     "INVALID_ARGUMENT", "content[0]:"),
    ("bad style scale", dict(style_scale=-1.0), "INVALID_ARGUMENT",
     "style_scale: must be a finite number >= 0, got -1.0"),
    ("unknown layer index", dict(content_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="99")])),
     "INVALID_ARGUMENT", "content_layers: unknown layer '99'"),
    ("weights not loaded", dict(weights="vgg19.pth"), "FAILED_PRECONDITION",
     "weights: model */vgg19.pth is not loaded"),
    ("candidate over max_size", dict(candidate=png(Image.new("RGB", (4200, 16)))),
     "INVALID_ARGUMENT", "candidate: long side 4200 px is over the limit of 4096 px"),
]


@pytest.mark.parametrize("what,fields,code,message", BAD_LOSSES, ids=[c[0] for c in BAD_LOSSES])
def test_bad_compute_losses_input(stub, data, what, fields, code, message):
    request = pb.ComputeLossesRequest(candidate=data["cat"],
                                      content=[pb.WeightedImage(data=data["cat"])],
                                      style=[pb.WeightedImage(data=data["starry"])])
    request.MergeFrom(pb.ComputeLossesRequest(**{k: v for k, v in fields.items()
                                                 if k not in ("candidate", "content")}))
    if "candidate" in fields:
        request.candidate = fields["candidate"]
    if "content" in fields:
        del request.content[:]
        request.content.extend(fields["content"])
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(request, timeout=30)
    assert info.value.code().name == code, info.value.details()
    assert info.value.details().startswith(message), info.value.details()
    ok = stub.ComputeLosses(pb.ComputeLossesRequest(
        candidate=data["cat"], content=[pb.WeightedImage(data=data["cat"])], style_weight=0),
        timeout=30)
    assert ok.losses.content == pytest.approx(0.0, abs=1e-6)  # the content image itself


# ------------------------------------------------------------------ deadlines and admission


def test_deadline_mid_stylize_frees_the_worker(stub, data, server, random_engine, spy, wait_for):
    engine = spy(random_engine)
    before = requests_total(server, "Stylize", "DEADLINE_EXCEEDED")
    seen = []
    with pytest.raises(grpc.RpcError) as info:
        for message in stub.Stylize(stylize_request(data, **LONG, progress_every=1),
                                    timeout=4):
            seen.append(message.progress.iteration)
    engine.caller_gone.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(seen) >= 2, "the optimisation was running when the deadline passed"
    # The optimisation stops within one iteration of the deadline (at most one step more
    # begins after the caller saw it: the server's own deadline can lag the client's a
    # little on a loaded machine), and the worker is freed.
    run = engine.last("stylize")
    assert isinstance(run.error, Cancelled)
    assert run.steps_after_caller_gone <= 2, run.steps_after_caller_gone
    wait_idle(server)
    assert server.work.busy == 0
    wait_for(lambda: requests_total(server, "Stylize", "DEADLINE_EXCEEDED") == before + 1,
             what="the DEADLINE_EXCEEDED count")
    # The next call is admitted and runs to its end.
    progress, result = run_stylize(stub, stylize_request(data, iterations=1), timeout=60)
    assert [p.iteration for p in progress] == [0, 1] and result.stats.iterations == 1
    wait_idle(server)


def test_full_queue_is_resource_exhausted_while_health_answers(stub, channel, data, server,
                                                               wait_for):
    long = stylize_request(data, **LONG, progress_every=1000)
    # Long deadlines: both calls must outlive the test (they are cancelled at its end).
    running = stub.Stylize(long, timeout=600)
    next(running)  # the first progress message: it holds the only worker
    queued = stub.Stylize(long, timeout=600)
    wait_for(lambda: server.work.queued >= 1, what="the second call to be queued")
    refused = {m: requests_total(server, m, "RESOURCE_EXHAUSTED")
               for m in ("Stylize", "ComputeLosses")}
    cancelled = requests_total(server, "Stylize", "CANCELLED")
    try:
        # Refused at once: not after waiting for a slot (the running call has 10 000
        # iterations to go, so a waiting refusal would run into the 30 s deadline instead).
        # The time bound is 5x what the refusal takes on a loaded 2-core machine.
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            run_stylize(stub, long, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("server busy: 1 of 1 worker(s) running and 1 of 1")
        with pytest.raises(grpc.RpcError) as info:
            stub.ComputeLosses(pb.ComputeLossesRequest(candidate=data["cat"]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 5.0, "refused at once"

        # Health and GetServerInfo still answer while every worker and slot is taken.
        start = time.monotonic()
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert (info.busy_workers, info.queued) == (1, 1)
        assert time.monotonic() - start < 5.0
        # A caller's mistake is still INVALID_ARGUMENT, not RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as bad:
            run_stylize(stub, stylize_request(data, iterations=0))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        metrics = server.metrics.registry
        assert metrics.get_sample_value("gramstyle_queue_depth") == 1
        assert metrics.get_sample_value("gramstyle_busy_workers") == 1
        for method, count in refused.items():  # one refusal each, counted by its code
            wait_for(lambda m=method, c=count: requests_total(server, m, "RESOURCE_EXHAUSTED")
                     == c + 1, what=f"the {method} RESOURCE_EXHAUSTED count")
    finally:
        running.cancel()
        queued.cancel()
    wait_idle(server)
    # Both cancelled calls, the running one and the queued one, are counted as CANCELLED
    # (waited for here, so that no count of this test lands in the next one).
    wait_for(lambda: requests_total(server, "Stylize", "CANCELLED") == cancelled + 2,
             what="two CANCELLED counts")
    assert server.metrics.registry.get_sample_value("gramstyle_queue_depth") == 0
    assert server.metrics.registry.get_sample_value("gramstyle_request_duration_seconds_count",
                                                    {"rpc": f"{SERVICE}/Stylize"}) >= 3


def test_cancel_mid_stream_frees_the_worker(stub, data, server, random_engine, spy, wait_for):
    engine = spy(random_engine)
    before = requests_total(server, "Stylize", "CANCELLED")
    call = stub.Stylize(stylize_request(data, **LONG, progress_every=1), timeout=60)
    next(call)
    next(call)
    call.cancel()
    engine.caller_gone.set()
    run = engine.last("stylize")  # the optimisation stopped ...
    assert isinstance(run.error, Cancelled)
    assert run.steps_after_caller_gone <= 2, run.steps_after_caller_gone  # ... within a step
    wait_idle(server)
    wait_for(lambda: requests_total(server, "Stylize", "CANCELLED") == before + 1,
             what="the CANCELLED count")


# ------------------------------------------------------------------------------ metrics


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_iterations_total_counts_the_iterations_run(stub, data, server, wait_for):
    before = iterations_total(server)
    _, result = run_stylize(stub, stylize_request(data, iterations=3))
    assert result.stats.iterations == 3
    wait_for(lambda: iterations_total(server) == before + 3, what="iterations_total + 3")
    _, result = run_stylize(stub, stylize_request(data, iterations=2, scales=2))
    assert result.stats.iterations == 4  # iterations count across the scales
    wait_for(lambda: iterations_total(server) == before + 7, what="iterations_total + 7")


def test_metrics_endpoint(stub, server, data, wait_for):
    port = server.metrics.serve_http(0, addr="127.0.0.1")
    ok = {"rpc": f"{SERVICE}/GetServerInfo", "code": "OK"}
    before = server.metrics.registry.get_sample_value("gramstyle_requests_total", ok) or 0
    stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    wait_for(lambda: scrape(port).get(("gramstyle_requests_total", tuple(sorted(ok.items()))))
             == before + 2, what="two more GetServerInfo in /metrics")
    samples = scrape(port)
    # What the endpoint serves is the registry, value for value.
    for (name, labels), value in samples.items():
        if name.startswith("gramstyle_") and not name.endswith("_created"):
            assert server.metrics.registry.get_sample_value(name, dict(labels)) == value, name
    assert samples[("gramstyle_queue_depth", ())] == 0
    assert samples[("gramstyle_iterations_total", ())] == iterations_total(server)
    assert samples[("gramstyle_request_duration_seconds_count",
                    (("rpc", f"{SERVICE}/GetServerInfo"),))] >= before + 2


# ------------------------------------------------------------------ request ids, failures


def test_request_id_is_passed_through_and_echoed(stub, data, server, caplog, wait_for):
    caplog.set_level(logging.INFO, logger="gramstyle.server.requests")
    request_id = "test-req-4711"
    reply, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=30,
                                               metadata=[("x-request-id", request_id)])
    assert reply.models and dict(call.initial_metadata())["x-request-id"] == request_id
    # The same id in the server's log line of that request ...
    line = wait_for(lambda: next((r.getMessage() for r in caplog.records
                                  if f"request_id={request_id} " in r.getMessage()), None),
                    what="the request's log line")
    assert f"rpc={SERVICE}/GetServerInfo code=OK" in line
    # ... on a stream and on an error too; without one, the server makes one up and sends it.
    stream = stub.Stylize(stylize_request(data, iterations=1), timeout=60,
                          metadata=[("x-request-id", "stream-id-1")])
    assert dict(stream.initial_metadata())["x-request-id"] == "stream-id-1"
    list(stream)
    with pytest.raises(grpc.RpcError) as info:
        run_stylize(stub, stylize_request(data, iterations=0))
    generated = dict(info.value.initial_metadata() or ()).get("x-request-id")
    assert generated and generated not in (request_id, "stream-id-1"), generated


def test_out_of_memory_and_unexpected_errors(stub, data, server, random_engine, monkeypatch,
                                             caplog, wait_for):
    """Out of memory is RESOURCE_EXHAUSTED with advice; an unexpected exception is INTERNAL
    naming the request id and nothing of the exception (the log has it)."""
    import torch

    caplog.set_level(logging.INFO, logger="gramstyle")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB "
                                     "(GPU 0; /srv/secret/models)")

    def bug(*args, **kwargs):
        raise KeyError("/srv/secret/config token=hunter2")

    request = pb.ComputeLossesRequest(candidate=data["cat"],
                                      content=[pb.WeightedImage(data=data["cat"])],
                                      style=[pb.WeightedImage(data=data["starry"])])
    for method in ("compute_losses", "stylize"):
        monkeypatch.setattr(random_engine, method, out_of_memory)
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == ("out of memory on the server; lower size or the style "
                                    "image scale")
    with pytest.raises(grpc.RpcError) as info:
        run_stylize(stub, stylize_request(data))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    for method in ("compute_losses", "stylize"):
        monkeypatch.setattr(random_engine, method, bug)
    calls = {"bug-42": lambda md: stub.ComputeLosses(request, timeout=30, metadata=md),
             "bug-43": lambda md: list(stub.Stylize(stylize_request(data), timeout=30,
                                                    metadata=md))}
    for request_id, call in calls.items():
        caplog.clear()
        with pytest.raises(grpc.RpcError) as info:
            call([("x-request-id", request_id)])
        assert info.value.code() == grpc.StatusCode.INTERNAL
        details = info.value.details()
        assert dict(info.value.initial_metadata())["x-request-id"] == request_id
        assert details == f"internal error (request id {request_id}); see the server log"
        assert not any(leak in details for leak in ("secret", "hunter2", "KeyError", "Trace"))
        # The log keeps what the caller was not told: the exception, under that request id.
        wait_for(lambda rid=request_id: any(
            r.exc_info and f"request_id={rid}" in r.getMessage() and "hunter2" in str(
                r.exc_info[1]) for r in caplog.records), what="the logged exception")
    monkeypatch.undo()
    # The server still serves.
    assert stub.ComputeLosses(request, timeout=60).losses.total > 0


def test_exif_rotated_candidate(stub, data, random_engine, images):
    """A JPEG candidate stored 48x32 with EXIF orientation 6 (rotate 90 degrees) is scored
    as the 32x48 image it shows: width and height swap, and so does the gradient."""
    stored = resize_long_side(load_image(images["coffee"]), 48)  # 48x32
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    candidate = buf.getvalue()
    request = pb.ComputeLossesRequest(candidate=candidate, gradient=True,
                                      content=[pb.WeightedImage(data=data["cat"])],
                                      style=[pb.WeightedImage(data=data["starry"])])
    response = stub.ComputeLosses(request, timeout=60)
    assert (response.width, response.height) == (32, 48)
    assert list(response.gradient.shape) == [3, 48, 32]
    upright = load_image(candidate)  # decoded and turned as the EXIF tag says
    assert upright.size == (32, 48)
    local = random_engine.compute_losses(upright, [data["cat"]], [data["starry"]],
                                         gradient=True)
    assert response.losses.total == pytest.approx(local.losses.total, rel=1e-5)
    gradient = np.frombuffer(response.gradient.data, dtype="<f4").reshape(3, 48, 32)
    np.testing.assert_allclose(gradient, local.gradient, rtol=1e-5, atol=1e-9)


def test_bf16_precision_travels(stub, data, random_engine, spy):
    """precision: PRECISION_BF16 reaches the engine and gives the engine's bf16 losses,
    which differ from the fp32 ones."""
    engine = spy(random_engine)
    fields = dict(candidate=data["coffee"], content=[pb.WeightedImage(data=data["cat"])],
                  style=[pb.WeightedImage(data=data["starry"])])
    remote = {p: stub.ComputeLosses(pb.ComputeLossesRequest(precision=p, **fields),
                                    timeout=60).losses.total
              for p in (pb.PRECISION_BF16, pb.PRECISION_FP32)}
    assert [call.options.precision for call in engine.calls] == ["bf16", "fp32"]
    local = {p: random_engine.compute_losses(data["coffee"], [data["cat"]], [data["starry"]],
                                             StyleOptions(precision=p)).losses.total
             for p in ("bf16", "fp32")}
    assert remote[pb.PRECISION_BF16] == pytest.approx(local["bf16"], rel=1e-5)
    assert remote[pb.PRECISION_FP32] == pytest.approx(local["fp32"], rel=1e-5)
    assert remote[pb.PRECISION_BF16] != pytest.approx(remote[pb.PRECISION_FP32], rel=1e-4)


def test_divergence_is_invalid_argument(stub, data):
    with pytest.raises(grpc.RpcError) as info:
        run_stylize(stub, stylize_request(data, size=32, iterations=10, content_weight=1e38,
                                          style_weight=1e38, tv_weight=1e38,
                                          precision=pb.PRECISION_FP32))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("learning_rate: the optimisation diverged")


# ------------------------------------------------------------------ two workers


def test_two_workers_run_two_calls_at_once(random_engine, images, spy):
    """The engine is thread-safe: two Stylize calls on two workers run at the same time (each
    waits at its start image until the other has started too) and each gives what it gives
    alone."""
    engine = spy(random_engine)
    requests = {
        "a": pb.StylizeRequest(content=[pb.WeightedImage(data=small_png(images["cat"]))],
                               style=[pb.WeightedImage(data=small_png(images["starry"]))],
                               size=48, iterations=5, precision=pb.PRECISION_FP32),
        "b": pb.StylizeRequest(content=[pb.WeightedImage(data=small_png(images["coffee"]))],
                               style=[pb.WeightedImage(data=small_png(images["scream"]))],
                               size=40, iterations=5, init=pb.INIT_NOISE, seed=9,
                               optimizer=pb.OPTIMIZER_ADAM, precision=pb.PRECISION_FP32),
    }
    with build_server([random_engine], workers=2, queue_size=0) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.StyleTransferServiceStub(ch)
        alone = {k: run_stylize(stub, r, timeout=120)[1] for k, r in requests.items()}
        started = threading.Barrier(2, timeout=60)
        engine.on_progress = lambda call, p: p.iteration == 0 and started.wait()
        results: dict[str, pb.Result] = {}
        errors: list[BaseException] = []

        def run(key: str) -> None:
            try:
                results[key] = run_stylize(stub, requests[key], timeout=120)[1]
            except BaseException as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(k,)) for k in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not errors, errors
        assert not started.broken, "the two calls did not run at the same time"
    for key in requests:
        together = np.asarray(Image.open(io.BytesIO(results[key].image.data)), dtype=float)
        solo = np.asarray(Image.open(io.BytesIO(alone[key].image.data)), dtype=float)
        assert together.shape == solo.shape
        assert np.abs(together - solo).max() <= 1, key  # 0..255: the same image
        assert results[key].stats.losses.total == pytest.approx(
            alone[key].stats.losses.total, rel=1e-4)
    assert results["a"].image.width == 48 and results["b"].image.width == 40


# ------------------------------------------------------------------------------ signals


@contextlib.contextmanager
def serve_process(tmp_path: Path, *flags: str) -> Iterator[SimpleNamespace]:
    """``gramstyle serve`` (random VGG16, CPU, a free port) in a child process: yields it with
    its port, ready line and a ``log()`` of its stderr; killed at the end if still running.
    Nothing here waits without a timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--arch", "vgg16", "--weights",
         "random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
    reader.start()
    ready: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: ready.put(process.stdout.readline()), daemon=True).start()

    def log() -> str:
        if process.poll() is not None:
            reader.join(timeout=30)
        return "".join(stderr_lines)

    try:
        try:
            line = ready.get(timeout=180)
        except queue.Empty:
            pytest.fail(f"no ready line within 180 s; stderr: {log()}")
        assert "ready on port" in line, (line, log())
        port = int(line.split("ready on port ")[1].split(":")[0])
        yield SimpleNamespace(process=process, port=port, ready=line, log=log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


def long_request(images, **fields) -> pb.StylizeRequest:
    """A 64 px run reporting every iteration: LONG unless ``fields`` say otherwise."""
    return pb.StylizeRequest(content=[pb.WeightedImage(data=small_png(images["cat"]))],
                             style=[pb.WeightedImage(data=small_png(images["starry"]))],
                             size=64, progress_every=1, **{**LONG, **fields})


def request_log_lines(log: str, method: str) -> list[str]:
    return [line for line in log.splitlines() if f"rpc={SERVICE}/{method} " in line]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_the_call_finish(images, tmp_path, signum, wait_for):
    with serve_process(tmp_path, "--grace", "60") as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = stub.Stylize(long_request(images, iterations=30), timeout=300)
            assert next(call).progress.iteration == 0
            server.process.send_signal(signum)
            # Health turns NOT_SERVING ...
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            # ... new calls are refused (the listener closes right after NOT_SERVING) ...
            def refused() -> bool:
                with grpc.insecure_channel(f"127.0.0.1:{server.port}") as fresh:
                    try:
                        pb_grpc.StyleTransferServiceStub(fresh).GetServerInfo(
                            pb.GetServerInfoRequest(), timeout=10)
                    except grpc.RpcError as error:
                        # UNAVAILABLE once the listener is closed; a call that raced the
                        # shutdown itself is CANCELLED by gRPC core.
                        assert error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                grpc.StatusCode.CANCELLED)
                        return True
                return False

            wait_for(refused, timeout=60, what="new calls to be refused")
            # ... and the call in flight runs to its end.
            rest = list(call)
            assert call.code() == grpc.StatusCode.OK
            assert [m.progress.iteration for m in rest[:-1]] == list(range(1, 31))
            assert rest[-1].result.stats.iterations == 30
        # Exits 0 after the drain, well before the 60 s grace.
        assert server.process.wait(timeout=50) == 0
        log = server.log()
    assert f"received {signum.name}" in log
    # One log line per request: request id, rpc, code, duration.
    lines = request_log_lines(log, "Stylize")
    assert len(lines) == 1 and "code=OK" in lines[0] and "duration_ms=" in lines[0]
    assert "request_id=" in lines[0]


@pytest.mark.slow
def test_sigterm_grace_expires_and_cancels_the_call(images, tmp_path):
    """A call still running when the grace period ends is cancelled (its optimisation stops),
    and the process exits 0."""
    with serve_process(tmp_path, "--grace", "3") as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.StyleTransferServiceStub(channel).Stylize(long_request(images),
                                                                     timeout=300)
            assert next(call).progress.iteration == 0
            server.process.send_signal(signal.SIGTERM)
            after = []
            with pytest.raises(grpc.RpcError) as info:
                for message in call:
                    after.append(message.progress.iteration)
            # Cancelled by the server's shutdown: gRPC tells the client UNAVAILABLE or
            # CANCELLED, depending on how far the connection had closed.
            assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert after, "the call ran on during the grace period"
            assert after[-1] < 10_000
        assert server.process.wait(timeout=60) == 0
        log = server.log()
    assert "received SIGTERM" in log
    lines = request_log_lines(log, "Stylize")
    assert len(lines) == 1 and "code=CANCELLED" in lines[0], lines


@pytest.mark.slow
def test_second_signal_cancels_at_once(images, tmp_path):
    """With a 600 s grace, a second SIGTERM during the drain cancels the call at once, and the
    process exits 0 (within 60 s: 10x less than the grace)."""
    with serve_process(tmp_path, "--grace", "600") as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=300)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = pb_grpc.StyleTransferServiceStub(channel).Stylize(long_request(images),
                                                                     timeout=300)
            assert next(call).progress.iteration == 0
            server.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            assert next(call).HasField("progress")  # still draining after the first signal
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert server.process.wait(timeout=60) == 0
        log = server.log()
    assert log.count("received SIGTERM") == 2


@pytest.mark.slow
def test_metrics_port_serves_real_counts(images, tmp_path, wait_for):
    with serve_process(tmp_path, "--grace", "30", "--metrics-port", "0") as server:
        match = re.search(r"metrics on :(\d+)/metrics", server.ready)
        assert match, server.ready
        metrics_port = int(match.group(1))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            for _ in range(2):
                stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
            _, result = run_stylize(stub, long_request(images, iterations=3), timeout=120)
            assert result.stats.iterations == 3
            with pytest.raises(grpc.RpcError):
                run_stylize(stub, pb.StylizeRequest(iterations=0), timeout=60)

        def count(rpc: str, code: str) -> float | None:
            return scrape(metrics_port).get(("gramstyle_requests_total", (
                ("code", code), ("rpc", f"{SERVICE}/{rpc}"))))

        wait_for(lambda: count("Stylize", "INVALID_ARGUMENT") == 1, what="the counts")
        samples = scrape(metrics_port)
        assert count("GetServerInfo", "OK") == 2 and count("Stylize", "OK") == 1
        assert samples[("gramstyle_iterations_total", ())] == 3
        assert samples[("gramstyle_busy_workers", ())] == 0
        assert samples[("gramstyle_request_duration_seconds_count",
                        (("rpc", f"{SERVICE}/Stylize"),))] == 2
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
