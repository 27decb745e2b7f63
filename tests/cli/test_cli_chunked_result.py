"""`gramstyle stylize --server` and `gramstyle batch --server` against a server that sends
every result in 1 KiB chunks (issue 19): the files written are the whole images, the same
bytes the server encoded, whatever the number of chunks."""

from __future__ import annotations

import grpc
import numpy as np
from conftest import noise, png
from PIL import Image

from gramstyle import codec
from gramstyle.cli import main
from gramstyle.v1 import gramstyle_pb2_grpc as pb_grpc

#: The conftest ``server``, with 1 KiB result chunks.
SERVER_SETTINGS = {"result_chunk_kb": 1}
TINY = ["--size", "48", "--iterations", "2", "--seed", "5", "--precision", "fp32"]


def raw_result(port: int, content: bytes, style: bytes) -> bytes:
    """The result image's bytes, reassembled here from the raw stream (no client library)."""
    request = codec.stylize_request(content, style, size=48, iterations=2, seed=5,
                                    precision="fp32")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        messages = list(pb_grpc.StyleTransferServiceStub(channel).Stylize(request, timeout=120))
    chunks = [m.result_chunk.data for m in messages if m.HasField("result_chunk")]
    assert len(chunks) >= 3
    return b"".join(chunks)


def test_stylize_and_batch_remote_write_whole_chunked_results(server, tmp_path, capsys):
    content, style = tmp_path / "c.png", tmp_path / "s.png"
    content.write_bytes(png(noise(60, 40, seed=11)))
    style.write_bytes(png(noise(40, 40, seed=12)))
    expected = raw_result(server.port, content.read_bytes(), style.read_bytes())
    target = f"127.0.0.1:{server.port}"

    out = tmp_path / "out.png"
    code = main(["stylize", "--server", target, "--content", str(content), "--style",
                 str(style), "-o", str(out), "--timeout", "120", *TINY])
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes() == expected  # the server's bytes, written as they came

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "c.png").write_bytes(content.read_bytes())
    code = main(["batch", str(photos), "--style", str(style), "-o", str(tmp_path / "batch"),
                 "--server", target, "--timeout", "120", "-q", *TINY])
    assert code == 0, capsys.readouterr().err
    (written,) = (tmp_path / "batch").iterdir()
    image = Image.open(written)
    assert image.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")),
                                  np.asarray(Image.open(out).convert("RGB")))
