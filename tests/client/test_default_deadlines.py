"""Every call of Client and AsyncClient has a deadline unless the caller says None: the
per-RPC default (DEFAULT_TIMEOUTS), the client's ``timeout=``, or the call's own. Checked
where it matters, at a gRPC server: the deadline the server sees for the call."""

from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest

from gramstyle.client import DEFAULT_TIMEOUTS, AsyncClient, Client, ServiceError
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

PNG = b"\x89PNG\r\n\x1a\n"  # never decoded: the recording server answers before that


class DeadlineRecorder(pb_grpc.StyleTransferServiceServicer):
    """Records each call's time remaining (None: no deadline), then refuses it."""

    def __init__(self):
        self.seen: list[tuple[str, float | None]] = []

    def _record(self, rpc: str, context: grpc.ServicerContext):
        self.seen.append((rpc, context.time_remaining()))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "recorded")

    def Stylize(self, request, context):
        self._record("Stylize", context)

    def ComputeLosses(self, request, context):
        self._record("ComputeLosses", context)

    def GetServerInfo(self, request, context):
        self._record("GetServerInfo", context)


@pytest.fixture
def recorder():
    servicer = DeadlineRecorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_StyleTransferServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def call_each_rpc(client: Client, **call) -> None:
    for run in (lambda: client.stylize(PNG, PNG, **call),
                lambda: client.compute_losses(PNG, PNG, PNG, **call),
                lambda: client.server_info(**call)):
        with pytest.raises(ServiceError, match="recorded"):
            run()


async def call_each_rpc_async(client: AsyncClient, **call) -> None:
    for run in (lambda: client.stylize(PNG, PNG, **call),
                lambda: client.compute_losses(PNG, PNG, PNG, **call),
                lambda: client.server_info(**call)):
        with pytest.raises(ServiceError, match="recorded"):
            await run()


def assert_deadlines(seen, expected: dict[str, float | None]) -> None:
    assert [rpc for rpc, _ in seen] == list(expected)
    for rpc, remaining in seen:
        if expected[rpc] is None:
            # grpc reports "no deadline" as None or as about 2**63 seconds
            assert remaining is None or remaining > 1e9, f"{rpc} had a deadline: {remaining}"
        else:
            # What is left a moment later. gRPC rounds deadlines up, and grpc.aio's clock,
            # after a long test session in one process, was seen 10 s ahead on a 30 min
            # deadline: allow 1 % above (a wrong default is off by far more).
            assert expected[rpc] - 5 < remaining <= expected[rpc] * 1.01 + 1.5, (rpc, remaining)


def test_default_deadlines_fit_a_cpu_run():
    assert DEFAULT_TIMEOUTS == {"Stylize": 1800.0, "ComputeLosses": 600.0,
                                "GetServerInfo": 30.0}


def test_sync_client_sends_the_default_deadline_of_each_rpc(recorder):
    servicer, target = recorder
    with Client(target, retries=0) as client:
        call_each_rpc(client)
    assert_deadlines(servicer.seen, DEFAULT_TIMEOUTS)


def test_async_client_sends_the_default_deadline_of_each_rpc(recorder):
    servicer, target = recorder

    async def main():
        async with AsyncClient(target, retries=0) as client:
            await call_each_rpc_async(client)

    asyncio.run(main())
    assert_deadlines(servicer.seen, DEFAULT_TIMEOUTS)


def test_client_and_call_timeouts_override_the_defaults(recorder):
    servicer, target = recorder
    with Client(target, timeout=120, retries=0) as client:
        call_each_rpc(client)
        call_each_rpc(client, timeout=45)
        call_each_rpc(client, timeout=None)  # this call: no deadline
    everything = dict.fromkeys(DEFAULT_TIMEOUTS)
    assert_deadlines(servicer.seen[:3], dict.fromkeys(everything, 120))
    assert_deadlines(servicer.seen[3:6], dict.fromkeys(everything, 45))
    assert_deadlines(servicer.seen[6:], everything)


def test_timeout_none_means_no_deadline(recorder):
    servicer, target = recorder

    async def main():
        async with AsyncClient(target, timeout=None, retries=0) as client:
            await call_each_rpc_async(client)
            await call_each_rpc_async(client, timeout=20)

    asyncio.run(main())
    assert_deadlines(servicer.seen[:3], dict.fromkeys(DEFAULT_TIMEOUTS))
    assert_deadlines(servicer.seen[3:], dict.fromkeys(DEFAULT_TIMEOUTS, 20))


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "60", True])
def test_a_bad_timeout_is_a_value_error_naming_it(bad, recorder):
    _, target = recorder
    with pytest.raises(ValueError, match=r"^timeout: must be a positive number of seconds, "
                                         r"or None for no deadline, got "):
        Client(target, timeout=bad)
    with Client(target) as client, pytest.raises(ValueError, match=r"^timeout: must be"):
        client.server_info(timeout=bad)
