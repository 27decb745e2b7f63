"""The gRPC service against a real server on a loopback ephemeral port (CPU, small images).

Covers the issue's list: a full Stylize stream, ComputeLosses vs the in-process engine and
autograd, health/reflection/info, every bad input's status and message, deadlines freeing the
worker, RESOURCE_EXHAUSTED with health still answering, and SIGTERM draining a call.
"""

from __future__ import annotations

import io
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from gramstyle.images import load_image, resize_long_side
from gramstyle.options import StyleOptions
from gramstyle.server.serve import GramstyleServer
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

SERVICE = "gramstyle.v1.StyleTransferService"
REPO = Path(__file__).resolve().parents[1]


def png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def small(path: Path, size: int = 64) -> bytes:
    return png(resize_long_side(load_image(path), size))


@pytest.fixture(scope="module")
def data(images) -> dict[str, bytes]:
    return {"cat": small(images["cat"]), "starry": small(images["starry"]),
            "coffee": small(images["coffee"]), "cat_full": images["cat"].read_bytes()}


@pytest.fixture(scope="module")
def server(random_engine, hed_engine):
    """One worker and one queue slot, so the admission tests are exact. Default model: the
    random VGG19 (fast); the HED VGG16 is selectable by its file name."""
    srv = GramstyleServer([random_engine, hed_engine], host="127.0.0.1", port=0, workers=1,
                          queue_size=1).start()
    yield srv
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.StyleTransferServiceStub:
    return pb_grpc.StyleTransferServiceStub(channel)


def wait_idle(server: GramstyleServer, timeout: float = 10.0) -> float:
    """Seconds until no job is running or queued (fails the test after ``timeout``)."""
    start = time.monotonic()
    assert server.work.wait_idle(timeout), "the worker was not freed"
    return time.monotonic() - start


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


def test_stylize_options_travel(stub, data):
    """Layers, weights, init, optimiser, size, format and model choice all reach the engine."""
    request = stylize_request(
        data, iterations=3, size=48, output_format=pb.IMAGE_FORMAT_JPEG,
        optimizer=pb.OPTIMIZER_ADAM, learning_rate=0.05, init=pb.INIT_NOISE, seed=3,
        content_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="relu3_1")]),
        style_layers=pb.LayerSet(layers=[pb.WeightedLayer(name="relu1_1", weight=2),
                                         pb.WeightedLayer(name="relu2_1")]),
        style=[pb.WeightedImage(data=data["starry"], weight=1),
               pb.WeightedImage(data=data["coffee"], weight=0.5)],
        tv_weight=0.5, preserve_colors=True, weights="vgg16-hed-bsds500.pth", progress_every=100)
    progress, result = run_stylize(stub, request)
    assert [p.iteration for p in progress] == [0, 3]
    assert Image.open(io.BytesIO(result.image.data)).format == "JPEG"
    assert (result.image.width, result.image.height) == (48, 32)
    assert set(result.stats.losses.style_layers) == {"relu1_1", "relu2_1"}
    assert set(result.stats.losses.content_layers) == {"relu3_1"}
    assert result.stats.losses.tv > 0
    assert (result.stats.arch, result.stats.weights) == ("vgg16", "vgg16-hed-bsds500.pth")


# ------------------------------------------------------------------------------ ComputeLosses


def test_compute_losses_matches_engine_and_autograd(stub, data, hed_engine, images):
    cat = np.asarray(Image.open(io.BytesIO(small(images["cat"], 48))), dtype=np.int16)
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
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
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
    assert call(request_class(), timeout=5).models[0].arch == "vgg19"

    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert [(m.arch, m.weights, m.is_default) for m in info.models] == [
        ("vgg19", "random", True), ("vgg16", "vgg16-hed-bsds500.pth", False)]
    assert info.models[0].layer_names[:2] == ["conv1_1", "relu1_1"]
    assert info.models[0].layer_names[-1] == "pool5" and len(info.models[0].layer_names) == 37
    assert len(info.models[1].layer_names) == 31
    assert info.device == "cpu" and info.backend in ("cpu", "cuda", "einsum")
    assert info.version
    assert info.limits.workers == 1 and info.limits.queue_size == 1
    assert info.limits.max_message_bytes == 64 * 2**20
    assert info.limits.max_size == 2048 and info.limits.max_iterations == 10_000


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
    ("zero iterations", dict(iterations=0),
     "INVALID_ARGUMENT", "iterations: must be between 1 and 10000, got 0"),
    ("too many iterations", dict(iterations=10_001),
     "INVALID_ARGUMENT", "iterations: must be between 1 and 10000, got 10001"),
    ("size too small", dict(size=8),
     "INVALID_ARGUMENT", "size: must be an integer between 16 and 2048 pixels, got 8"),
    ("size too big", dict(size=4096),
     "INVALID_ARGUMENT", "size: must be an integer between 16 and 2048 pixels, got 4096"),
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
def test_bad_stylize_input(stub, data, what, fields, code, message):
    if fields == "truncated":
        fields = dict(content=[pb.WeightedImage(data=data["cat_full"][:4000])])
    elif fields == "nan_blend":
        fields = dict(style=[pb.WeightedImage(data=data["starry"], weight=float("nan"))])
    elif fields == "init_mismatch":
        fields = dict(init=pb.INIT_NOISE, init_image=data["cat"])
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        run_stylize(stub, stylize_request(data, **fields), timeout=30)
    assert info.value.code().name == code, info.value.details()
    assert info.value.details().startswith(message), info.value.details()
    assert time.monotonic() - start < 5  # rejected before any optimisation
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


