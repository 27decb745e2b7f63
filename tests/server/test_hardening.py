"""Hostile clients (issue 9): one test (or more) per defect, against real servers on loopback.

The unit tests of the parts involved sit with their modules: the work queue in
test_admission.py, the memory estimate in test_memory.py, status messages in test_status.py,
the banded layers and stop checks in tests/engine/test_bands.py, decoding and the format
allowlist in tests/core/test_images.py.

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
import pytest
from conftest import EPS, build_server, encode, noise
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from gramstyle.cli import main
from gramstyle.client import Client, ServiceError
from gramstyle.engine.stop import Cancelled
from gramstyle.server.admission import QueueFull, WorkQueue
from gramstyle.server.interceptors import JsonFormatter
from gramstyle.server.serve import GramstyleServer, default_metrics_host
from gramstyle.server.status import MAX_STATUS_BYTES
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

SERVICE = "gramstyle.v1.StyleTransferService"
REPO = Path(__file__).resolve().parents[2]
#: An optimisation that outlives any test unless stopped.
LONG = dict(iterations=10_000, tolerance=0.0)


def channel_to(port: int) -> grpc.Channel:
    """A channel with its own TCP connection (gRPC shares connections between channels to
    the same address by default)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}",
                                 options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture(scope="module")
def small() -> bytes:
    return encode(noise(64, 48))


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
    srv = build_server([random_engine], max_concurrent_streams=4).start()
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
    srv = build_server([random_engine]).start()
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
    srv = build_server([random_engine], max_images=16, max_request_memory=512 * 2**20).start()
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
    srv = build_server([random_engine], max_iterations=3).start()
    try:
        with channel_to(srv.port) as channel:
            reply = pb_grpc.StyleTransferServiceStub(channel).ComputeLosses(
                pb.ComputeLossesRequest(candidate=small, content=[pb.WeightedImage(data=small)],
                                        style_weight=0.0), timeout=60)
        assert reply.losses.content == pytest.approx(0.0, abs=1e-6)
        assert (reply.width, reply.height) == (64, 48)
    finally:
        srv.stop(grace=None)


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


# ------------------------------------------------------------ 5. malformed protobuf


@pytest.mark.parametrize("method,message", [
    ("Stylize", "StylizeRequest"), ("ComputeLosses", "ComputeLossesRequest"),
    ("GetServerInfo", "GetServerInfoRequest")])
def test_malformed_protobuf_is_invalid_argument(server, caplog, method, message):
    streaming = method == "Stylize"
    # A call of an earlier test on this module's server may still be counted as it ends:
    # start from a settled count.
    before = requests_total(server, method, "INVALID_ARGUMENT")
    settle = time.monotonic() + 10
    while time.monotonic() < settle:
        time.sleep(0.3)
        now = requests_total(server, method, "INVALID_ARGUMENT")
        if now == before:
            break
        before = now
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
    candidate = encode(Image.new("RGB", (4200, 2000)))
    with pytest.raises(grpc.RpcError) as info:
        stub.ComputeLosses(pb.ComputeLossesRequest(candidate=candidate, style_weight=0,
                                                   content=[pb.WeightedImage(data=small)]),
                           timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "candidate: long side 4200 px is over the limit of 4096 px"
    assert (4200, 2000) not in decoded


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
    first = build_server([random_engine]).start()
    try:
        with pytest.raises(OSError, match=rf"^port {first.port} is already in use$"):
            build_server([random_engine], port=first.port)
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

