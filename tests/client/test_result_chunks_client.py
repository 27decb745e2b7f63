"""The client library's side of chunked Stylize results (issue 19): a broken chunk stream --
a gap, an overlap, a total that disagrees with Result.image_bytes, data both chunked and
inline -- fails the call with DATA_LOSS (sync and async), never a truncated image; a call
restarted on UNAVAILABLE after some chunks arrived drops them and returns the whole image of
the new attempt. The servers here are fakes that send exactly the messages under test."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import noise

from gramstyle import codec
from gramstyle.client import AsyncClient, Client, ServiceError
from gramstyle.results import Losses, StylizeResult
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

CHUNK = 500


def result_stream(seed: int = 0) -> list[pb.StylizeResponse]:
    """The end of a real stream: a 40x30 noise PNG (several KB) in CHUNK-byte chunks."""
    result = StylizeResult(image=noise(40, 30, seed), iterations=1, losses=Losses(1, 0, 0, 0),
                           elapsed_s=0.0, backend="einsum", device="cpu")
    messages = codec.result_messages(result, "png", CHUNK)
    assert len(messages) > 4
    return messages


def broken(kind: str) -> list[pb.StylizeResponse]:
    messages = result_stream()
    chunks, final = messages[:-1], messages[-1]
    if kind == "gap":
        del chunks[1]
    elif kind == "overlap":
        chunks[2].result_chunk.offset -= 1
    elif kind == "short":  # the last chunk never came
        del chunks[-1]
    elif kind == "inline and chunked":
        final.result.image.data = b"x"
    elif kind == "wrong total":
        final.result.image_bytes += 1
    return [*chunks, final]


class Scripted(pb_grpc.StyleTransferServiceServicer):
    """Sends ``scripts[n]`` on call n (the last one again after that); a script ending in a
    StatusCode aborts with it after its messages."""

    def __init__(self, *scripts: list):
        self.scripts = scripts
        self.calls = 0
        self.lock = threading.Lock()

    def Stylize(self, request, context):
        with self.lock:
            script = self.scripts[min(self.calls, len(self.scripts) - 1)]
            self.calls += 1
        for item in script:
            if isinstance(item, grpc.StatusCode):
                context.abort(item, "the replica went away mid-result")
            yield item


@pytest.fixture
def serve():
    started = []

    def start(service: Scripted) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_StyleTransferServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop(None)


BROKEN = ["gap", "overlap", "short", "inline and chunked", "wrong total"]
MESSAGES = {"gap": "chunk 2 starts at byte 1000, but 500 bytes",
            "overlap": "chunk 3 starts at byte 999, but 1000 bytes",
            "short": "bytes together, but image_bytes says",
            "inline and chunked": "came both in",
            "wrong total": "bytes together, but image_bytes says"}


@pytest.mark.parametrize("kind", BROKEN)
def test_sync_client_refuses_a_broken_chunk_stream(serve, kind):
    with Client(serve(Scripted(broken(kind))), timeout=30) as client:
        with pytest.raises(ServiceError) as error:
            client.stylize(b"x", ())
    assert error.value.code == grpc.StatusCode.DATA_LOSS
    assert MESSAGES[kind] in error.value.message, error.value.message
    assert "the result stream is broken" in error.value.message


@pytest.mark.parametrize("kind", ["gap", "wrong total"])
def test_async_client_refuses_a_broken_chunk_stream(serve, kind):
    target = serve(Scripted(broken(kind)))

    async def main() -> None:
        async with AsyncClient(target, timeout=30) as client:
            await client.stylize(b"x", ())

    with pytest.raises(ServiceError) as error:
        asyncio.run(main())
    assert error.value.code == grpc.StatusCode.DATA_LOSS
    assert MESSAGES[kind] in error.value.message


def test_a_restart_drops_the_chunks_of_the_failed_attempt(serve):
    """Attempt 1 sends the first chunks of one image and dies (UNAVAILABLE); attempt 2 sends
    a different image whole: the result is attempt 2's image, not a mix."""
    first, second = result_stream(seed=1), result_stream(seed=2)
    service = Scripted([*first[:3], grpc.StatusCode.UNAVAILABLE], second)
    with Client(serve(service), timeout=30) as client:
        stream = client.stylize_stream(b"x", ())
        result = stream.wait()
    assert service.calls == 2 and stream.attempt == 2
    expected = codec.ResultAssembly()
    for message in second[:-1]:
        expected.add(message.result_chunk)
    assert result.data == expected.complete(second[-1].result).image.data
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(noise(40, 30, 2)))


def test_async_restart_drops_the_chunks_of_the_failed_attempt(serve):
    first, second = result_stream(seed=1), result_stream(seed=2)
    target = serve(Scripted([*first[:3], grpc.StatusCode.UNAVAILABLE], second))

    async def main() -> StylizeResult:
        async with AsyncClient(target, timeout=30) as client:
            return await client.stylize(b"x", ())

    result = asyncio.run(main())
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(noise(40, 30, 2)))


def test_assembly_round_trip_and_chunk_bound():
    messages = result_stream()
    assert all(m.result_chunk.ByteSize() <= CHUNK + 16 for m in messages[:-1])
    assembly = codec.ResultAssembly()
    for message in messages[:-1]:
        assembly.add(message.result_chunk)
    whole = assembly.complete(messages[-1].result)
    assert len(whole.image.data) == whole.image_bytes == messages[-1].result.image_bytes
    assert codec.result_from(whole).image.size == (40, 30)
    with pytest.raises(ValueError, match="chunk_bytes: must be >= 1"):
        codec.result_messages(codec.result_from(whole), "png", 0)