def test_deadline_mid_stylize_frees_the_worker(stub, data, server):
    seen = []
    with pytest.raises(grpc.RpcError) as info:
        for message in stub.Stylize(stylize_request(data, iterations=10_000, progress_every=1),
                                    timeout=1.5):
            seen.append(message.progress.iteration)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(seen) >= 2, "the optimisation was running when the deadline passed"
    # Within one iteration (a 64 px iteration takes well under a second on 2 cores).
    assert wait_idle(server) < 1.0
    assert server.work.busy == 0
    # The next call is admitted and starts at once.
    start = time.monotonic()
    first = next(iter(stub.Stylize(stylize_request(data, iterations=1), timeout=30)))
    assert first.progress.iteration == 0 and time.monotonic() - start < 2.0
    wait_idle(server)


def test_full_queue_is_resource_exhausted_while_health_answers(stub, channel, data, server):
    long = stylize_request(data, iterations=10_000, progress_every=1000)
    running = stub.Stylize(long, timeout=60)
    next(running)  # the first progress message: it holds the only worker
    queued = stub.Stylize(long, timeout=60)
    deadline = time.monotonic() + 10
    while server.work.queued < 1:
        assert time.monotonic() < deadline, "the second call was not queued"
        time.sleep(0.02)
    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            run_stylize(stub, long, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("server busy: 1 of 1 worker(s) running and 1 of 1")
        with pytest.raises(grpc.RpcError) as info:
            stub.ComputeLosses(pb.ComputeLossesRequest(candidate=data["cat"]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 1.0, "refused at once"

        # Health and GetServerInfo still answer while every worker and slot is taken.
        start = time.monotonic()
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=2)
        assert (info.busy_workers, info.queued) == (1, 1)
        assert time.monotonic() - start < 1.0
        # A caller's mistake is still INVALID_ARGUMENT, not RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as bad:
            run_stylize(stub, stylize_request(data, iterations=0))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        metrics = server.metrics.registry
        assert metrics.get_sample_value("gramstyle_queue_depth") == 1
        assert metrics.get_sample_value("gramstyle_busy_workers") == 1
        assert metrics.get_sample_value("gramstyle_requests_total", {
            "rpc": f"{SERVICE}/Stylize", "code": "RESOURCE_EXHAUSTED"}) >= 1
    finally:
        running.cancel()
        queued.cancel()
    wait_idle(server)
    assert server.metrics.registry.get_sample_value("gramstyle_queue_depth") == 0
    assert server.metrics.registry.get_sample_value("gramstyle_request_duration_seconds_count",
                                                    {"rpc": f"{SERVICE}/Stylize"}) >= 3


def test_cancel_mid_stream_frees_the_worker(stub, data, server):
    call = stub.Stylize(stylize_request(data, iterations=10_000, progress_every=1), timeout=60)
    next(call)
    next(call)
    call.cancel()
    assert wait_idle(server) < 1.0


# ------------------------------------------------------------------------------ SIGTERM


def test_sigterm_lets_the_call_finish(images, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.client.cli", "serve", "--arch", "vgg16", "--weights",
         "random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", "--grace", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True).start()
    try:
        ready = process.stdout.readline()
        assert "ready on port" in ready, (ready, stderr_lines)
        port = int(ready.split("ready on port ")[1].split(":")[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            call = stub.Stylize(pb.StylizeRequest(
                content=[pb.WeightedImage(data=small(images["cat"]))],
                style=[pb.WeightedImage(data=small(images["starry"]))],
                size=64, iterations=30, progress_every=1), timeout=60)
            assert next(call).progress.iteration == 0
            process.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING ...
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            # ... new calls are refused (the listener closes right after NOT_SERVING) ...
            deadline = time.monotonic() + 10
            while True:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                    try:
                        pb_grpc.StyleTransferServiceStub(fresh).GetServerInfo(
                            pb.GetServerInfoRequest(), timeout=5)
                    except grpc.RpcError as refused:
                        # UNAVAILABLE once the listener is closed; a call that raced the
                        # shutdown itself is CANCELLED by gRPC core.
                        assert refused.code() in (grpc.StatusCode.UNAVAILABLE,
                                                  grpc.StatusCode.CANCELLED)
                        break
                assert time.monotonic() < deadline, "new calls were still accepted"
                time.sleep(0.05)
            # ... and the call in flight runs to its end.
            rest = list(call)
            assert call.code() == grpc.StatusCode.OK
            assert [m.progress.iteration for m in rest[:-1]] == list(range(1, 31))
            assert rest[-1].result.stats.iterations == 30
        # Exits 0 soon after the drain, well before the 60 s grace.
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = "".join(stderr_lines)
    assert "received SIGTERM" in log
    # One log line per request: request id, rpc, code, duration.
    lines = [line for line in log.splitlines() if f"rpc={SERVICE}/Stylize" in line]
    assert len(lines) == 1 and "code=OK" in lines[0] and "duration_ms=" in lines[0]
    assert "request_id=" in lines[0]


def test_metrics_endpoint(stub, server, data):
    import urllib.request

    port = server.metrics.serve_http(0, addr="127.0.0.1")
    stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'gramstyle_requests_total{{code="OK",rpc="{SERVICE}/GetServerInfo"}}' in text
    assert "gramstyle_request_duration_seconds_bucket" in text
    assert "gramstyle_queue_depth 0.0" in text and "gramstyle_iterations_total" in text
