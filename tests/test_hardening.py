"""Hostile clients (issue 9): one test (or more) per defect, against real servers on loopback.

1. idle long-lived streams (reflection, health Watch) never starve health, info or Stylize;
   per-connection stream cap;
2. a memory bound per request: --max-images, the header-based peak-memory estimate (checked
   against measured peak RSS), --max-request-memory, admission by memory;
3. cancellation honoured while decoding, resizing, computing targets and inside long network
   passes (the banded layers), for Stylize, ComputeLosses and the SIGTERM grace;
4. echoed values cut to a preview; no status message over 1 KiB;
5. malformed protobuf: INVALID_ARGUMENT, counted, one log line, no traceback;
6. an expired or cancelled queued call leaves the queue at once;
7. --metrics-host (loopback by default when --host is every interface);
8. x-request-id allowlist, escaped log fields, --log-format json;
9. the Pillow format allowlist, a candidate's size checked from its header;
10. a busy port: "port N is already in use", exit 1.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import re
import shlex
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
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from gramstyle.cli import main
from gramstyle.client import Client, ServiceError
from gramstyle.engine import bands, stop
from gramstyle.engine.stop import Cancelled
from gramstyle.images import ImageError, load_image, probe_image
from gramstyle.server.admission import QueueFull, WorkQueue
from gramstyle.server.interceptors import JsonFormatter
from gramstyle.server.serve import GramstyleServer, ServeConfig, default_metrics_host
from gramstyle.server.status import MAX_STATUS_BYTES, cap_message
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

SERVICE = "gramstyle.v1.StyleTransferService"
REPO = Path(__file__).resolve().parents[1]
#: An optimisation that outlives any test unless stopped.
LONG = dict(iterations=10_000, tolerance=0.0)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def channel_to(port: int) -> grpc.Channel:
    """A channel with its own TCP connection (gRPC shares connections between channels to
    the same address by default)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}",
                                 options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture(scope="module")
def small() -> bytes:
    return encode(noise(64, 48))


@pytest.fixture(scope="module")
def server(random_engine):
    srv = GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=0, workers=1,
                                                       queue_size=1)).start()
    yield srv
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def stub(server) -> pb_grpc.StyleTransferServiceStub:
    with channel_to(server.port) as channel:
        yield pb_grpc.StyleTransferServiceStub(channel)


def stylize(small: bytes, **fields) -> pb.StylizeRequest:
    base = dict(content=[pb.WeightedImage(data=small)], style=[pb.WeightedImage(data=small)],
                size=32, iterations=1)
    base.update(fields)
    return pb.StylizeRequest(**base)


def finish(stub, request: pb.StylizeRequest, timeout: float = 60) -> pb.Result:
    messages = list(stub.Stylize(request, timeout=timeout))
    assert messages[-1].HasField("result")
    return messages[-1].result


def requests_total(server: GramstyleServer, rpc: str, code: str) -> float:
    return server.metrics.registry.get_sample_value(
        "gramstyle_requests_total", {"rpc": f"{SERVICE}/{rpc}", "code": code}) or 0.0


# ------------------------------------------------------------ 1. idle streams starve nothing


def test_idle_streams_do_not_starve_health_or_stylize(server, stub, small):
    """200 idle reflection streams and 50 idle health Watch streams over 5 connections: the
    old thread-pool server stopped answering after 18 of them."""
    channels = [channel_to(server.port) for _ in range(5)]
    feeds: list[queue.Queue] = []
    streams = []
    try:
        for i in range(200):
            feed: queue.Queue = queue.Queue()
            call = reflection_pb2_grpc.ServerReflectionStub(channels[i % 5]) \
                .ServerReflectionInfo(iter(feed.get, None), timeout=120)
            feed.put(reflection_pb2.ServerReflectionRequest(list_services=""))
            feeds.append(feed)
            streams.append(call)
        for call in streams:  # each answered once: open, then idle
            assert next(call).list_services_response.service
        for i in range(50):
            watch = health_pb2_grpc.HealthStub(channels[i % 5]).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            streams.append(watch)

        with channel_to(server.port) as probe:
            health = health_pb2_grpc.HealthStub(probe)
            latencies = []
            for _ in range(100):
                start = time.perf_counter()
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                latencies.append(time.perf_counter() - start)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            p99 = sorted(latencies)[98]
            print(f"health p99 with 250 idle streams: {p99 * 1000:.1f} ms")
            # The requirement is 100 ms (bench/load.py measures it); the bound here is
            # generous for a shared CI machine: the old server did not answer at all.
            assert p99 < 0.5, latencies
            info = pb_grpc.StyleTransferServiceStub(probe).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=10)
            assert info.limits.workers == 1
            # A small Stylize is admitted and completes on another fresh connection.
            result = finish(pb_grpc.StyleTransferServiceStub(probe), stylize(small))
            assert result.stats.iterations == 1
    finally:
        for feed in feeds:
            feed.put(None)
        for call in streams:
            call.cancel()
        for channel in channels:
            channel.close()


