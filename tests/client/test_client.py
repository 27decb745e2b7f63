"""The client library: sync and async clients against a real server, round_robin over several
servers, retries on UNAVAILABLE, message-size limits, and the client-only install (torch not
importable)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import png, shrink
from PIL import Image

from gramstyle.client import AsyncClient, Client, ServiceError
from gramstyle.client.channel import normalize_target, service_config
from gramstyle.codec import losses_request, stylize_request
from gramstyle.engine.stop import Cancelled
from gramstyle.options import StyleOptions
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

#: The conftest ``server``: one worker and two queue slots.
SERVER_SETTINGS = {"queue_size": 2}

#: A run that goes on until it is stopped (deadline, cancel): 10 000 iterations and, where the
#: option exists, no early stop on convergence (tolerance 0).
LONG = {"iterations": 10_000,
        **({"tolerance": 0.0} if "tolerance" in StyleOptions.__dataclass_fields__ else {})}


@pytest.fixture(scope="module")
def cat(images) -> Image.Image:
    return shrink(images["cat"], 64)


@pytest.fixture(scope="module")
def starry(images) -> bytes:
    return png(shrink(images["starry"], 64))


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


# ------------------------------------------------------------------------------ sync client


def test_stylize_with_callback_paths_bytes_and_pil(client, images, cat, starry, tmp_path):
    seen = []
    result = client.stylize(cat, [starry, images["shipwreck"]], size=48, iterations=4,
                            progress_every=2, style_blend_weights=[2, 1], preview=True,
                            progress=seen.append)
    assert [p.iteration for p in seen] == [0, 2, 4]
    assert all(p.image.size == (48, 32) for p in seen)
    assert result.image.size == (48, 32) and (result.width, result.height) == (48, 32)
    assert result.data.startswith(b"\x89PNG") and result.format == "png"
    assert result.iterations == 4 and result.device == "cpu"
    assert result.losses.total == pytest.approx(seen[-1].losses.total, rel=1e-6)
    out = tmp_path / "out.webp"
    result.save(out)
    assert Image.open(out).format == "WEBP"


def test_stylize_stream_iterator_and_options_object(client, images, starry):
    options = StyleOptions(size=32, iterations=3, progress_every=1, style_layers=("relu1_1",))
    stream = client.stylize_stream(images["cat"], starry, options, output_format="jpeg",
                                   iterations=2)  # a keyword overrides the options object
    iterations = [p.iteration for p in stream]
    assert iterations == [0, 1, 2]
    assert stream.result.format == "jpeg" and stream.result.image.size == (32, 21)
    assert set(stream.result.losses.style_layers) == {"relu1_1"}


def test_compute_losses_gradient_matches_engine(client, random_engine, cat, starry):
    report = client.compute_losses(cat, [cat], [starry], gradient=True, tv_weight=1.0,
                                   style_layers={"relu1_1": 3.0, "relu3_1": 1.0})
    local = random_engine.compute_losses(cat, [cat], [starry], StyleOptions(
        tv_weight=1.0, style_layers=("relu1_1", "relu3_1"), style_layer_weights=(3.0, 1.0)),
        gradient=True)
    assert report.losses.total == pytest.approx(local.losses.total, rel=1e-5)
    assert report.losses.style_layers == pytest.approx(local.losses.style_layers, rel=1e-5)
    assert report.gradient_shape == (3, 43, 64) and (report.width, report.height) == (64, 43)
    np.testing.assert_allclose(report.gradient, local.gradient, rtol=1e-5, atol=1e-9)
    assert client.compute_losses(cat, [cat], [starry]).gradient is None


def test_server_info(client):
    info = client.server_info()
    assert info.models[0].arch == "vgg19" and info.models[0].weights == "random"
    assert info.models[0].is_default and "relu4_2" in info.models[0].layer_names
    assert info.limits["workers"] == 1 and info.limits["queue_size"] == 2
    assert info.device == "cpu" and info.version


def test_errors_are_service_errors(client, cat, starry, tmp_path):
    with pytest.raises(ServiceError) as error:
        client.stylize(b"not an image", starry, size=32, iterations=1)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.message.startswith("content[0]: cannot decode image")
    assert error.value.caller_mistake and error.value.request_id
    assert str(error.value).startswith("INVALID_ARGUMENT: content[0]:")
    # google.rpc.BadRequest details name the field, for programs that branch on it.
    assert error.value.fields == ["content[0]"]
    assert error.value.violations[0].description.startswith("cannot decode image")
    with pytest.raises(ServiceError) as error:
        client.compute_losses(cat, [cat], [starry], weights="imagenet")
    assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.value.fields == ["weights"]
    with pytest.raises(ServiceError) as error:
        client.stylize(cat, starry, style_layers=["relu1_1", "relu9_1"], size=32, iterations=1)
    assert error.value.fields == ["style_layers"]
    assert error.value.message.startswith("style_layers: unknown layer 'relu9_1'")
    # Local mistakes are caught before anything is sent.
    with pytest.raises(ValueError, match=r"^style\[0\]: file not found"):
        client.stylize(cat, tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="unknown option"):
        client.stylize(cat, starry, sise=32)
    with pytest.raises(ValueError, match=r"^style_layer_weights: expected 1 value"):
        client.stylize(cat, starry, style_layers=["relu1_1"], style_layer_weights=[1, 2])


def stopped_within_a_step(engine, server) -> None:
    """The server's latest optimisation was stopped (not finished), at most a step or two
    after the caller gave up, and its worker is free again. Waits generously: the bound is
    on steps, never on seconds."""
    run = engine.last("stylize")
    assert isinstance(run.error, Cancelled), run.error
    assert run.steps_after_caller_gone <= 2, run.steps_after_caller_gone
    assert server.work.wait_idle(60), "the worker was not freed"
    engine.caller_gone.clear()


def stylize_count(server, code: str) -> float:
    """gramstyle_requests_total of Stylize calls that ended with ``code``."""
    return server.metrics.registry.get_sample_value("gramstyle_requests_total", {
        "rpc": "gramstyle.v1.StyleTransferService/Stylize", "code": code}) or 0.0


def stylize_counts(server) -> dict[str, float]:
    """Every gramstyle_requests_total of Stylize, by code."""
    return {sample.labels["code"]: sample.value
            for metric in server.metrics.registry.collect() for sample in metric.samples
            if sample.name == "gramstyle_requests_total"
            and sample.labels.get("rpc", "").endswith("/Stylize")}


def wait_for_counts(server, expected: dict[str, float], timeout: float = 60) -> None:
    """Wait until the server has counted its Stylize calls by code as ``expected``."""
    deadline = time.monotonic() + timeout
    while {code: stylize_count(server, code) for code in expected} != expected:
        assert time.monotonic() < deadline, (stylize_counts(server), expected)
        time.sleep(0.05)


def test_deadline_and_cancel(client, server, cat, starry, random_engine, spy):
    engine = spy(random_engine)
    before = {code: stylize_count(server, code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    with pytest.raises(ServiceError) as error:
        client.stylize(cat, starry, size=64, timeout=1.0, **LONG)
    engine.caller_gone.set()
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not error.value.caller_mistake
    stopped_within_a_step(engine, server)

    stream = client.stylize_stream(cat, starry, size=64, progress_every=1, **LONG)
    with stream:
        for p in stream:
            if p.iteration == 2:
                break  # leaving the with-block cancels the call
    engine.caller_gone.set()
    stopped_within_a_step(engine, server)
    # A progress callback that raises cancels the call too.
    with pytest.raises(KeyboardInterrupt):
        client.stylize(cat, starry, size=64, **LONG,
                       progress=lambda p: (_ for _ in ()).throw(KeyboardInterrupt))
    engine.caller_gone.set()
    stopped_within_a_step(engine, server)
    # The server counted each call by how it ended.
    wait_for_counts(server, {"DEADLINE_EXCEEDED": before["DEADLINE_EXCEEDED"] + 1,
                             "CANCELLED": before["CANCELLED"] + 2})


def test_message_limits_are_raised_both_ways(client):
    """A > 4 MiB request (noise PNG) and a > 4 MiB response (a 640x640 gradient)."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (1300, 1300, 3), dtype=np.uint8))
    big = png(noise)
    assert len(big) > 4 * 2**20
    result = client.stylize(big, (), size=32, iterations=1, style_weight=0,
                            content_layers=["relu1_1"])
    assert result.image.size == (32, 32)
    candidate = png(noise.resize((640, 640)))
    report = client.compute_losses(candidate, [candidate], (), gradient=True, style_weight=0,
                                   content_layers=["relu1_1"])
    assert len(report.gradient_bytes) == 3 * 640 * 640 * 4 > 4 * 2**20


