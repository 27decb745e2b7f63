"""No request lost when a replica dies: the client repeats a call that fails with UNAVAILABLE
(also a Stylize stream that already started) from the beginning, within its ``retries``, and
says so in the progress stream; and 3 real ``gramstyle serve`` replicas, one SIGKILLed and
one SIGTERMed under load, lose no request (the harness is bench/replicas.py)."""

from __future__ import annotations

import asyncio
import io
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image

from bench import replicas as harness
from gramstyle import codec
from gramstyle.client import AsyncClient, Client, ServiceError
from gramstyle.client.base import Attempts
from gramstyle.images import load_image, resize_long_side
from gramstyle.results import Losses, StylizeResult
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]




def result_message(total: float) -> pb.StylizeResponse:
    image = Image.new("RGB", (8, 6), (200, 10, 10))
    return codec.result_message(StylizeResult(image=image, iterations=3,
                                              losses=Losses(total, 0, 0, 0), elapsed_s=0.0,
                                              backend="fake", device="cpu"), "png")


class Flaky(pb_grpc.StyleTransferServiceServicer):
    """A replica whose first ``failures`` calls fail after sending progress 0..2 (Stylize) or
    at once (the unary calls) with ``code``; later calls succeed."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 name: str = "flaky"):
        self.failures, self.code, self.name = failures, code, name
        self.calls = 0
        self.lock = threading.Lock()

    def _fail_now(self) -> bool:
        with self.lock:
            self.calls += 1
            return self.calls <= self.failures

    def Stylize(self, request, context):
        fail = self._fail_now()
        for i in range(3 if fail else 4):
            yield pb.StylizeResponse(progress=pb.Progress(iteration=i, iterations=3))
        if fail:  # after response headers and messages: gRPC itself would not retry this
            context.abort(self.code, f"{self.name} went away mid-stream")
        yield result_message(1.5)

    def ComputeLosses(self, request, context):
        if self._fail_now():
            context.abort(self.code, f"{self.name} went away")
        return pb.ComputeLossesResponse(width=4, height=4, losses=pb.Losses(total=2.5))

    def GetServerInfo(self, request, context):
        if self._fail_now():
            context.abort(self.code, f"{self.name} went away")
        return pb.GetServerInfoResponse(version=self.name)


@pytest.fixture
def serve():
    started = []

    def start(service: Flaky) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_StyleTransferServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(None)


def test_stylize_restarts_mid_stream_and_says_so(serve):
    flaky = Flaky(failures=2)
    with Client(serve(flaky), timeout=30) as client:  # retries=2 by default
        seen = []
        result = client.stylize(b"x", (), progress=seen.append)
        assert [(p.attempt, p.iteration) for p in seen] == [
            (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)]
        assert [p.restarted for p in seen] == [False] * 3 + [True] * 7
        assert result.losses.total == 1.5 and flaky.calls == 3

        flaky.calls = 0
        stream = client.stylize_stream(b"x", ())
        assert [p.iteration for p in stream] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
        assert stream.attempt == 3 and stream.result.losses.total == 1.5


def test_retry_budget_is_spent_then_the_error_says_how_many_attempts(serve):
    flaky = Flaky(failures=3)
    with Client(serve(flaky), timeout=30) as client:
        with pytest.raises(ServiceError) as error:
            client.stylize(b"x", ())
    assert error.value.code == grpc.StatusCode.UNAVAILABLE and error.value.attempts == 3
    assert str(error.value).endswith("(after 3 attempts)") and flaky.calls == 3

    flaky = Flaky(failures=1)
    with Client(serve(flaky), timeout=30, retries=0) as client:
        with pytest.raises(ServiceError) as error:
            client.stylize(b"x", ())
    assert error.value.attempts == 1 and flaky.calls == 1


def test_only_unavailable_is_repeated(serve):
    flaky = Flaky(failures=1, code=grpc.StatusCode.INTERNAL)
    with Client(serve(flaky), timeout=30) as client:
        with pytest.raises(ServiceError) as error:
            client.stylize(b"x", ())
        assert error.value.code == grpc.StatusCode.INTERNAL and flaky.calls == 1
        flaky.calls = 0
        with pytest.raises(ServiceError):
            client.server_info()
        assert flaky.calls == 1


def test_unary_calls_retry_the_same_way(serve):
    flaky = Flaky(failures=2)
    with Client(serve(flaky), timeout=30) as client:
        assert client.compute_losses(b"x").losses.total == 2.5
        assert flaky.calls == 3
        flaky.calls = 0
        assert client.server_info().version == "flaky" and flaky.calls == 3
        flaky.calls, flaky.failures = 0, 5
        with pytest.raises(ServiceError) as error:
            client.server_info()
        assert error.value.attempts == 3 and flaky.calls == 3


def test_a_repeat_goes_to_another_replica(serve):
    """One replica always fails mid-stream; round_robin sends the repeat to the other."""
    dead, healthy = Flaky(failures=10**6, name="dead"), Flaky(failures=0, name="healthy")
    with Client([serve(dead), serve(healthy)], timeout=30) as client:
        client.wait_ready()
        restarted = 0
        for _ in range(8):
            stream = client.stylize_stream(b"x", ())
            stream.wait()
            restarted += stream.attempt > 1
    assert healthy.calls == 8 and dead.calls >= restarted >= 1


def test_async_client_restarts_too(serve):
    flaky = Flaky(failures=1)
    target = serve(flaky)

    async def main():
        async with AsyncClient(target, timeout=30) as client:
            seen = []

            async def on_progress(p):
                seen.append((p.attempt, p.iteration))

            result = await client.stylize(b"x", (), progress=on_progress)
            flaky.calls, flaky.failures = 0, 2
            report = await client.compute_losses(b"x")
            flaky.calls, flaky.failures = 0, 3
            try:
                await client.server_info()
            except ServiceError as exc:
                error = exc
            return seen, result, report, error

    seen, result, report, error = asyncio.run(main())
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert result.losses.total == 1.5 and report.losses.total == 2.5
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.attempts == 3


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "gone"


def test_attempts_backoff_budget_and_deadline():
    attempts = Attempts(lambda remaining: remaining, retries=3, timeout=None, rpc="Stylize")
    assert attempts.start() is None  # no deadline
    delays = [attempts.after_failure(_Unavailable()) for _ in range(3)]
    for n, delay in enumerate(delays):  # [b/2, b] with b = 0.2 s * 2**n
        assert 0.1 * 2**n <= delay <= 0.2 * 2**n
    with pytest.raises(ServiceError) as error:
        attempts.after_failure(_Unavailable())
    assert error.value.attempts == 4

    # No repeat is started that could not begin before the deadline.
    attempts = Attempts(lambda remaining: remaining, retries=5, timeout=0.05, rpc="Stylize")
    assert 0 < attempts.start() <= 0.05
    with pytest.raises(ServiceError) as error:
        attempts.after_failure(_Unavailable())
    assert error.value.attempts == 1


def test_retries_argument_is_checked():
    for bad in (-1, 11, 1.5, True):
        with pytest.raises(ValueError, match=r"^retries: must be an integer between 0 and 10"):
            Client("127.0.0.1:1", retries=bad)


# ------------------------------------------------------------------ real replicas under load


def png(path: Path, size: int) -> bytes:
    buffer = io.BytesIO()
    resize_long_side(load_image(path), size).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_no_request_lost_when_replicas_die(images, tmp_path):
    """3 `gramstyle serve` replicas, 4 clients looping Stylize: SIGKILL one replica while it
    runs a call, then SIGTERM another while it runs a call: no call fails."""
    replicas = [harness.Replica(tmp_path).start() for _ in range(3)]
    load = None
    try:
        for replica in replicas:
            replica.wait_ready(timeout=180)
        request = {"content": png(images["cat"], 48), "style": png(images["starry"], 48),
                   "size": 32, "iterations": 8, "progress_every": 1}
        load = harness.Load([r.address for r in replicas], request, clients=4).start()
        assert load.wait_ok(4), "the replicas did not answer"

        crashed, drained, survivor = replicas
        assert crashed.wait_busy(), "the replica never ran a call"
        crashed.signal(signal.SIGKILL)
        assert crashed.wait_exit() == -signal.SIGKILL
        assert load.wait_ok(4)

        assert drained.wait_busy(), "the replica never ran a call"
        drained.signal(signal.SIGTERM)
        assert drained.wait_exit() == 0, drained.log_tail()  # it drained its calls first
        assert load.wait_ok(4)
        counts = load.stop()
        load = None
        assert survivor.proc.poll() is None, survivor.log_tail()
    finally:
        if load is not None:
            load.stop()
        for replica in replicas:
            replica.stop()
    assert counts.failed == 0, counts.errors
    # The crash hit a running call, which the client finished on another replica.
    assert counts.restarted >= 1, counts
    # Same seed and inputs on every replica: every result, restarted or not, is the same run.
    assert counts.ok >= 12
    assert max(counts.totals) == pytest.approx(min(counts.totals), rel=1e-4)


def test_harness_counts_failures_without_retries(serve):
    """The harness counts failed calls (so 0 above means something)."""
    flaky = Flaky(failures=2)
    load = harness.Load([serve(flaky)], {"content": b"x"}, clients=1, retries=0).start()
    assert load.wait_ok(1, timeout=30)
    counts = load.stop()
    assert counts.failed == 2 and counts.restarted == 0
    assert counts.errors == {"UNAVAILABLE: flaky went away mid-stream": 2}