def test_streams_per_connection_are_capped(random_engine, small):
    """Beyond --max-concurrent-streams on one connection the client must queue; other
    connections are unaffected."""
    srv = GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=0,
                                                       max_concurrent_streams=4)).start()
    feeds: list[queue.Queue] = []
    try:
        with channel_to(srv.port) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            calls = []
            for _ in range(4):
                feed: queue.Queue = queue.Queue()
                feeds.append(feed)
                calls.append(stub.ServerReflectionInfo(iter(feed.get, None), timeout=60))
                feed.put(reflection_pb2.ServerReflectionRequest(list_services=""))
                next(calls[-1])
            # A fifth stream on the same connection does not get a slot.
            with pytest.raises(grpc.RpcError) as waited:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=1.0)
            assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with channel_to(srv.port) as other:
                status = health_pb2_grpc.HealthStub(other).Check(
                    health_pb2.HealthCheckRequest(), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            for feed in feeds:
                feed.put(None)
            for call in calls:
                call.cancel()
    finally:
        srv.stop(grace=None)


def test_health_watchers_all_see_shutdown(random_engine):
    """Upstream's asyncio Watch forgets the other watchers when one leaves."""
    srv = GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=0)).start()
    stopped = threading.Thread(target=lambda: None)
    try:
        with channel_to(srv.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
                       for _ in range(3)]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watches[0].cancel()
            time.sleep(0.2)  # let the server see the first watcher leave
            stopped = threading.Thread(target=srv.stop, args=(30,))
            stopped.start()
            for watch in watches[1:]:
                assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
                watch.cancel()
    finally:
        stopped.join(60)
        srv.stop(grace=None)


def test_a_slow_reader_never_blocks_the_worker():
    """An unread Stylize stream: the worker hands progress over without waiting, the relay
    keeps the newest messages (bounded memory) and the end marker is never lost."""
    import asyncio

    from gramstyle.server.service import RELAY_LIMIT, _Relay

    async def main() -> tuple[list[int], int]:
        relay = _Relay(asyncio.get_running_loop())
        worker = threading.Thread(target=lambda: ([relay.put(i) for i in range(100)],
                                                  relay.close()))
        worker.start()
        await asyncio.get_running_loop().run_in_executor(None, worker.join, 10)
        await asyncio.sleep(0.1)  # the handed-over messages reach the loop
        return [item async for item in relay], relay.dropped

    received, dropped = asyncio.run(main())
    assert received == list(range(100 - RELAY_LIMIT, 100)) and dropped == 100 - RELAY_LIMIT


# ------------------------------------------------------------ 2. a memory bound per request