# ------------------------------------------------------------------------------ async client


def test_async_client(server, cat, starry):
    async def main():
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as aclient:
            info = await aclient.server_info()
            seen = []

            async def on_progress(p):
                seen.append(p.iteration)

            result = await aclient.stylize(cat, starry, size=32, iterations=3, progress_every=2,
                                           progress=on_progress)
            stream = aclient.stylize_stream(cat, starry, size=32, iterations=2, progress_every=1)
            streamed = [p.iteration async for p in stream]
            report = await aclient.compute_losses(cat, [cat], [starry])
            try:
                await aclient.stylize(cat, starry, iterations=0)
            except ServiceError as exc:
                error = exc
            return info, seen, result, streamed, stream.result, report, error

    info, seen, result, streamed, streamed_result, report, error = asyncio.run(main())
    assert info.models[0].arch == "vgg19"
    assert seen == [0, 2, 3] and result.image.size == (32, 22)  # from the 64x43 cat
    assert streamed == [0, 1, 2] and streamed_result.iterations == 2
    assert report.losses.content == pytest.approx(0.0, abs=1e-6)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "iterations: must be between 1 and 10000, got 0"


def test_async_client_deadline_and_cancel(server, cat, starry, random_engine, spy):
    """AsyncClient: a deadline, leaving a stream early and cancelling the awaiting task each
    stop the server's optimisation within a step; the server counts each by its code."""
    engine = spy(random_engine)
    before = {code: stylize_count(server, code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    long = dict(size=64, progress_every=1, **LONG)

    async def main() -> None:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as aclient:
            with pytest.raises(ServiceError) as error:
                await aclient.stylize(cat, starry, timeout=1.0, **long)
            engine.caller_gone.set()
            assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.to_thread(stopped_within_a_step, engine, server)

            stream = aclient.stylize_stream(cat, starry, **long)
            async with stream:
                async for p in stream:
                    if p.iteration == 2:
                        break  # leaving the async with-block cancels the call
            engine.caller_gone.set()
            await asyncio.to_thread(stopped_within_a_step, engine, server)

            running = asyncio.Event()
            task = asyncio.create_task(aclient.stylize(
                cat, starry, progress=lambda p: p.iteration >= 1 and running.set(), **long))
            await asyncio.wait_for(running.wait(), timeout=120)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            engine.caller_gone.set()
            await asyncio.to_thread(stopped_within_a_step, engine, server)

    asyncio.run(main())
    wait_for_counts(server, {"DEADLINE_EXCEEDED": before["DEADLINE_EXCEEDED"] + 1,
                             "CANCELLED": before["CANCELLED"] + 2})


# ------------------------------------------------------------------ channel: balancing, retries


class FakeService(pb_grpc.StyleTransferServiceServicer):
    """GetServerInfo only; fails with UNAVAILABLE for the first ``failures`` calls."""

    def __init__(self, name: str, failures: int = 0):
        self.name, self.failures, self.calls = name, failures, 0
        self.lock = threading.Lock()

    def GetServerInfo(self, request, context):
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.GetServerInfoResponse(version=self.name)


@pytest.fixture
def fake_servers():
    started = []

    def start(name: str, failures: int = 0) -> tuple[FakeService, int]:
        service = FakeService(name, failures)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_StyleTransferServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return service, port

    yield start
    for server in started:
        server.stop(None)


def test_round_robin_over_several_addresses(fake_servers):
    (a, port_a), (b, port_b) = fake_servers("a"), fake_servers("b")
    for target in (f"127.0.0.1:{port_a},127.0.0.1:{port_b}",
                   [f"127.0.0.1:{port_a}", f"localhost:{port_b}"]):
        a.calls = b.calls = 0
        with Client(target, timeout=30) as c:
            c.wait_ready(30)
            # Wait until both connections are up: until each server has answered once.
            deadline = time.monotonic() + 60
            while not (a.calls and b.calls):
                assert time.monotonic() < deadline, "both servers never answered"
                c.server_info()
            a.calls = b.calls = 0
            versions = [c.server_info().version for _ in range(20)]
        assert set(versions) == {"a", "b"}
        # round_robin, with both connections up, alternates strictly.
        assert abs(a.calls - b.calls) <= 1, (a.calls, b.calls)
        assert versions.count("a") == a.calls and versions.count("b") == b.calls


def test_retries_on_unavailable(fake_servers):
    flaky, port = fake_servers("flaky", failures=2)
    with Client(f"127.0.0.1:{port}", timeout=10) as c:
        assert c.server_info().version == "flaky"
    assert flaky.calls == 3
    flaky.calls, flaky.failures = 0, 1
    with Client(f"127.0.0.1:{port}", timeout=10, retries=0) as c:
        with pytest.raises(ServiceError) as error:
            c.server_info()
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and not error.value.caller_mistake
    assert flaky.calls == 1


def test_targets_and_service_config():
    assert normalize_target("localhost:50051") == "localhost:50051"
    assert normalize_target("dns:///gramstyle.default.svc:50051").startswith("dns:///")
    assert normalize_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert normalize_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        normalize_target("localhost")
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    # Retries are the client's own (tests/server/test_replicas.py), not gRPC's retry policy.
    assert "methodConfig" not in config


def test_request_building(cat, starry):
    request = stylize_request([cat, b"raw"], starry, content_blend_weights=[1, 3],
                              content_layers=["relu4_2"], init="noise", optimizer="adam",
                              learning_rate=0.1, seed=7, precision="bf16", size=128,
                              preserve_colors=True, output_format="webp", weights="random")
    assert [c.weight for c in request.content] == [1, 3] and request.content[1].data == b"raw"
    assert not request.style[0].HasField("weight")
    assert [layer.name for layer in request.content_layers.layers] == ["relu4_2"]
    assert not request.HasField("style_layers")  # unset: the server's default
    assert request.init == pb.INIT_NOISE and request.optimizer == pb.OPTIMIZER_ADAM
    assert request.precision == pb.PRECISION_BF16 and request.output_format == pb.IMAGE_FORMAT_WEBP
    assert (request.seed, request.size, request.learning_rate) == (7, 128, 0.1)
    assert not request.HasField("iterations") and not request.HasField("style_weight")
    empty = stylize_request(cat, (), content_layers=[], style_weight=0)
    assert empty.HasField("content_layers") and not empty.content_layers.layers
    assert empty.HasField("style_weight") and empty.style_weight == 0
    with pytest.raises(ValueError, match="init: must be one of"):
        stylize_request(cat, starry, init="zeros")
    with pytest.raises(ValueError, match="iterations: must be an integer"):
        stylize_request(cat, starry, iterations=2.5)
    losses = losses_request(cat, [cat], [starry], style_scale=0.5, gradient=True)
    assert losses.gradient and math.isclose(losses.style_scale, 0.5)
    with pytest.raises(TypeError, match="iterations: not an option of this call"):
        losses_request(cat, [cat], [starry], iterations=3)


# ------------------------------------------------------------------------------ client-only install


BLOCK_TORCH = textwrap.dedent("""
    # Make torch (and the server extra's numpy/torchvision) unimportable, as in a client-only
    # install.
    import importlib.abc
    import sys

    class _Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "torchvision", "numpy"):
                raise ImportError(f"{name} is blocked in this test (client-only install)")
            return None

    sys.meta_path.insert(0, _Blocker())
""")

CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    target, cat, starry, out = sys.argv[1:5]
    from gramstyle.client import AsyncClient, Client, ServiceError
    from gramstyle import cli
    try:
        import torch  # noqa: F401
        raise SystemExit("torch should not be importable here")
    except ImportError:
        pass
    with Client(target, timeout=60) as c:
        info = c.server_info()
        seen = []
        result = c.stylize(cat, starry, size=32, iterations=2, progress_every=1,
                           progress=seen.append, preview=True)
        report = c.compute_losses(result.data, [cat], [starry], gradient=True)
        try:
            report.gradient
            raise SystemExit("numpy should be missing")
        except ImportError:
            pass
        try:
            c.stylize(b"junk", starry, size=32, iterations=1)
        except ServiceError as exc:
            code = exc.code.name
    codes = [
        cli.main(["stylize", "--server", target, "--content", cat, "--style", starry,
                  "--size", "32", "--iterations", "3", "-o", out, "--progress-sheet",
                  out + ".sheet.png", "-q"]),
        cli.main(["info", "--server", target]),
        cli.main(["losses", out, "--server", target, "--content", cat, "--style", starry]),
        cli.main(["info"]),
        cli.main(["serve", "--port", "0"]),
    ]
    assert "torch" not in sys.modules and "numpy" not in sys.modules, "imported anyway"
    print("RESULT", info.models[0].arch, [p.iteration for p in seen], seen[-1].image.size,
          result.image.size, len(report.gradient_bytes), code, codes)
""")


def test_client_works_without_torch(server, images, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    script = tmp_path / "client_only.py"
    script.write_text(CLIENT_SCRIPT)
    out = tmp_path / "out.png"
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{server.port}", str(images["cat"]),
         str(images["starry"]), str(out)],
        capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    assert line == ("RESULT vgg19 [0, 1, 2] (32, 21) (32, 21) " + str(3 * 21 * 32 * 4)
                    + " INVALID_ARGUMENT [0, 0, 0, 0, 1]"), line
    assert Image.open(out).size == (32, 21)
    assert Image.open(f"{out}.sheet.png").width > 32
    assert "torch     not installed" in proc.stdout
    assert "serve needs the server extra" in proc.stderr
