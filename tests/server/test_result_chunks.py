"""Big results over gRPC with the default limits (issue 19, section 4): a result image larger
than the chunk size arrives as ResultChunk messages and then a Result with empty image.data;
the sync and async clients reassemble it, every message stays under the bound, the HTTP
front's result event carries the whole image; a default server reports max_size 4096 and
tiles (rather than refuses) a 4096 px request; a ComputeLosses whose gradient cannot fit the
message limit is refused before any work, naming ``gradient``."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import grpc
import numpy as np
import pytest
from conftest import build_server, encode, noise, small_png
from PIL import Image

from gramstyle import codec
from gramstyle.client import AsyncClient, Client, ServiceError
from gramstyle.results import Losses, Progress, StylizeResult
from gramstyle.v1 import gramstyle_pb2 as pb
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

#: Small chunks, so that a 64 px result is cut into several; HTTP on a free port.
CHUNK = 1024
SERVER_SETTINGS = {"result_chunk_kb": CHUNK // 1024, "http_port": 0}
#: Framing of a ResultChunk message besides its data: the oneof tag and length, the offset.
CHUNK_FRAMING = 32
REQUEST = {"size": 64, "iterations": 2, "seed": 7, "precision": "fp32"}


@pytest.fixture(scope="module")
def inputs(images) -> tuple[bytes, bytes]:
    return small_png(images["cat"]), small_png(images["starry"])


@pytest.fixture(scope="module")
def stream(server, inputs) -> list[pb.StylizeResponse]:
    """The raw messages of one Stylize stream (no client library)."""
    content, style = inputs
    request = codec.stylize_request(content, style, **REQUEST)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        return list(pb_grpc.StyleTransferServiceStub(channel).Stylize(request, timeout=120))


def test_a_large_result_arrives_in_bounded_chunks_then_a_result(stream):
    kinds = [m.WhichOneof("kind") for m in stream]
    first_chunk = kinds.index("result_chunk")
    assert set(kinds[:first_chunk]) == {"progress"}
    assert kinds[first_chunk:-1] == ["result_chunk"] * (len(kinds) - 1 - first_chunk)
    assert kinds[-1] == "result"
    chunks = [m.result_chunk for m in stream[first_chunk:-1]]
    assert len(chunks) >= 3  # a 64 px PNG is several KB
    offsets = np.cumsum([0] + [len(c.data) for c in chunks])
    assert [c.offset for c in chunks] == list(offsets[:-1])
    assert all(len(c.data) == CHUNK for c in chunks[:-1]) and 0 < len(chunks[-1].data) <= CHUNK
    assert all(m.ByteSize() <= CHUNK + CHUNK_FRAMING for m in stream[first_chunk:-1])
    result = stream[-1].result
    assert result.image.data == b"" and result.image_bytes == offsets[-1]
    assert (result.image.width, result.image.height) == (64, 43)
    assert result.image.format == pb.IMAGE_FORMAT_PNG
    image = Image.open(io.BytesIO(b"".join(c.data for c in chunks)))
    assert image.format == "PNG" and image.size == (64, 43)


def _stream_bytes(stream: list[pb.StylizeResponse]) -> bytes:
    return b"".join(m.result_chunk.data for m in stream if m.HasField("result_chunk"))


def test_sync_client_reassembles_the_chunks(server, inputs, stream):
    content, style = inputs
    with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        result = client.stylize(content, style, **REQUEST)
    assert result.data == _stream_bytes(stream)  # the same seed: the same bytes
    assert (result.width, result.height) == (64, 43) and result.format == "png"
    assert result.iterations == 2


def test_async_client_reassembles_the_chunks(server, inputs, stream):
    content, style = inputs

    async def main() -> StylizeResult:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            return await client.stylize(content, style, **REQUEST)

    result = asyncio.run(main())
    assert result.data == _stream_bytes(stream)
    assert (result.width, result.height) == (64, 43)


def test_http_result_carries_the_whole_image(server, http, inputs, stream):
    content, style = inputs
    body = {"content": [{"data": base64.b64encode(content).decode()}],
            "style": [{"data": base64.b64encode(style).decode()}],
            **REQUEST, "precision": "PRECISION_FP32"}
    events = []
    with http.stream("POST", "/v1/stylize", json=body) as response:
        assert response.status_code == 200
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    assert [k for k, _ in events][-1] == "result"
    assert all(k in ("progress", "result") for k, _ in events)  # no chunk events
    result = events[-1][1]["result"]
    data = base64.b64decode(result["image"]["data"])
    assert data == _stream_bytes(stream) and int(result["imageBytes"]) == len(data)
    assert Image.open(io.BytesIO(data)).size == (64, 43)


def test_small_results_stay_one_message(random_engine, inputs):
    """With the default chunk size (1 MiB) a 64 px result is one Result, as before."""
    content, style = inputs
    srv = build_server([random_engine]).start()
    try:
        request = codec.stylize_request(content, style, **REQUEST)
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            messages = list(pb_grpc.StyleTransferServiceStub(channel).Stylize(request,
                                                                               timeout=120))
    finally:
        srv.stop(grace=None)
    assert [m.WhichOneof("kind") for m in messages][-1] == "result"
    assert not any(m.HasField("result_chunk") for m in messages)
    result = messages[-1].result
    assert Image.open(io.BytesIO(result.image.data)).size == (64, 43)
    assert result.image_bytes == len(result.image.data)


def test_previews_are_bounded():
    progress_image = Image.new("RGB", (3000, 1500), (10, 20, 30))

    message = codec.progress_message(Progress(iteration=0, iterations=1,
                                              losses=Losses(1, 0, 0, 0), elapsed_s=0.0,
                                              image=progress_image), "png")
    preview = message.progress.preview
    assert (preview.width, preview.height) == (1024, 512)
    assert Image.open(io.BytesIO(preview.data)).size == (1024, 512)
    small = codec.progress_message(Progress(iteration=0, iterations=1,
                                            losses=Losses(1, 0, 0, 0), elapsed_s=0.0,
                                            image=Image.new("RGB", (64, 43))), "png")
    assert (small.progress.preview.width, small.progress.preview.height) == (64, 43)


def test_server_info_reports_max_size_4096(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        info = client.server_info()
    assert info.limits["max_size"] == 4096 and info.limits["default_size"] == 512


# ------------------------------------------------------------------ 4096 px with the defaults


@pytest.mark.slow
def test_a_4096_px_request_is_tiled_and_its_result_passes_default_limits(
        random_engine, monkeypatch):
    """A 4096x3072 Stylize on a server with a 16 GiB budget (a 24 GB machine's default is
    about 18 GiB) and otherwise default limits: admission tiles it (untiled it needs ~49
    GiB), and its result -- a noise PNG of 36 MiB, incompressible -- reaches a client with
    default settings whole. The engine is replaced by one that records its options and
    returns that image, so the test takes seconds, not hours."""
    seen = []
    pixels = np.random.default_rng(0).integers(0, 256, (3072, 4096, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)

    def stylize(*_args, options, **_kwargs):
        seen.append(options)
        return StylizeResult(image=image, iterations=options.iterations,
                             losses=Losses(1, 0, 0, 0), elapsed_s=0.0, backend="einsum",
                             device="cpu", precision="fp32", stop_reason="cap")

    monkeypatch.setattr(random_engine, "stylize", stylize)
    srv = build_server([random_engine], memory_budget=16 * 2**30).start()
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=300) as client:
            result = client.stylize(encode(noise(64, 48)), encode(noise(64, 48, 1)),
                                    size=4096)
    finally:
        srv.stop(grace=None)
    (options,) = seen
    assert options.size == 4096 and isinstance(options.tile, int), options.tile
    assert (result.width, result.height) == (4096, 3072)
    assert len(result.data) > 36 * 2**20
    np.testing.assert_array_equal(np.asarray(result.image), pixels)


# ------------------------------------------------------------------ ComputeLosses gradient


def test_a_gradient_over_the_message_limit_is_refused_before_the_work(random_engine, spy):
    """A 1 MiB message limit: a 320x280 candidate's gradient is 1.03 MiB of float32."""
    engine = spy(random_engine)
    srv = build_server([random_engine], max_message_mb=1).start()
    # The default 1 MiB chunks are cut to a quarter of the 1 MiB message limit.
    assert srv.service.result_chunk_bytes == 2**18
    style = encode(noise(32, 32, 2))
    try:
        with Client(f"127.0.0.1:{srv.port}", timeout=60, retries=0) as client:
            candidate = encode(noise(320, 280))
            assert len(candidate) < 2**20 / 2
            with pytest.raises(ServiceError) as error:
                client.compute_losses(candidate, (), style, gradient=True)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.fields == ["gradient"]
            assert error.value.message.startswith(
                "gradient: the gradient of a 320x280 candidate is 1 MiB of float32"), \
                error.value.message
            assert "over this server's message limit of 1 MiB" in error.value.message
            assert "at most 81920 pixels" in error.value.message
            assert engine.calls == []  # refused before any work
            # A candidate whose gradient fits is scored, gradient and all.
            report = client.compute_losses(encode(noise(200, 150)), (), style, gradient=True,
                                           content_weight=0)
            assert report.gradient_shape == (3, 150, 200)
            assert len(engine.calls) == 1
    finally:
        srv.stop(grace=None)