def test_max_images_is_checked_before_decoding(server, stub, small, random_engine, spy):
    engine = spy(random_engine)
    request = stylize(small, style=[pb.WeightedImage(data=small)] * 8)
    with pytest.raises(grpc.RpcError) as info:
        finish(stub, request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(
        "content/style: the request has 9 images (content 1, style 8), over this server's "
        "limit of 8 images per request"), info.value.details()
    assert engine.calls == []  # nothing decoded, no slot taken
    losses = pb.ComputeLossesRequest(candidate=small, style=[pb.WeightedImage(data=small)] * 8)
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(losses, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "(style 8, candidate 1)" in info.value.details()


def test_memory_estimate_refuses_before_decoding(random_engine, spy):
    """16 solid 4096x4096 PNGs (a 0.9 MB request) once raised peak RSS by 1.15 GiB."""
    big = encode(Image.new("RGB", (4096, 4096), "white"))
    assert len(big) < 100_000
    srv = GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=0, max_images=16,
                                                       max_request_memory=512 * 2**20)).start()
    engine = spy(random_engine)
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60, retries=1) as client:
            with pytest.raises(ServiceError) as error:
                client.stylize(big, [big] * 15, size=32, iterations=1)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.fields == ["content/style"]
            assert re.match(r"content/style: the request needs about [\d.]+ GiB \(images ",
                            error.value.message), error.value.message
            assert "over this server's limit of 512 MiB per request" in error.value.message
            # Size, not images: the field to lower is named.
            with pytest.raises(ServiceError) as error:
                client.stylize(encode(noise(64, 48)), (), size=2048, iterations=300,
                               style_weight=0)
            assert error.value.fields == ["size"], error.value.message
            assert "lower size" in error.value.message
            # A ComputeLosses candidate is sized from its header.
            with pytest.raises(ServiceError) as error:
                client.compute_losses(encode(Image.new("RGB", (2048, 2048))),
                                      [encode(noise(64, 48))], style_weight=0, gradient=True)
            assert error.value.fields == ["candidate"], error.value.message
            info = client.server_info()
            # GetServerInfo reports the limits, generically through ServerInfo.limits.
            assert info.limits["max_images"] == 16
            assert info.limits["max_request_memory_bytes"] == 512 * 2**20
            assert info.limits["memory_budget_bytes"] >= 512 * 2**20
            # A small request fits.
            assert client.stylize(encode(noise(64, 48)), (), size=32, iterations=1,
                                  style_weight=0).iterations == 1
        assert [c.method for c in engine.calls] == ["stylize"]  # only the small one ran
    finally:
        srv.stop(grace=None)


def test_compute_losses_is_not_held_to_stylize_defaults(random_engine, monkeypatch, small):
    """Found by the fuzzer: with --max-iterations below 300 or --max-size below 512, every
    ComputeLosses failed on the defaults of options it does not use (iterations, size)."""
    monkeypatch.setattr(random_engine, "max_size", 256)
    srv = GramstyleServer([random_engine],
                          ServeConfig(host="127.0.0.1", port=0, max_iterations=3)).start()
    try:
        with channel_to(srv.port) as channel:
            reply = pb_grpc.StyleTransferServiceStub(channel).ComputeLosses(
                pb.ComputeLossesRequest(candidate=small, content=[pb.WeightedImage(data=small)],
                                        style_weight=0.0), timeout=60)
        assert reply.losses.content == pytest.approx(0.0, abs=1e-6)
        assert (reply.width, reply.height) == (64, 48)
    finally:
        srv.stop(grace=None)


def test_work_queue_admits_by_memory_in_order():
    queue_ = WorkQueue(workers=3, queue_size=3, memory_budget=100)
    release = {name: threading.Event() for name in "abcd"}
    started: list[str] = []

    def job(name: str):
        def run() -> str:
            started.append(name)
            release[name].wait(30)
            return name
        return run

    try:
        a = queue_.submit(job("a"), memory=60)
        b = queue_.submit(job("b"), memory=60)  # does not fit next to a: waits
        c = queue_.submit(job("c"), memory=10)  # fits, but must not overtake b
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert started == ["a"] and queue_.busy == 1 and queue_.queued == 2
        assert queue_.reserved == 60
        release["a"].set()
        assert a.result(10) == "a"
        deadline = time.monotonic() + 10
        while len(started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started == ["a", "b", "c"] and queue_.reserved == 70
        # A job larger than the whole budget still runs, alone.
        d = queue_.submit(job("d"), memory=1000)
        time.sleep(0.2)
        assert "d" not in started
        release["b"].set()
        release["c"].set()
        release["d"].set()
        assert d.result(10) == "d" and b.result(10) == "b" and c.result(10) == "c"
        assert queue_.wait_idle(10) and queue_.reserved == 0
    finally:
        for event in release.values():
            event.set()
        queue_.shutdown()


ESTIMATE_SCRIPT = r"""
import io, json, re, sys
import numpy as np
from PIL import Image
from gramstyle.images import probe_image
from gramstyle.options import StyleOptions
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.server.memory import estimate_losses, estimate_stylize

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024

def png(width, height, seed):
    a = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO(); Image.fromarray(a).save(buf, "PNG"); return buf.getvalue()

engine = StyleTransfer(arch="vgg19", weights="random", device="cpu")
warm = png(32, 24, 0)
engine.stylize([warm], [warm], StyleOptions(size=32, iterations=2))
results = []
for case in json.loads(sys.argv[1]):
    contents = [png(*case["content"], 1)]
    styles = [png(*size, 2 + i) for i, size in enumerate(case["styles"])]
    options = engine.validate(StyleOptions(**case["options"]))
    encoded = sum(map(len, contents + styles))
    heads = lambda images: [probe_image(i) for i in images]
    if "candidate" in case:
        candidate = png(*case["candidate"], 9)
        estimate = estimate_losses(engine.extractor, options, probe_image(candidate),
                                   heads(contents), heads(styles), True,
                                   encoded + len(candidate))
    else:
        estimate = estimate_stylize(engine.extractor, options, heads(contents),
                                    heads(styles), None, encoded)
    engine.target_cache.clear()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = status("VmRSS")
    if "candidate" in case:
        engine.compute_losses(candidate, contents, styles, options, gradient=True)
    else:
        engine.stylize(contents, styles, options)
    results.append({"case": case, "estimate": estimate.total,
                    "peak": status("VmHWM") - before})
print(json.dumps(results))
"""


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux /proc peak-RSS reset")
def test_memory_estimate_is_not_below_measured_peak_rss():
    cases = [
        {"content": [128, 96], "styles": [[96, 96]],
         "options": {"size": 128, "iterations": 8, "tolerance": 0.0, "precision": "fp32"}},
        {"content": [256, 192], "styles": [[128, 128], [160, 120]],
         "options": {"size": 160, "iterations": 3, "tolerance": 0.0, "scales": 2}},
        {"content": [64, 48], "styles": [[384, 384]] * 2,
         "options": {"size": 48, "style_scale": 8.0, "iterations": 2,
                     "style_layers": ["relu1_1", "relu2_1"]}},
        {"content": [96, 96], "styles": [[96, 96]], "candidate": [256, 160],
         "options": {"precision": "fp32"}},
    ]
    proc = subprocess.run([sys.executable, "-c", ESTIMATE_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in json.loads(proc.stdout.splitlines()[-1]):
        estimate, peak = row["estimate"], row["peak"]
        print(f"{row['case']}: estimate {estimate / 2**20:.0f} MiB, "
              f"peak {peak / 2**20:.0f} MiB")
        assert estimate >= peak, row
        # ... and not so far above it that admission would be needlessly strict.
        assert estimate <= 4 * peak + 128 * 2**20, row


# ------------------------------------------------------------ 3. cancellation at every stage


def test_deadline_during_target_features_frees_the_worker(server, stub, small, random_engine,
                                                          spy):
    """size 32, style_scale 64: the style targets are computed at 2048 px (tens of seconds
    on a CPU), which used to ignore the deadline entirely."""
    engine = spy(random_engine)
    request = stylize(small, style=[pb.WeightedImage(data=encode(noise(256, 256)))],
                      style_scale=64.0, iterations=5)
    with pytest.raises(grpc.RpcError) as info:
        finish(stub, request, timeout=1.5)
    gone = time.monotonic()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.work.wait_idle(30), "the worker was never freed"
    freed = time.monotonic() - gone
    print(f"worker free {freed:.2f} s after the deadline")
    run = engine.last("stylize")
    assert isinstance(run.error, Cancelled)
    assert freed < 5.0, freed  # was about 22 s


def test_compute_losses_stops_when_the_caller_goes(server, stub, random_engine, spy):
    """ComputeLosses used to run to its end (about 16 s here) whatever the caller did."""
    engine = spy(random_engine)
    candidate = encode(noise(1024, 1024, 3), "JPEG")
    request = pb.ComputeLossesRequest(candidate=candidate,
                                      content=[pb.WeightedImage(data=candidate)],
                                      style_weight=0.0, gradient=True)
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(request, timeout=2.0)
    gone = time.monotonic()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.work.wait_idle(60)
    assert time.monotonic() - gone < 5.0
    assert isinstance(engine.last("compute_losses").error, Cancelled)


def test_decoding_announces_its_work_and_stops():
    big = encode(noise(2048, 2048, 5))
    seen: list[float] = []

    def stop(seconds: float) -> None:
        seen.append(seconds)
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        load_image(big, "content[0]", check=stop)
    assert seen and seen[0] > 0.05  # told before the pixels are decoded


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_banded_layers_match_whole_layers(random_engine, monkeypatch, precision):
    """A large layer runs in bands with a check before each, forward and backward, with the
    whole layer's result."""
    network = random_engine.extractor
    # Its own generator: the input must not depend on which tests ran before.
    x = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    layers = ["relu1_1", "relu2_1", "relu3_1", "conv4_1"]

    def run(check):
        pixels = x.clone().requires_grad_(True)
        context = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                   else torch.enable_grad())
        with context:
            feats = network(pixels, layers, check)
            loss = sum((f.float() ** 2).mean() for f in feats.values())
        (grad,) = torch.autograd.grad(loss, pixels)
        return feats, grad

    whole, whole_grad = run(None)
    checks: list[float] = []
    monkeypatch.setattr(bands, "BAND_SECONDS", 2e-4)  # every conv in several bands
    banded, banded_grad = run(checks.append)
    with torch.no_grad():  # without autograd, ReLUs and pools are banded too
        plain = network(x, layers, checks.append)
    tol = 1e-4 if precision == "fp32" else 3e-2
    for name in layers:
        assert banded[name].dtype == whole[name].dtype
        torch.testing.assert_close(banded[name].float(), whole[name].float(), rtol=tol,
                                   atol=tol)
        if precision == "fp32":
            torch.testing.assert_close(plain[name], whole[name], rtol=tol, atol=tol)
    # A ReLU input or a max-pool tie that the summation order moves across zero changes a
    # few gradient entries by a rounding-sized amount, so compare against the gradient's
    # scale.
    scale = whole_grad.abs().max().item()
    torch.testing.assert_close(banded_grad, whole_grad, rtol=0, atol=(tol * 10) * scale)
    assert len(checks) > 100


def test_stop_check_polls_by_work():
    polls = []
    check = stop.StopCheck(lambda: polls.append(1) or len(polls) >= 3,
                            lambda: Cancelled("stop"), interval=0.05)
    for _ in range(4):
        check(0.01)  # 40 ms of work: no poll yet
    assert polls == []
    check(0.02)
    assert polls == [1]
    check(1.0)
    with pytest.raises(Cancelled):
        check(1.0)


@pytest.mark.slow
def test_sigterm_grace_is_honoured_during_setup(tmp_path, small):
    process, port = start_serve(tmp_path, "--grace", "2")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            call = stub.Stylize(stylize(small, style=[pb.WeightedImage(
                data=encode(noise(256, 256)))], style_scale=64.0, iterations=5), timeout=120)
            time.sleep(1.0)  # the job is computing its 2048 px style targets
            start = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            took = time.monotonic() - start
            with pytest.raises(grpc.RpcError):
                list(call)
        print(f"exited {took:.1f} s after SIGTERM with --grace 2")
        assert took < 10, took  # was 22 s
    finally:
        if process.poll() is None:
            process.kill()


# ------------------------------------------------------------ 4. echoed values are previews


def test_long_values_are_previewed_and_messages_capped(server, small):
    with Client(f"127.0.0.1:{server.port}", timeout=60, retries=1) as client:
        with pytest.raises(ServiceError) as error:
            client.stylize(small, small, size=32, iterations=1, style_layers=["x" * 17_000])
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT  # was RESOURCE_EXHAUSTED
        assert "… (17000 chars)" in error.value.message
        assert len(error.value.message.encode()) <= MAX_STATUS_BYTES
        assert error.value.fields == ["style_layers"]
        with pytest.raises(ServiceError) as error:
            client.stylize(small, small, size=32, iterations=1, weights="w" * 17_000)
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "… (17000 chars)" in error.value.message
        assert len(error.value.message.encode()) <= MAX_STATUS_BYTES
        # A digit string too long for int() is still a clear layer error.
        with pytest.raises(ServiceError) as error:
            client.stylize(small, small, size=32, iterations=1, content_layers=["9" * 5000])
        assert error.value.message.startswith("content_layers: unknown layer '999")


def test_cli_exits_2_for_a_huge_layer_name(server, tmp_path, capsys):
    image = tmp_path / "c.png"
    image.write_bytes(encode(noise(64, 48)))
    code = main(["stylize", "--server", f"127.0.0.1:{server.port}", "--content", str(image),
                 "--style", str(image), "--size", "32", "--iterations", "1", "-q", "-o",
                 str(tmp_path / "o.png"), "--style-layers", "y" * 17_000])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "server answered INVALID_ARGUMENT: style_layers: unknown layer" in err


def test_cap_message_keeps_any_message_under_1_kib():
    long = "content[0]: " + "é" * 3000
    capped = cap_message(long)
    assert len(capped.encode()) <= MAX_STATUS_BYTES
    assert capped.startswith("content[0]: éé") and capped.endswith(f"… ({len(long)} chars)")
    assert cap_message("short") == "short"


# ------------------------------------------------------------ 5. malformed protobuf


@pytest.mark.parametrize("method,message", [
    ("Stylize", "StylizeRequest"), ("ComputeLosses", "ComputeLossesRequest"),
    ("GetServerInfo", "GetServerInfoRequest")])
def test_malformed_protobuf_is_invalid_argument(server, caplog, method, message):
    streaming = method == "Stylize"
    before = requests_total(server, method, "INVALID_ARGUMENT")
    cases = [b"\xff\xff\xff\xff", b"\x0a\x05ab"]  # a bad tag; a truncated field
    if method != "GetServerInfo":  # a string field that is not UTF-8
        cases.append(getattr(pb, message)(arch="ab").SerializeToString()
                     .replace(b"ab", b"\xff\xfe"))
    with channel_to(server.port) as channel, caplog.at_level(logging.INFO):
        path = f"/{SERVICE}/{method}"
        call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
        for raw in cases:
            with pytest.raises(grpc.RpcError) as info:
                reply = call(raw, timeout=10)
                if streaming:
                    list(reply)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith(
                f"request is not a valid gramstyle.v1.{message}")
        # The server counts and logs a call as it ends, which may be just after the client
        # has read the status: wait for the count (an event), not a fixed time.
        deadline = time.monotonic() + 10
        while (requests_total(server, method, "INVALID_ARGUMENT") < before + len(cases)
               and time.monotonic() < deadline):
            time.sleep(0.02)  # end() logs the line before it counts the call
    assert requests_total(server, method, "INVALID_ARGUMENT") == before + len(cases)
    lines = [r for r in caplog.records if f"rpc={SERVICE}/{method}" in r.getMessage()]
    assert len(lines) == len(cases)  # one line per call
    assert all("code=INVALID_ARGUMENT" in r.getMessage() for r in lines)
    assert not any(r.exc_info for r in caplog.records), "no traceback"


def test_malformed_reflection_stream_is_invalid_argument(server):
    with channel_to(server.port) as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/"
                                     "ServerReflectionInfo")
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b"\xff\xff\xff"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------ 6. expired queued calls leave


def _occupy_worker(stub, small) -> grpc.Call:
    call = stub.Stylize(stylize(small, **LONG, progress_every=1000), timeout=120)
    assert next(call).progress.iteration == 0
    return call


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_queued_call_leaves_the_queue_at_once(server, stub, small, random_engine, spy,
                                              wait_for, how):
    engine = spy(random_engine)
    running = _occupy_worker(stub, small)
    try:
        queued = stub.Stylize(stylize(small), timeout=3.0 if how == "deadline" else 120)
        wait_for(lambda: server.work.queued == 1, what="the call to be queued")
        if how == "cancel":
            queued.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(queued)
        assert info.value.code() == (grpc.StatusCode.DEADLINE_EXCEEDED if how == "deadline"
                                     else grpc.StatusCode.CANCELLED)
        # The slot is free while the worker is still busy: the next call is queued, not
        # refused (the old queue kept the slot until a worker picked the call up).
        wait_for(lambda: server.work.queued == 0, timeout=5, what="the slot to be freed")
        assert server.work.busy == 1
        again = stub.Stylize(stylize(small), timeout=120)
        wait_for(lambda: server.work.queued == 1, what="the next call to be queued")
        again.cancel()
    finally:
        running.cancel()
    assert server.work.wait_idle(30)
    assert len(engine.calls) == 1  # neither queued call ever reached the engine


def test_full_queue_is_still_refused(server, stub, small):
    running = _occupy_worker(stub, small)
    queued = stub.Stylize(stylize(small), timeout=120)
    try:
        deadline = time.monotonic() + 30
        while server.work.queued < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            finish(stub, stylize(small), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        queued.cancel()
        running.cancel()
    assert server.work.wait_idle(30)
    work = WorkQueue(1, 0)
    try:
        release = threading.Event()
        work.submit(lambda: release.wait(30))
        with pytest.raises(QueueFull):
            work.submit(lambda: None)
        release.set()
    finally:
        work.shutdown()


# ------------------------------------------------------------ 7. metrics host


def test_metrics_host_defaults():
    assert default_metrics_host("[::]") == "127.0.0.1"
    assert default_metrics_host("0.0.0.0") == "127.0.0.1"
    assert default_metrics_host("10.1.2.3") == "10.1.2.3"
    assert default_metrics_host("[::1]") == "::1"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for name in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


# ------------------------------------------------------------ 8. request ids and log formats


def test_forged_request_id_is_replaced_and_escaped(server, caplog):
    forged = "abc code=OK rpc=fake"
    with channel_to(server.port) as channel, caplog.at_level(logging.INFO):
        stub = pb_grpc.StyleTransferServiceStub(channel)
        _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=10,
                                               metadata=[("x-request-id", forged)])
        sent = dict(call.initial_metadata())["x-request-id"]
        _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=10,
                                               metadata=[("x-request-id", "job-7.a:b_c")])
        kept = dict(call.initial_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", sent) and kept == "job-7.a:b_c"
    records = [r for r in caplog.records if r.name == "gramstyle.server.requests"]
    line = next(r.getMessage() for r in records if sent in r.getMessage())
    fields = dict(part.split("=", 1) for part in shlex.split(line))
    assert fields["request_id"] == sent and fields["code"] == "OK"
    assert fields["rpc"] == f"{SERVICE}/GetServerInfo"
    assert fields["rejected_request_id"] == forged
    assert any(r.getMessage().startswith("request_id=job-7.a:b_c ") for r in records)
    # The JSON format: one object per line, the same fields.
    record = next(r for r in records if sent in r.getMessage())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == sent and entry["rejected_request_id"] == forged
    assert entry["code"] == "OK" and entry["level"] == "INFO"


# ------------------------------------------------------------ 9. Pillow allowlist, headers


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto showpage\n"


def test_only_allowed_formats_are_decoded(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):  # pragma: no cover - must never run
        raise AssertionError("Ghostscript would run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    for data in (EPS, encode(Image.new("RGB", (8, 8)), "PPM"),
                 encode(Image.new("RGB", (8, 8)), "TGA")):
        with pytest.raises(ImageError, match=r"not a PNG, JPEG, WebP, BMP, TIFF or GIF image"):
            load_image(data, "style[0]")
        with pytest.raises(ImageError):
            probe_image(data, "style[0]")
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        assert load_image(encode(Image.new("RGB", (8, 6), "red"), fmt)).size == (8, 6), fmt
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert load_image(gif).getpixel((0, 0)) == (255, 0, 0)  # the first frame


def test_eps_over_the_service_is_invalid_argument(server, stub, small):
    with pytest.raises(grpc.RpcError) as info:
        finish(stub, stylize(small, style=[pb.WeightedImage(data=EPS)]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("style[0]: cannot decode image")


def test_candidate_size_is_checked_from_its_header(server, stub, monkeypatch, small):
    from PIL import ImageFile

    decoded: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        decoded.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    candidate = encode(Image.new("RGB", (4096, 4096)))
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(pb.ComputeLossesRequest(candidate=candidate, style_weight=0,
                                                   content=[pb.WeightedImage(data=small)]),
                           timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "candidate: long side 4096 px is over the limit of 2048 px"
    assert (4096, 4096) not in decoded


# ------------------------------------------------------------ 10. busy port, serve flags


def start_serve(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """``gramstyle serve`` (random VGG16, CPU, loopback) in a subprocess; (process, port)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "gramstyle.cli", "serve", "--arch", "vgg16", "--weights",
         "random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    process.stderr_lines = []  # type: ignore[attr-defined]
    threading.Thread(target=lambda: process.stderr_lines.extend(process.stderr),
                     daemon=True).start()
    ready = process.stdout.readline()
    assert "ready on port" in ready, (ready, process.stderr_lines)
    process.ready = ready  # type: ignore[attr-defined]
    return process, int(ready.split("ready on port ")[1].split(":")[0])


def test_busy_port_is_refused(random_engine, capsys):
    first = GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=0)).start()
    try:
        with pytest.raises(OSError, match=rf"^port {first.port} is already in use$"):
            GramstyleServer([random_engine], ServeConfig(host="127.0.0.1", port=first.port))
        code = main(["serve", "--arch", "vgg16", "--weights", "random", "--device", "cpu",
                     "--host", "127.0.0.1", "--port", str(first.port)])
        assert code == 1
        assert f"gramstyle: error: --port: port {first.port} is already in use" in \
            capsys.readouterr().err
    finally:
        first.stop(grace=None)


@pytest.mark.slow
def test_serve_json_logs_metrics_host_and_ready_line(tmp_path, small):
    process, port = start_serve(tmp_path, "--metrics-port", "0", "--log-format", "json",
                                "--memory-budget", "3G", "--max-images", "5")
    try:
        ready = process.ready
        assert "memory budget 3.0 GiB (per request 3.0 GiB), max images 5" in ready, ready
        metrics_port = int(re.search(r"metrics on :(\d+)/metrics", ready).group(1))
        assert "(host 127.0.0.1)" in ready
        if Path("/proc/net/tcp").exists():
            assert _listening_addresses(metrics_port) == {"0100007F"}  # 127.0.0.1 only
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.StyleTransferServiceStub(channel)
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30,
                                      metadata=[("x-request-id", 'bad id" code=OK')])
            assert info.limits.memory_budget_bytes == 3 * 2**30
            assert info.limits.max_images == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.2)
    # Every log line is one JSON object (Python warnings, which bypass logging, aside).
    lines = [line for line in process.stderr_lines if line.startswith(("{", "20"))]
    entries = [json.loads(line) for line in lines]
    request = next(e for e in entries if e.get("rpc") == f"{SERVICE}/GetServerInfo")
    assert request["code"] == "OK" and request["rejected_request_id"] == 'bad id" code=OK'
    assert re.fullmatch(r"[0-9a-f]{16}", request["request_id"])


def test_serve_flag_checks(capsys):
    for flags, message in ((["--max-images", "0"], "--max-images: must be >= 1, got 0"),
                           (["--max-concurrent-streams", "0"],
                            "--max-concurrent-streams: must be >= 1, got 0")):
        assert main(["serve", *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--memory-budget", "lots"])
    assert "expected a size such as 512M, 8G" in capsys.readouterr().err


# ------------------------------------------------------------ helpers used above


def header_bomb(side: int) -> bytes:
    """A 1x1 PNG whose header claims side x side pixels (valid CRC)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_header_bombs_are_refused_before_admission(server, stub, random_engine, spy):
    engine = spy(random_engine)
    with pytest.raises(grpc.RpcError) as info:
        finish(stub, pb.StylizeRequest(content=[pb.WeightedImage(data=header_bomb(5000))],
                                       size=32, iterations=1), timeout=30)
    assert info.value.details().startswith("content[0]: image is 5000x5000")
    assert engine.calls == []  # refused from the header, before any job

